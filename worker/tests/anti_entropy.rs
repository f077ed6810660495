//! Anti-entropy: co-owners compare digests of the arcs they share and
//! repair what differs — copies lost behind the cluster's back, a delete
//! one owner missed — and move nothing when nothing differs.
#![allow(clippy::unwrap_used)]

use kv_testkit::eventually_within;
use kv_testkit::inproc::*;
use kv_wire::{Request, Response};
use std::time::Duration;

/// Rounds every 300 ms, and the test hook that drops copies.
fn fast_rounds(c: &mut kv_worker::Config) {
    c.anti_entropy_interval = Duration::from_millis(300);
    c.test_hooks = true;
}

/// Waits until every worker holds all three copies of `n` keys.
async fn fully_replicated(cluster: &Cluster, n: u64) {
    eventually("three copies of every key", || async {
        (held(cluster).await.values().sum::<u64>() == 3 * n).then_some(())
    })
    .await;
}

/// Four workers with fast rounds, holding all three copies of `n` keys.
async fn loaded(n: usize) -> Cluster {
    let cluster = Cluster::start_configured(4, None, fast_rounds).await;
    write_keys(&cluster, n).await;
    fully_replicated(&cluster, n as u64).await;
    cluster
}

/// Every `step`-th of the keys `key:0..n` that worker1 owns.
fn owned_by_worker1(cluster: &Cluster, n: usize, step: usize) -> Vec<String> {
    let ring = ring(cluster);
    (0..n)
        .map(|i| format!("key:{i}"))
        .filter(|k| ring.is_owner(k.as_bytes(), 3, "worker1"))
        .step_by(step)
        .collect()
}

/// `worker` drops its copies of `keys` and tells no one (the test hook).
async fn forget(worker: &Service, keys: &[String]) {
    let body = serde_json::to_string(keys).unwrap();
    let (status, reply) = http("POST", &worker.url("/test/forget"), body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["forgotten"].as_u64(), Some(keys.len() as u64));
}

