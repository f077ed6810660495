//! Memory and time per copy of the in-memory store as it grows: inserts N
//! copies (keys like a bulk load's, 100-byte values) on one thread and
//! prints the process's resident memory per copy and the time per insert.
//!
//! `cargo run --release -p kv-worker --example store_memory [N]` (default
//! 1,500,000: about what each of four workers holds after `kvctl load` of
//! 2,000,000 keys).

use bytes::Bytes;
use kv_wire::Version;
use kv_worker::store::{MemStore, Store, Stored};
use std::time::Instant;

/// The process's resident memory in KiB, from /proc.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a VmRSS line")
}

fn main() {
    kv_alloc::configure();
    let n: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().expect("N: a number of copies"),
        None => 1_500_000,
    };
    let store = MemStore::new();
    let value = Bytes::from(vec![7u8; 100]);
    let before = rss_kib();
    let started = Instant::now();
    for i in 0..n {
        let copy = Stored {
            version: Version {
                hlc: i + 1,
                node: 1,
            },
            // A fresh buffer per copy, as decoding a frame gives.
            value: Some(Bytes::copy_from_slice(&value)),
        };
        store
            .apply(&format!("load:{i}"), copy)
            .expect("memory takes every write");
    }
    let took = started.elapsed();
    let grown = (rss_kib() - before) * 1024;
    let (keys, bytes) = store.stats();
    println!(
        "{keys} copies of {:.0} bytes (key and value): {:.0} bytes of memory per copy, {:.0} ns per insert",
        bytes as f64 / keys as f64,
        grown as f64 / n as f64,
        took.as_nanos() as f64 / n as f64
    );
}
