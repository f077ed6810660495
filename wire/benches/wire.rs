//! Prints how fast the wire crate's hot paths run: ring lookups, frame
//! encode/decode, heartbeat encode/decode. Run with
//! `cargo bench -p kv-wire --bench wire`. Figures, not assertions.

use bytes::{Bytes, BytesMut};
use kv_wire::heartbeat::{Datagram, Heartbeat};
use kv_wire::message::{ClientFrame, Entry, Request};
use kv_wire::{FrameCodec, Ring, ServerFrame, Version};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};

/// Runs `f` in rounds until `budget` has passed; returns calls per second.
fn rate(budget: Duration, mut f: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < budget {
        calls += f();
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let budget = Duration::from_secs(1);
    let keys: Vec<String> = (0..100_000).map(|i| format!("key:{i}")).collect();

    // Balance and movement, over 200,000 real keys.
    let sample: Vec<String> = (0..200_000).map(|i| format!("sample:{i}")).collect();
    let sample: Vec<&[u8]> = sample.iter().map(|k| k.as_bytes()).collect();
    for workers in [4, 16, 64] {
        let names: Vec<String> = (1..=workers + 1).map(|i| format!("worker{i}")).collect();
        let ring = Ring::new(names[..workers].iter().cloned());
        let grown = Ring::new(names.iter().cloned());
        let mut held = std::collections::HashMap::<&str, usize>::new();
        let (mut moved_primaries, mut moved_copies) = (0, 0);
        for key in &sample {
            let before = ring.owners(key, 3);
            let after = grown.owners(key, 3);
            for owner in &before {
                *held.entry(owner).or_default() += 1;
            }
            moved_primaries += usize::from(before[0] != after[0]);
            moved_copies += after.iter().filter(|o| !before.contains(o)).count();
        }
        let max = *held.values().max().unwrap_or(&0) as f64;
        let mean = (3 * sample.len()) as f64 / workers as f64;
        println!(
            "ring  {workers:>2} workers: busiest holds {:.3}x the mean copies; one joining moves {:.4} of primaries and {:.4} of copies (1/(N+1) = {:.4})",
            max / mean,
            moved_primaries as f64 / sample.len() as f64,
            moved_copies as f64 / (3 * sample.len()) as f64,
            1.0 / (workers + 1) as f64
        );
    }

    for workers in [4, 64] {
        let built = Instant::now();
        let ring = Ring::new((1..=workers).map(|i| format!("worker{i}")));
        let build = built.elapsed();
        let per_sec = rate(budget, || {
            for key in &keys {
                black_box(ring.owners(black_box(key.as_bytes()), 3));
            }
            keys.len()
        });
        println!("ring  {workers:>2} workers: owners(key, 3) {:>6.2} M lookups/s   (ring built in {build:.1?})", per_sec / 1e6);
    }

    for value_len in [100usize, 1000] {
        let value = Bytes::from(vec![b'x'; value_len]);
        let frames: Vec<ClientFrame> = keys[..10_000]
            .iter()
            .enumerate()
            .map(|(i, key)| ClientFrame::Request {
                id: i as u64,
                body: Request::Put {
                    key: key.clone(),
                    value: value.clone(),
                },
            })
            .collect();
        let mut encoder = FrameCodec::<ServerFrame, ClientFrame>::default();
        let mut wire = BytesMut::new();
        let encode = rate(budget, || {
            wire.clear();
            for frame in &frames {
                encoder.encode(frame.clone(), &mut wire).expect("encodes");
            }
            frames.len()
        });
        let bytes_per_frame = wire.len() as f64 / frames.len() as f64;
        let mut decoder = FrameCodec::<ClientFrame, ServerFrame>::default();
        let decode = rate(budget, || {
            let mut buf = wire.clone();
            let mut n = 0;
            while let Some(frame) = decoder.decode(&mut buf).expect("decodes") {
                black_box(frame);
                n += 1;
            }
            n
        });
        println!(
            "codec put, {value_len:>4} B value: encode {:>5.2} M frames/s ({:>6.0} MB/s), decode {:>5.2} M frames/s ({:>6.0} MB/s)",
            encode / 1e6,
            encode * bytes_per_frame / 1e6,
            decode / 1e6,
            decode * bytes_per_frame / 1e6
        );
    }

    let batch = ClientFrame::Request {
        id: 1,
        body: Request::Replicate {
            entries: keys[..1000]
                .iter()
                .map(|key| Entry {
                    key: key.clone(),
                    version: Version {
                        hlc: 1 << 40,
                        node: 7,
                    },
                    value: Some(Bytes::from_static(&[b'x'; 100])),
                })
                .collect(),
        },
    };
    let mut encoder = FrameCodec::<ServerFrame, ClientFrame>::default();
    let mut decoder = FrameCodec::<ClientFrame, ServerFrame>::default();
    let mut wire = BytesMut::new();
    let round_trip = rate(budget, || {
        wire.clear();
        encoder.encode(batch.clone(), &mut wire).expect("encodes");
        black_box(decoder.decode(&mut wire).expect("decodes"));
        1000
    });
    println!(
        "codec replicate batch of 1000 x 100 B: encode+decode {:>5.2} M entries/s",
        round_trip / 1e6
    );

    let hb = Heartbeat {
        member: 17,
        generation: 3,
        seq: 123_456,
        epoch_seen: 42,
    };
    let bytes = hb.encode();
    let encode = rate(budget, || {
        for _ in 0..1000 {
            black_box(black_box(&hb).encode());
        }
        1000
    });
    let decode = rate(budget, || {
        for _ in 0..1000 {
            black_box(Heartbeat::decode(black_box(&bytes)).expect("decodes"));
        }
        1000
    });
    println!(
        "heartbeat ({} B): encode {:>5.2} M/s, decode {:>5.2} M/s",
        bytes.len(),
        encode / 1e6,
        decode / 1e6
    );
}
