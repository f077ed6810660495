//! What a bulk load costs each store, without the network: writes N copies
//! (keys like `kvctl load`'s, 100-byte values) in batches of 512, as a
//! worker applies a PutMany or a peer's replication batch, into the
//! in-memory store and into a durable one (`--sync interval`) in a
//! temporary data dir, and prints for each the copies a second and the
//! process's CPU per 1,000 copies, the engine's background work (flushes,
//! compactions) included: the durable figure is read once that work has
//! settled.
//!
//! `cargo run --release -p kv-worker --example store_load [N]` (default
//! 750,000: what each of four workers holds after loading 1,000,000 keys).
//! `TMPDIR` picks the disk.

use bytes::Bytes;
use kv_wire::Version;
use kv_worker::disk::{DiskStore, SyncPolicy};
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
}
