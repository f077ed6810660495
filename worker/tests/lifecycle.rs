//! Leaving and readiness, in process: a worker told to leave (as SIGTERM
//! does) hands every key to its owners before it exits and ends DOWN with
//! reason "left"; two leaving at once lose nothing; the last ones leave
//! without waiting; a second signal stops at once; `/readyz` says why a
//! worker is not ready.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;
use std::time::Duration;

/// Workers (with the test hooks) holding all three copies of `n` keys.
async fn loaded(workers: usize, n: usize) -> Cluster {
    let cluster = Cluster::start_configured(workers, None, |c| c.test_hooks = true).await;
    write_keys(&cluster, n).await;
    copies_become(&cluster, 3 * n as u64).await;
    cluster
}

/// Waits until the cluster's workers hold `copies` copies between them.
async fn copies_become(cluster: &Cluster, copies: u64) {
    eventually(&format!("{copies} copies on the workers"), || async {
        (held(cluster).await.values().sum::<u64>() == copies).then_some(())
    })
    .await;
}

/// Drops, behind the cluster's back, every copy of the keys `key:0..n`
/// owned by all of `leavers` from their other owners: those keys now live
/// on the leavers alone, and only a handover saves them.
async fn only_on(cluster: &Cluster, leavers: &[&str], n: usize) {
    let ring = ring(cluster);
    let mut dropped = 0;
    for w in &cluster.workers {
        if leavers.contains(&w.id.as_str()) {
            continue;
        }
        let keys: Vec<String> = (0..n)
            .map(|i| format!("key:{i}"))
            .filter(|k| {
                let owners = ring.owners(k.as_bytes(), 3);
                owners.contains(&w.id.as_str()) && leavers.iter().all(|l| owners.contains(l))
            })
            .collect();
        let (status, reply) = http(
            "POST",
            &w.url("/test/forget"),
            serde_json::to_string(&keys).unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        dropped += keys.len();
    }
    assert!(dropped > 0, "no key is owned by all of {leavers:?}");
    copies_become(cluster, 3 * n as u64 - dropped as u64).await;
}

/// Tells the workers `ids` to leave, takes them out of the cluster, and
/// waits until each has exited by itself.
async fn leave(cluster: &mut Cluster, ids: &[&str]) {
    let mut leaving = Vec::new();
    for id in ids {
        let i = cluster.workers.iter().position(|w| w.id == *id).unwrap();
        let worker = cluster.workers.remove(i);
        worker.leave();
        leaving.push(worker);
    }
    for worker in leaving {
        tokio::time::timeout(PATIENCE, worker.task)
            .await
            .unwrap_or_else(|_| panic!("{} did not exit after leaving", worker.id))
            .unwrap();
    }
}

/// Waits until `worker`'s `/readyz` is 200.
async fn ready(worker: &Service) {
    eventually(&format!("{} ready", worker.id), || async {
        let (status, body) = worker.get("/readyz").await;
        (status == 200 && body["status"] == "ready").then_some(())
    })
    .await;
}

/// A worker's status and reason in `/nodes`.
async fn status(cluster: &Cluster, id: &str) -> (String, Option<String>) {
    let (_, nodes) = cluster.controller.get("/nodes").await;
    let node = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap()
        .clone();
    (
        node["status"].as_str().unwrap().to_string(),
        node["reason"].as_str().map(str::to_string),
    )
}

/// Every key `key:0..n` reads back its value through `worker` at quorum.
async fn all_readable(worker: &Service, n: usize) {
    for i in 0..n {
        let (status, body) = worker
            .get(&format!("/kv?key=key:{i}&consistency=quorum"))
            .await;
        assert_eq!(
            (status, &body["value"]),
            (200, &format!("value-{i}").into()),
            "key:{i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_worker_hands_every_key_over_then_exits_down_with_reason_left() {
    const KEYS: usize = 3000;
    let mut cluster = loaded(4, KEYS).await;
    only_on(&cluster, &["worker1"], KEYS).await;
    leave(&mut cluster, &["worker1"]).await;
    assert_eq!(
        status(&cluster, "worker1").await,
        ("DOWN".to_string(), Some("left".to_string()))
    );
    cluster.settled().await;
    // Three copies of every key on the three left, nothing lost.
    copies_become(&cluster, 3 * KEYS as u64).await;
    all_readable(&cluster.workers[0], KEYS).await;
    for w in &cluster.workers {
        ready(w).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_six_leaving_at_once_lose_nothing_and_the_last_ones_leave_without_waiting() {
    const KEYS: usize = 3000;
    let mut cluster = loaded(6, KEYS).await;
    // Some keys live on these two alone: owners pull from leavers too.
    only_on(&cluster, &["worker5", "worker6"], KEYS).await;
    leave(&mut cluster, &["worker5", "worker6"]).await;
    cluster.settled().await;
    copies_become(&cluster, 3 * KEYS as u64).await;
    all_readable(&cluster.workers[0], KEYS).await;
    // The rest leave together: nobody is left to take their keys, so they
    // exit at once rather than after the drain timeout (60 s, longer than
    // this test waits).
    leave(&mut cluster, &["worker1", "worker2", "worker3", "worker4"]).await;
    for id in ["worker1", "worker2", "worker3", "worker4"] {
        assert_eq!(status(&cluster, id).await.0, "DOWN");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_leaving_while_another_joins_loses_nothing() {
    const KEYS: usize = 20_000;
    let mut cluster = loaded(4, KEYS).await;
    // worker5's share is still moving in when worker2 is told to leave.
    cluster.add("worker5").await;
    leave(&mut cluster, &["worker2"]).await;
    cluster.settled().await;
    copies_become(&cluster, 3 * KEYS as u64).await;
    all_readable(&cluster.workers[0], KEYS / 10).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_why_and_a_second_signal_stops_a_leaving_worker_at_once() {
    let cluster = Cluster::start_configured(3, None, |c| {
        c.drain_timeout = Duration::from_secs(600);
    })
    .await;
    for w in &cluster.workers {
        ready(w).await;
    }
    // Without a controller, a leave cannot take the worker out of the
    // ring: it stays up, leaving, until told again.
    cluster.controller.stop.cancel();
    let w1 = &cluster.workers[0];
    w1.leave();
    let (status, body) = w1.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body["error"].as_str().unwrap().starts_with("leaving"),
        "{body}"
    );
    assert_eq!(w1.get("/healthz").await.0, 200, "still serving");
    // A worker that never reached a controller is joining.
    let orphan = start_worker("orphan", &nowhere()).await;
    let (status, body) = eventually("the orphan to serve", || async {
        tokio::time::timeout(Duration::from_secs(1), orphan.get("/readyz"))
            .await
            .ok()
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        body["error"].as_str().unwrap().starts_with("joining"),
        "{body}"
    );
    orphan.kill().await;
    // The second signal.
    let mut workers = cluster.workers.into_iter();
    let w1 = workers.next().unwrap();
    w1.lifecycle.as_ref().unwrap().signal();
    tokio::time::timeout(PATIENCE, w1.task)
        .await
        .expect("a second signal stops a leaving worker")
        .unwrap();
    for w in workers {
        w.kill().await;
    }
}
