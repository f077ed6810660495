//! What a bulk load costs each store, without the network: writes N copies
//! (keys like `kvctl load`'s, 100-byte values) in batches of 512, as a
//! worker applies a PutMany or a peer's replication batch, into the
//! in-memory store and into a durable one (`--sync interval`) in a
//! temporary data dir, and prints for each the copies a second and the
//! process's CPU per 1,000 copies, the engine's background work (flushes,
//! compactions) included: the durable figure is read once that work has
//! settled.
//!
//! Then it serves the durable store's copies as a co-owner pulling whole
//! arcs asks for them (every arc of a four-worker ring, page by page, as
//! `FetchRange` answers), two ways, alternating: from one ordered range
//! read of the engine per page (what a worker does) and by reading each
//! copy on its own (a scan of the keys, sorted, then a lookup per copy),
//! and prints copies/s and CPU per 1,000 copies for each.
//!
//! `cargo run --release -p kv-worker --example store_load [N]` (default
//! 750,000: what each of four workers holds after loading 1,000,000 keys).
//! `TMPDIR` picks the disk.

use bytes::Bytes;
use kv_wire::{HashRange, Response, Ring, Version};
use kv_worker::disk::{DiskStore, SyncPolicy};
use kv_worker::ranges::fetch_range;
use kv_worker::store::{MemStore, Store, Stored};
use std::time::{Duration, Instant};

const BATCH: u64 = 512;

/// User and system CPU of this process (all its threads) so far.
fn cpu() -> Duration {
    kv_testkit::cpu_time("self")
}

fn load(store: &dyn Store, n: u64) -> Duration {
    let value = Bytes::from(vec![7u8; 100]);
    let started = Instant::now();
    let mut batch = Vec::with_capacity(BATCH as usize);
    for i in 0..n {
        batch.push((
            format!("load:{i}"),
            Stored {
                version: Version {
                    hlc: i + 1,
                    node: 1,
                },
                value: Some(Bytes::copy_from_slice(&value)),
            },
        ));
        if batch.len() as u64 == BATCH || i + 1 == n {
            for outcome in store.apply_many(&batch) {
                outcome.expect("the store takes every write");
            }
            batch.clear();
        }
    }
    started.elapsed()
}

/// Waits until the process has used no CPU for a second: the engine's
/// background threads have nothing left to do.
fn settle() {
    let mut last = cpu();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu();
        if now - last < Duration::from_millis(20) {
            return;
        }
        last = now;
    }
}

fn report(name: &str, n: u64, took: Duration, cpu: Duration) {
    println!(
        "{name:>9}: {:>9.0} copies/s while loading, {:>6.2} ms of CPU per 1k copies",
        n as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64
    );
}

/// A way to serve every copy of some arcs; returns how many it served.
type Serve = fn(&dyn Store, &[HashRange]) -> u64;

/// Every copy in `arcs`, page by page as `FetchRange` answers: copies read.
fn serve_in_order(store: &dyn Store, arcs: &[HashRange]) -> u64 {
    let mut copies = 0;
    for &range in arcs {
        let mut after: Option<String> = None;
        loop {
            let Response::Entries { entries, next } = fetch_range(store, range, after.as_deref())
            else {
                unreachable!("fetch_range answers entries")
            };
            copies += entries.len() as u64;
            match next {
                Some(key) => after = Some(key),
                None => break,
            }
        }
    }
    copies
}

/// The same copies read one by one: the keys of each arc, sorted, then a
/// lookup of each (what `FetchRange` did before the ordered read).
fn serve_one_by_one(store: &dyn Store, arcs: &[HashRange]) -> u64 {
    let mut copies = 0;
    for &range in arcs {
        let mut keys = Vec::new();
        store.scan(range, &mut |key, _| {
            keys.push((Ring::key_hash(key.as_bytes()), key.to_string()));
        });
        keys.sort_unstable();
        copies += keys.iter().filter_map(|(_, key)| store.get(key)).count() as u64;
    }
    copies
}

fn main() {
    kv_alloc::configure();
    let n: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().expect("N: a number of copies"),
        None => 750_000,
    };
    let before = cpu();
    let memory = MemStore::new();
    let took = load(&memory, n);
    report("memory", n, took, cpu() - before);
    drop(memory);

    let dir = tempfile::tempdir().expect("a temporary dir");
    let (disk, _) = DiskStore::open(
        dir.path(),
        "store-load",
        SyncPolicy::Interval,
        Duration::from_millis(200),
        Duration::ZERO,
    )
    .expect("a fresh data dir opens");
    settle();
    let before = cpu();
    let took = load(&disk, n);
    // Counted until the engine is idle: its flushes and compactions are
    // the load's too (the idle second adds under 20 ms).
    settle();
    report("interval", n, took, cpu() - before);

    let ring = Ring::new(["w1", "w2", "w3", "w4"]);
    let arcs: Vec<HashRange> = ring.arcs().into_iter().map(|(range, _)| range).collect();
    let ways: [(&str, Serve); 2] = [
        ("in order", serve_in_order),
        ("one by one", serve_one_by_one),
    ];
    for round in 1..=2 {
        for (name, serve) in ways {
            let (before, started) = (cpu(), Instant::now());
            let copies = serve(&disk, &arcs);
            assert_eq!(copies, n, "every copy served");
            println!(
                "{name:>10} (round {round}): {:>9.0} copies/s served as arcs, {:>6.2} ms of CPU per 1k copies",
                n as f64 / started.elapsed().as_secs_f64(),
                (cpu() - before).as_secs_f64() * 1e6 / n as f64
            );
        }
    }
}
