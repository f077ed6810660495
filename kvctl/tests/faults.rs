//! Fault injection on real processes, with a history checker.
//!
//! A controller and four workers run as OS processes (`kvctl node ...`).
//! Writers put keys through the client library while a seeded schedule
//! injects one fault; every acknowledged write is recorded. After the fault
//! and a settle period, the checker reads each key's copy on every live
//! owner: it must be the last acknowledged value, or a later attempt whose
//! outcome was unknown — never older. Each scenario prints its seed
//! (`KV_FAULT_SEED` replays one), operations, acknowledged writes, losses
//! and time to converge.
//!
//! The scenarios run one at a time: several clusters at once would starve
//! each other on a small machine and turn timing into noise.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use kv_testkit::procs::*;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_primary_under_steady_writes_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    // Every worker is the primary of some keys under load: kill one.
    let victim = format!("worker{}", rng.usize(1..=4));
    signal(cluster.nodes[&victim].pid(), "-9");
    // The fault happened: the controller saw it.
    cluster.down(&victim).await;
    let live: Vec<String> = workers(4).into_iter().filter(|w| *w != victim).collect();
    let settled = settle(
        &cluster,
        load,
        &live,
        &format!("kill -9 {victim} under writes"),
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "acknowledged writes lost (seed {seed})"
    );
    assert!(
        primary_of_acked_keys(&settled.history, &victim) > 0,
        "{victim} was the primary of no acknowledged key: the kill tested nothing"
    );
}

/// How many of the history's acknowledged keys `id` was the primary of
/// in the four-worker ring.
fn primary_of_acked_keys(history: &History, id: &str) -> usize {
    let ring = kv_wire::Ring::new(workers(4));
    history
        .acked
        .keys()
        .filter(|k| ring.owners(k.as_bytes(), 1) == [id])
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_for_3s_comes_back_and_converges_without_resurrecting_old_values() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    let victim = format!("worker{}", rng.usize(1..=4));
    let pid = cluster.nodes[&victim].pid();
    let stopped = Instant::now();
    signal(pid, "-STOP");
    // The fault happened: the controller took it for dead.
    cluster.down(&victim).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(stopped.elapsed())).await;
    signal(pid, "-CONT");
    // Back in the ring: all four are live owners again.
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        &format!("SIGSTOP {victim} 3 s"),
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "stale or lost copies after a gray failure (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_marks_nobody_down_and_moves_no_data_while_writes_go_on() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = Cluster::start(4).await;
    let moved_before = moved(&cluster, &workers(4)).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(cluster.nodes["controller"].pid(), "-9");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart("controller").await;
    // Through the restart and the new controller's grace period.
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        let down = others_down(&cluster, "").await;
        assert!(
            down.is_empty(),
            "{down:?} marked DOWN by a restarted controller"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        "controller kill -9 and restart",
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "writes lost across a controller restart (seed {seed})"
    );
    assert_eq!(
        settled.failed, 0,
        "writes failed while the controller was away"
    );
    let moved_after = moved(&cluster, &workers(4)).await;
    assert_eq!(moved_after, moved_before, "a controller restart moved data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_empty_with_the_same_id_receives_its_share() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    let victim = format!("worker{}", rng.usize(1..=4));
    signal(cluster.nodes[&victim].pid(), "-9");
    cluster.restart(&victim).await; // a new pod: same id, empty store, new generation
    cluster.wait_all_up(4).await;
    cluster
        .until(&format!("{victim} ready"), async || {
            cluster.ready(&victim).await
        })
        .await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        &format!("{victim} restarted empty"),
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "the restarted worker did not get its share back (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_worker_loses_nothing_and_never_takes_the_others_down() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    let victim = format!("worker{}", rng.usize(1..=4));
    let pid = cluster.nodes[&victim].pid();
    let all = workers(4);
    let before = moved(&cluster, &all).await;
    // Stopped and continued every second for 20 s.
    let flapping_until = Instant::now() + Duration::from_secs(20);
    let mut stopped = false;
    while Instant::now() < flapping_until {
        signal(pid, if stopped { "-CONT" } else { "-STOP" });
        stopped = !stopped;
        let tick = Instant::now() + Duration::from_secs(1);
        while Instant::now() < tick {
            let down = others_down(&cluster, &victim).await;
            assert!(
                down.is_empty(),
                "{down:?} marked DOWN while {victim} flapped (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if stopped {
        signal(pid, "-CONT");
    }
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &all,
        &format!("{victim} flapping 1 s / 1 s for 20 s"),
        seed,
    )
    .await;
    let moved = moved(&cluster, &all).await - before;
    let hints = metric_sum(&cluster, &all, "kv_worker_hints_total").await;
    println!("FAULTS |   {hints} hints queued for owners that flapped out of the topology");
    println!("FAULTS |   rebalancing moved {moved} keys over 10 flaps of a worker holding about {} copies", 3 * settled.history.acked.len() / 4);
    assert!(
        settled.result.is_ok(),
        "data lost while a worker flapped (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_cpu_causes_no_false_down() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    // Three busy loops per core, at the same priority as the cluster.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut burners: Vec<Child> = (0..3 * cores)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(10);
    let mut worst = Vec::new();
    while Instant::now() < until {
        worst.extend(others_down(&cluster, "").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for b in &mut burners {
        let _ = b.kill();
        let _ = b.wait();
    }
    let label = format!(
        "CPU saturated ({} busy loops on {cores} cores) for 10 s",
        3 * cores
    );
    let settled = settle(&cluster, load, &workers(4), &label, seed).await;
    let url = format!("{}/metrics", cluster.controller_url());
    let (_, metrics) = cluster
        .http
        .request("GET".parse().unwrap(), &url, Bytes::new())
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        worst.is_empty(),
        "false DOWN under CPU load: {worst:?} (seed {seed})"
    );
    assert!(
        !metrics.contains("to=\"DOWN\""),
        "a DOWN transition happened:\n{metrics}"
    );
    assert!(
        settled.result.is_ok(),
        "data lost under CPU load (seed {seed})"
    );
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_connections_cost_bounded_memory_and_keep_no_client_out() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3).await;
    let target = &cluster.nodes["worker1"];
    let wire_port = target.wire;
    let before = rss(target.pid());
    let mut flood = Vec::new();
    for _ in 0..10_000 {
        flood.push(
            tokio::net::TcpStream::connect(("127.0.0.1", wire_port))
                .await
                .unwrap(),
        );
    }
    let during = rss(target.pid());
    // A new client is served while the flood is connected.
    let client = kv_client::Client::connect(
        &cluster.controller_url(),
        kv_client::Credentials::new("kv", "faults"),
    )
    .await
    .unwrap();
    for i in 0..100 {
        client
            .put(&format!("flooded:{i}"), Bytes::from("v"))
            .await
            .unwrap();
    }
    let (status, _) = cluster
        .http
        .request(
            "GET".parse().unwrap(),
            &format!("http://127.0.0.1:{}/healthz", target.http),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    println!("FAULTS | 10,000 silent wire connections: worker RSS {} MB -> {} MB; a new client served throughout", before / 1_000_000, during / 1_000_000);
    assert!(
        during - before < 256 * 1024 * 1024,
        "10,000 idle connections cost {} MB",
        (during - before) / 1_000_000
    );
    // Silent connections are closed after the hello timeout.
    for mut s in flood {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was kept open");
    }
}