/// Waits for `rounds` more anti-entropy rounds on every worker.
async fn rounds(cluster: &Cluster, rounds: u64) {
    for w in &cluster.workers {
        let start = w.metric("kv_worker_anti_entropy_rounds_total").await;
        eventually("anti-entropy rounds", || async {
            let now = w.metric("kv_worker_anti_entropy_rounds_total").await;
            (now >= start + rounds).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_lost_behind_the_clusters_back_come_back_with_no_topology_change() {
    let n = 3000;
    let cluster = loaded(n).await;
    let epoch = cluster.settled().await;

    // worker1 loses a tenth of its copies, and tells no one.
    let victim = cluster.worker("worker1");
    let lost = owned_by_worker1(&cluster, n, 10);
    let repaired_before = victim
        .metric("kv_worker_anti_entropy_keys_repaired_total")
        .await;
    forget(victim, &lost).await;

    fully_replicated(&cluster, n as u64).await;
    for key in &lost {
        let i: usize = key["key:".len()..].parse().unwrap();
        assert_eq!(victim.local(key).await, Some(format!("value-{i}")), "{key}");
    }
    let repaired = victim
        .metric("kv_worker_anti_entropy_keys_repaired_total")
        .await;
    assert!(
        repaired >= repaired_before + lost.len() as u64,
        "{repaired} repaired, {} lost",
        lost.len()
    );
    assert_eq!(
        cluster.settled().await,
        epoch,
        "repaired without a topology change"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_one_owner_missed_wins_and_the_value_never_returns() {
    let cluster = Cluster::start_configured(3, None, fast_rounds).await;
    let owners = cluster.mapping("doomed").await;
    let first = cluster.worker(&owners[0]);
    let (status, _) = http("PUT", &first.url("/kv"), put_body("doomed", "v1")).await;
    assert_eq!(status, 200);
    let mut written = None;
    for id in &owners {
        written = Some(
            eventually("the value on every owner", || async {
                cluster.worker(id).copy("doomed").await
            })
            .await,
        );
    }
    let written = written.unwrap();
    let (status, _) = http("DELETE", &first.url("/kv?key=doomed"), "").await;
    assert_eq!(status, 200);
    for id in &owners {
        eventually("the tombstone on every owner", || async {
            let c = cluster.worker(id).copy("doomed").await?;
            c.value.is_none().then_some(())
        })
        .await;
    }

    // The last owner "missed" the delete: its tombstone is replaced by the
    // value it had before.
    let stale = cluster.worker(&owners[2]);
    let (status, _) = http("POST", &stale.url("/test/forget"), r#"["doomed"]"#).await;
    assert_eq!(status, 200);
    let replicated = stale
        .wire()
        .await
        .call(Request::Replicate {
            entries: vec![written.clone()],
        })
        .await
        .unwrap();
    assert!(
        matches!(replicated, Response::Replicated { applied: 1, .. }),
        "{replicated:?}"
    );
    assert_eq!(stale.local("doomed").await.as_deref(), Some("v1"));

    // Anti-entropy brings the tombstone back; the value never wins.
    let tombstone = eventually("the tombstone to be repaired", || async {
        let c = stale.copy("doomed").await?;
        c.value.is_none().then_some(c)
    })
    .await;
    assert!(tombstone.version > written.version);
    rounds(&cluster, 2).await;
    for id in &owners {
        let c = cluster.worker(id).copy("doomed").await.unwrap();
        assert_eq!(c, tombstone, "{id}");
        let (status, _) = cluster
            .worker(id)
            .get("/kv?key=doomed&consistency=quorum")
            .await;
        assert_eq!(status, 404, "{id} reads the deleted value");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_with_nothing_different_compare_everything_and_move_nothing() {
    let n = 3000;
    let cluster = loaded(n).await;
    // Let rounds that began while copies were landing finish.
    rounds(&cluster, 2).await;
    let names = [
        "kv_worker_anti_entropy_arcs_compared_total",
        "kv_worker_anti_entropy_arcs_differing_total",
        "kv_worker_anti_entropy_keys_repaired_total",
        "kv_worker_rebalance_keys_total",
    ];
    let mut before = Vec::new();
    for w in &cluster.workers {
        for name in names {
            before.push(w.metric(name).await);
        }
    }
    rounds(&cluster, 2).await;
    let mut i = 0;
    for w in &cluster.workers {
        for name in names {
            let now = w.metric(name).await;
            if name.contains("compared") {
                // Each round compares every arc this worker owns with both
                // co-owners: 3/4 of 4 x 2048 arcs, twice.
                assert!(
                    now >= before[i] + 2 * 3 * 2048 * 2,
                    "{}: {name} {now}",
                    w.id
                );
            } else {
                assert_eq!(now, before[i], "{}: {name} moved", w.id);
            }
            i += 1;
        }
        assert_eq!(w.metric("kv_worker_arcs_unverified").await, 0, "{}", w.id);
        assert_eq!(
            w.metric("kv_worker_handoff_pending_keys").await,
            0,
            "{}",
            w.id
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_leave_arcs_being_written_for_later_yet_repair_copies_lost_in_them() {
    let n = 3000;
    let cluster = loaded(n).await;
    let victim = cluster.worker("worker1");
    let lost = owned_by_worker1(&cluster, n, 60);
    // For each lost key, a key in the same arc that writers keep changing:
    // the arc differs (the lost copy) and moves at every look (the writes),
    // so only a thorough round compares it key by key.
    let ring = ring(&cluster);
    let arcs = ring.arcs();
    let hot: Vec<String> = lost
        .iter()
        .map(|k| {
            let hash = kv_wire::Ring::key_hash(k.as_bytes());
            let (arc, _) = arcs.iter().find(|(r, _)| r.contains(hash)).unwrap();
            (0..)
                .map(|j| format!("hot:{j}"))
                .find(|h| h != k && arc.contains(kv_wire::Ring::key_hash(h.as_bytes())))
                .unwrap()
        })
        .collect();
    let writing = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, hot, writing) = (cluster.workers[w].url("/kv"), hot.clone(), writing.clone());
            tokio::spawn(async move {
                for i in (w..).step_by(4) {
                    if writing.is_cancelled() {
                        break;
                    }
                    let key = &hot[i % hot.len()];
                    http("PUT", &url, put_body(key, &format!("v{i}"))).await;
                }
            })
        })
        .collect();
    let busy_before = victim
        .metric("kv_worker_anti_entropy_arcs_busy_total")
        .await;
    forget(victim, &lost).await;

    // Repaired while the writes go on, and the busy arcs were seen as such.
    eventually_within(
        Duration::from_secs(90),
        Duration::from_millis(50),
        "the lost copies back on worker1",
        || async {
            for key in &lost {
                victim.local(key).await?;
            }
            Some(())
        },
    )
    .await;
    let busy = victim
        .metric("kv_worker_anti_entropy_arcs_busy_total")
        .await;
    assert!(busy > busy_before, "no round saw a busy arc ({busy})");
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "a writer stopped early"
    );
    writing.cancel();
    for w in writers {
        w.await.unwrap();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_only_a_non_owner_holds_are_sent_to_their_owners_and_dropped_there() {
    // Owners pull from their co-owners (and from leavers), never from a
    // worker that is neither: only its handoff can bring them these
    // copies, by sending the values once the owners stopped taking keys
    // themselves.
    let n = 1000;
    let cluster = loaded(n).await;
    let ring = ring(&cluster);
    let strays: Vec<String> = (0..)
        .map(|i| format!("stray:{i}"))
        .filter(|k| !ring.is_owner(k.as_bytes(), 3, "worker4"))
        .take(20)
        .collect();
    let entries: Vec<kv_wire::Entry> = strays
        .iter()
        .map(|key| kv_wire::Entry {
            key: key.clone(),
            version: kv_wire::Version { hlc: 1, node: 9 },
            value: Some(format!("only-on-worker4-{key}").into()),
        })
        .collect();
    let holder = cluster.worker("worker4");
    match holder
        .wire()
        .await
        .call(Request::Replicate { entries })
        .await
    {
        Ok(Response::Replicated { .. }) => {}
        other => panic!("{other:?}"),
    }
    for key in &strays {
        let value = format!("only-on-worker4-{key}");
        for owner in ring.owners(key.as_bytes(), 3) {
            let owner = cluster.worker(owner);
            let copy = eventually_within(
                Duration::from_secs(60),
                Duration::from_millis(50),
                "the stray copy on its owner",
                || async { owner.copy(key).await },
            )
            .await;
            assert_eq!(copy.value.as_deref(), Some(value.as_bytes()), "{key}");
        }
    }
    eventually("the strays dropped by worker4", || async {
        for key in &strays {
            if holder.copy(key).await.is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
    fully_replicated(&cluster, (n + strays.len()) as u64).await;
    cluster.shutdown().await;
}
