//! Re-replication at a scale where a rebalance lasts long enough to be
//! interrupted: 100,000 keys on real processes, a kill while a joining
//! worker's share is still moving, and two kills in a row. After each,
//! every key is on all its current owners: the live workers hold exactly
//! three copies of every key between them, and a sample of keys is read
//! back from each of its owners.
//!
//! (Clusters of a few thousand keys hid the bug these pin down: a kill
//! during a rebalance left keys at two copies, silently.)
#![allow(clippy::unwrap_used)]

use kv_testkit::procs::*;
use std::time::Instant;

const KEYS: usize = 100_000;

/// Waits until `live` hold three copies of each of `n` keys, then reads
/// every 250th key from each of its owners.
async fn on_all_owners(cluster: &Cluster, live: &[String], n: usize, scenario: &str) {
    let started = Instant::now();
    cluster.three_copies(scenario, live, n as u64).await;
    cluster.sample_on_owners(live, n, 250, scenario).await;
    println!(
        "REREPLICATION | {scenario} | {n} keys on all owners {:.2} s after the last fault",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_a_joining_worker_fills_up_leaves_every_key_on_all_its_owners() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(4).await;
    cluster.load_replicated(KEYS).await;

    cluster.spawn_worker(5).await;
    // worker5 is pulling its share (from worker1 among others): kill that.
    cluster
        .until("worker5 to start filling", async || {
            cluster.copies(&["worker5".to_string()]).await > 0
        })
        .await;
    signal(cluster.nodes["worker1"].pid(), "-9");
    cluster.down("worker1").await;
    let live: Vec<String> = workers(5).into_iter().filter(|w| w != "worker1").collect();
    on_all_owners(&cluster, &live, KEYS, "kill -9 during a join").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kills_in_a_row_leave_every_key_on_three_live_owners() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(5).await;
    cluster.load_replicated(KEYS).await;

    signal(cluster.nodes["worker2"].pid(), "-9");
    cluster.down("worker2").await;
    // The survivors are re-replicating worker2's copies: kill another.
    signal(cluster.nodes["worker4"].pid(), "-9");
    cluster.down("worker4").await;
    let live = vec!["worker1".to_string(), "worker3".into(), "worker5".into()];
    on_all_owners(&cluster, &live, KEYS, "two kills in a row").await;
}
