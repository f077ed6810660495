//! Routine operations on real processes, with writers running and the
//! acknowledged-write checker at the end: rolling restarts as Kubernetes
//! does them (one Deployment at a time, and every Deployment at once),
//! a scale-down of two workers, SIGTERM during a rebalance, a second
//! SIGTERM, and the last workers leaving together.
//!
//! A rolling restart here is what `kubectl rollout restart` does to a
//! Deployment with maxSurge 1 and maxUnavailable 0: a new pod (a new
//! worker id) starts, and only once its `/readyz` answers 200 does the
//! old pod get SIGTERM. Each old worker must leave by itself (exit 0,
//! `DOWN` with reason `left`), having handed every key over.
//!
//! Every scenario starts from 50,000 loaded keys, so handovers last long
//! enough to overlap with writes and with each other.
#![allow(clippy::unwrap_used)]

use kv_testkit::procs::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const LOADED: usize = 50_000;

/// `workers` workers holding three copies of `LOADED` keys.
async fn loaded(workers: usize) -> Cluster {
    let cluster = Cluster::start(workers).await;
    cluster.load_replicated(LOADED).await;
    cluster
}

/// Sends SIGTERM to `id`, once its process has set up its signal handler.
fn terminate(cluster: &Cluster, id: &str) {
    signal(cluster.nodes[id].pid(), "-TERM");
}

/// Waits for `id` to exit by itself after leaving: exit 0, and `DOWN`
/// with reason `left` in `/nodes`.
async fn left(cluster: &mut Cluster, id: &str) {
    let status = cluster.exited(id).await;
    assert!(status.success(), "{id} exited with {status}");
    let entry = cluster.node(id).await;
    let entry = entry
        .as_ref()
        .unwrap_or_else(|| panic!("{id} not in /nodes"));
    assert_eq!(
        (entry["status"].as_str(), entry["reason"].as_str()),
        (Some("DOWN"), Some("left")),
        "{id} after leaving: {entry}"
    );
}

/// The end of every scenario: writes stop, every acknowledged write is on
/// every live owner, no write failed, and the loaded keys are intact.
async fn nothing_lost(cluster: &Cluster, load: Load, live: &[String], scenario: &str, seed: u64) {
    let settled = settle(cluster, load, live, scenario, seed).await;
    assert!(
        settled.result.is_ok(),
        "{scenario}: acknowledged writes lost (seed {seed})"
    );
    assert_eq!(settled.failed, 0, "{scenario}: writes failed (seed {seed})");
    loaded_keys_intact(cluster, live, LOADED, &settled.history, 0, scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_one_worker_at_a_time_under_writes_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = loaded(4).await;
    let load = Load::start(&cluster, seed).await;
    let started = Instant::now();
    let mut live = Vec::new();
    for i in 1..=4 {
        let (old, new) = (format!("worker{i}"), format!("worker{i}-r"));
        cluster.spawn_worker_as(i, &new).await;
        cluster
            .until(&format!("{new} ready"), async || cluster.ready(&new).await)
            .await;
        terminate(&cluster, &old);
        left(&mut cluster, &old).await;
        live.push(new);
    }
    println!(
        "ROLLING | one at a time | 4 workers replaced in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    nothing_lost(
        &cluster,
        load,
        &live,
        "rolling restart, one at a time",
        seed,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_deployment_at_once_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = loaded(4).await;
    let load = Load::start(&cluster, seed).await;
    let started = Instant::now();
    let live: Vec<String> = (1..=4).map(|i| format!("worker{i}-r")).collect();
    for (i, new) in live.iter().enumerate() {
        cluster.spawn_worker_as(i + 1, new).await;
    }
    // Each Deployment on its own: its old pod is told to go as soon as its
    // new pod is ready, whatever the others are doing.
    let mut told = HashSet::new();
    let deadline = Instant::now() + PATIENCE;
    while told.len() < 4 {
        for i in 1..=4 {
            if !told.contains(&i) && cluster.ready(&format!("worker{i}-r")).await {
                terminate(&cluster, &format!("worker{i}"));
                told.insert(i);
            }
        }
        assert!(
            Instant::now() < deadline,
            "new workers not ready: {told:?} told; logs in {}",
            cluster.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 1..=4 {
        left(&mut cluster, &format!("worker{i}")).await;
    }
    println!(
        "ROLLING | every Deployment at once | 4 workers replaced in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    nothing_lost(&cluster, load, &live, "rolling restart, all at once", seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_six_workers_scaled_down_at_once_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = loaded(6).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    terminate(&cluster, "worker5");
    terminate(&cluster, "worker6");
    left(&mut cluster, "worker5").await;
    left(&mut cluster, "worker6").await;
    nothing_lost(&cluster, load, &workers(4), "two of six scaled down", seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_worker_a_joiner_is_pulling_from_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = loaded(4).await;
    let load = Load::start(&cluster, seed).await;
    cluster.spawn_worker(5).await;
    let joiner = vec!["worker5".to_string()];
    cluster
        .until("worker5 to start filling", async || {
            cluster.copies(&joiner).await > 0
        })
        .await;
    // worker5 is still pulling its share, from worker1 among others.
    assert!(!cluster.ready("worker5").await, "worker5 filled at once");
    terminate(&cluster, "worker1");
    left(&mut cluster, "worker1").await;
    let live: Vec<String> = (2..=5).map(|i| format!("worker{i}")).collect();
    nothing_lost(&cluster, load, &live, "SIGTERM during a join", seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_a_leaving_worker_at_once_and_the_cluster_repairs() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = loaded(4).await;
    let load = Load::start(&cluster, seed).await;
    let log = cluster.nodes["worker2"].log.clone();
    terminate(&cluster, "worker2");
    cluster
        .until("worker2 to start leaving", async || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("leaving: handing"))
        })
        .await;
    let second = Instant::now();
    terminate(&cluster, "worker2");
    let status = cluster.exited("worker2").await;
    let took = second.elapsed();
    assert!(status.success(), "worker2 exited with {status}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("stopped before"),
        "worker2 finished its drain before the second signal: {}",
        log.display()
    );
    println!(
        "ROLLING | second SIGTERM | worker2 exited {:.2} s after it",
        took.as_secs_f64()
    );
    // Its keys were not all handed over: the other copies are, and the
    // cluster makes new ones once the controller sees it gone.
    cluster.down("worker2").await;
    let live: Vec<String> = [1, 3, 4].iter().map(|i| format!("worker{i}")).collect();
    nothing_lost(&cluster, load, &live, "a second SIGTERM", seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_workers_leaving_together_exit_without_waiting_for_the_drain_timeout() {
    let _serial = SERIAL.lock().await;
    // A drain timeout longer than the harness waits: a worker that waited
    // for it would fail the test.
    let mut cluster = Cluster::start_with(3, &["--drain-timeout", "10m"]).await;
    cluster.load(5_000).await;
    let started = Instant::now();
    for w in workers(3) {
        terminate(&cluster, &w);
    }
    for w in workers(3) {
        let status = cluster.exited(&w).await;
        assert!(status.success(), "{w} exited with {status}");
    }
    println!(
        "ROLLING | the last 3 workers leaving | all exited in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}
