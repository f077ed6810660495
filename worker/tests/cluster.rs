//! The worker's promises in a live in-process cluster: routing, convergence,
//! deletes, re-replication after a failure, and a join.
#![allow(clippy::unwrap_used)]

use futures::stream::{self, StreamExt};
use kv_testkit::inproc::*;
use kv_wire::{Entry, Request, Response, Ring};
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_a_non_owner_reaches_the_primary() {
    let cluster = Cluster::start(4).await;
    let owners = cluster.mapping("routed").await;
    let outsider = cluster
        .workers
        .iter()
        .find(|w| !owners.contains(&w.id))
        .unwrap();
    let (status, reply) = http(
        "PUT",
        &outsider.url("/kv"),
        put_body("routed", "via-outsider"),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        cluster.worker(&owners[0]).local("routed").await.as_deref(),
        Some("via-outsider")
    );
    assert_eq!(
        outsider.local("routed").await,
        None,
        "a non-owner keeps no copy"
    );
    // A delete through the outsider is routed too.
    let (status, _) = http("DELETE", &outsider.url("/kv?key=routed"), "").await;
    assert_eq!(status, 200);
    assert_eq!(cluster.worker(&owners[0]).local("routed").await, None);
    cluster.shutdown().await;
}

/// The primary holds a copy newer than its clock gives (another
/// primary's, whose clock ran ahead): a write there is stored above that
/// copy, on every owner, one write or a batch. Two things see to it: the
/// clock observes every copy replicated to the worker, and a write its
/// store finds older than the copy held is stored again above it (which a
/// race between two writes to one key needs too). Without both, this fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_at_a_primary_holding_a_newer_copy_goes_above_it() {
    let cluster = Cluster::start(3).await;
    for (key, batched) in [("ahead", false), ("ahead-batched", true)] {
        let owners = cluster.mapping(key).await;
        let primary = cluster.worker(&owners[0]);
        let future = plant_from_the_future(primary, key).await;
        let request = if batched {
            Request::PutMany {
                items: vec![(key.into(), "now".into())],
            }
        } else {
            Request::Put {
                key: key.into(),
                value: "now".into(),
            }
        };
        let reply = primary.wire().await.call(request).await.unwrap();
        let version = match reply {
            Response::Written { version, .. } => version,
            Response::PutMany(results) => results[0].clone().unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(version > future, "{key}: {version:?} not above {future:?}");
        held_by_all(&cluster, &owners, key, version, "now").await;
    }
    cluster.shutdown().await;
}

/// Stores a copy of `key` on `worker` an hour ahead of every clock here,
/// as a peer whose clock ran ahead would send it; its version.
async fn plant_from_the_future(worker: &Service, key: &str) -> kv_wire::Version {
    let future = kv_wire::Version {
        hlc: (kv_testkit::fake::now_ms() + 3_600_000) << 16,
        node: 7,
    };
    worker
        .plant(Entry {
            key: key.into(),
            version: future,
            value: Some("from-the-future".into()),
        })
        .await;
    future
}

/// Waits until each of `owners` holds `key` at `version`, whose value
/// must be `value`.
async fn held_by_all(
    cluster: &Cluster,
    owners: &[String],
    key: &str,
    version: kv_wire::Version,
    value: &str,
) {
    for id in owners {
        let copy = eventually("the write on every owner", || async {
            let c = cluster.worker(id).copy(key).await?;
            (c.version == version).then_some(c)
        })
        .await;
        assert_eq!(
            copy.value.as_deref(),
            Some(value.as_bytes()),
            "{key} on {id}"
        );
    }
}

/// A batch of writes in which the first replica holds a newer copy of one
/// key: that key is written again above it, and every other key of the
/// batch is stored at the version it was answered with, on every owner.
/// The primary's copies go to each replica as one share of the batch, so
/// this checks that each replica's answer reaches the write it is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_newer_copy_on_a_replica_goes_above_it_and_keeps_the_rest() {
    let cluster = Cluster::start(3).await;
    let owners = cluster.mapping("stale-in-batch").await;
    let (primary, replica) = (cluster.worker(&owners[0]), cluster.worker(&owners[1]));
    let future = plant_from_the_future(replica, "stale-in-batch").await;
    // Keys with the same primary around it, so its copy is in the middle
    // of each replica's share.
    let mut keys = Vec::new();
    for i in 0.. {
        let key = format!("batch-{i}");
        if cluster.mapping(&key).await[0] == owners[0] {
            keys.push(key);
        }
        if keys.len() == 60 {
            break;
        }
    }
    keys.insert(20, "stale-in-batch".into());
    let items = keys.iter().map(|k| (k.clone(), "now".into())).collect();
    let reply = primary
        .wire()
        .await
        .call(Request::PutMany { items })
        .await
        .unwrap();
    let Response::PutMany(results) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(results.len(), keys.len());
    for (key, result) in keys.iter().zip(results) {
        let version = result.unwrap_or_else(|e| panic!("{key}: {e:?}"));
        if key == "stale-in-batch" {
            assert!(version > future, "{version:?} not above {future:?}");
        }
        held_by_all(&cluster, &owners, key, version, "now").await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_one_key_converge_on_every_owner() {
    let cluster = Cluster::start(4).await;
    let urls: Vec<String> = cluster.workers.iter().map(|w| w.url("/kv")).collect();
    let acknowledged: Vec<(String, kv_wire::Version)> = stream::iter(0..200)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            async move {
                let value = format!("writer-{i}");
                let (status, reply) = http("PUT", &url, put_body("contended", &value)).await;
                assert_eq!(status, 200, "{reply}");
                (value, reply["version"].as_str().unwrap().parse().unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let newest = acknowledged.iter().max_by_key(|(_, v)| *v).unwrap();
    let owners = cluster.mapping("contended").await;
    let values = eventually("every owner to hold the same copy", || async {
        let mut seen = Vec::new();
        for id in &owners {
            let (_, body) = cluster.worker(id).get("/kv?key=contended").await;
            seen.push((
                body["value"].as_str()?.to_string(),
                body["version"].as_str()?.to_string(),
            ));
        }
        seen.windows(2).all(|w| w[0] == w[1]).then_some(seen)
    })
    .await;
    // The copy they agree on is the newest acknowledged write (last writer
    // wins), and a quorum read returns it.
    assert_eq!(
        (values[0].0.as_str(), values[0].1.as_str()),
        (newest.0.as_str(), newest.1.to_string().as_str())
    );
    let (_, quorum) = cluster.workers[0]
        .get("/kv?key=contended&consistency=quorum")
        .await;
    assert_eq!(quorum["value"].as_str(), Some(newest.0.as_str()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_survives_rebalancing_without_resurrection() {
    let mut cluster = Cluster::start(4).await;
    let url = cluster.workers[0].url("/kv");
    for key in ["doomed", "kept"] {
        let (status, _) = http("PUT", &url, put_body(key, "v1")).await;
        assert_eq!(status, 200);
    }
    let (status, reply) = http("DELETE", &cluster.workers[1].url("/kv?key=doomed"), "").await;
    assert_eq!((status, reply["deleted"].as_bool()), (200, Some(true)));
    let owners = cluster.mapping("doomed").await;
    // The primary dies as soon as the delete is acknowledged (the third
    // owner may not hold the tombstone yet, and the value still is there):
    // the survivors rebalance; the value must not return.
    cluster.stop(&owners[0]).await;
    cluster.settled().await;
    let new_owners = cluster.mapping("doomed").await;
    let keeper = cluster.worker(&cluster.mapping("kept").await[0]);
    eventually("rebalancing to have moved the live key", || async {
        let mut all = true;
        for id in cluster.mapping("kept").await {
            all &= cluster.worker(&id).local("kept").await.is_some();
        }
        all.then_some(())
    })
    .await;
    for id in &new_owners {
        assert_eq!(
            cluster.worker(id).local("doomed").await,
            None,
            "{id} resurrected the deleted key"
        );
    }
    let (status, _) = keeper.get("/kv?key=doomed&consistency=quorum").await;
    assert_eq!(status, 404);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_survive_a_failure_on_all_three_owners_and_a_join_rebalances_them() {
    let n = 10_000;
    let mut cluster = Cluster::start(4).await;
    write_keys(&cluster, n).await;

    // One worker stops: every key ends up on each of its three owners.
    cluster.stop("worker2").await;
    cluster.settled().await;
    let ring3 = ring(&cluster);
    let per_worker = |ring: &Ring| {
        let mut owned: HashMap<String, u64> = HashMap::new();
        for i in 0..n {
            for owner in ring.owners(format!("key:{i}").as_bytes(), 3) {
                *owned.entry(owner.to_string()).or_default() += 1;
            }
        }
        owned
    };
    let expected = per_worker(&ring3);
    eventually("every survivor to hold every key it owns", || async {
        (held(&cluster).await == expected).then_some(())
    })
    .await;
    for i in (0..n).step_by(7) {
        let key = format!("key:{i}");
        for owner in ring3.owners(key.as_bytes(), 3) {
            let value = cluster.worker(owner).local(&key).await;
            assert_eq!(
                value.as_deref(),
                Some(format!("value-{i}").as_str()),
                "{key} on {owner}"
            );
        }
    }

    // A worker joins: it receives its share; the others drop what they no
    // longer own, so each holds exactly what the ring gives it.
    cluster.add("worker5").await;
    cluster.settled().await;
    let ring4 = ring(&cluster);
    let expected = per_worker(&ring4);
    eventually(
        "the new worker's share to arrive and displaced copies to go",
        || async { (held(&cluster).await == expected).then_some(()) },
    )
    .await;
    for i in (0..n).step_by(11) {
        let key = format!("key:{i}");
        for owner in ring4.owners(key.as_bytes(), 3) {
            assert!(
                cluster.worker(owner).local(&key).await.is_some(),
                "{key} missing on {owner}"
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_read_asks_the_third_owner_when_one_of_the_first_two_is_dead() {
    let mut cluster = Cluster::start(3).await;
    let (status, reply) = http(
        "PUT",
        &cluster.workers[0].url("/kv"),
        put_body("hedged", "v1"),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let owners = cluster.mapping("hedged").await;
    eventually("the third copy", || async {
        (cluster.worker(&owners[2]).local("hedged").await.as_deref() == Some("v1")).then_some(())
    })
    .await;
    // The first replica dies; the controller has not noticed yet, so the
    // primary asks it (with itself) first, and must fall back on the third.
    cluster.stop(&owners[1]).await;
    let url = cluster
        .worker(&owners[0])
        .url("/kv?key=hedged&consistency=quorum");
    let (status, reply) = http("GET", &url, "").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["value"], "v1", "{reply}");
    cluster.shutdown().await;
}

/// A key whose owners all went down at once reads as unavailable (503,
/// naming them), not as absent: its copies may come back with them. Keys a
/// live worker holds read as ever, and once the controller forgets the
/// dead workers, a key none of the living holds is absent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_owners_are_all_down_is_unavailable_until_they_are_forgotten() {
    let mut cluster =
        Cluster::start_with_controller(4, |c| c.forget_after = Duration::from_secs(3)).await;
    write_keys(&cluster, 100).await;
    let ring = ring(&cluster);
    let owned_by = |key: &str| ring.owners(key.as_bytes(), 3).contains(&"worker1");
    let first = |prefix: &str, with_worker1: bool| {
        (0..)
            .map(|i| format!("{prefix}:{i}"))
            .find(|k| owned_by(k) == with_worker1)
            .unwrap()
    };
    let (lost, kept) = (first("key", false), first("key", true));
    let (never, never_here) = (first("never", false), first("never", true));
    for id in ["worker2", "worker3", "worker4"] {
        cluster.stop(id).await;
    }
    cluster.settled().await;
    let read = |key: String| {
        let url = cluster
            .worker("worker1")
            .url(&format!("/kv?key={key}&consistency=quorum"));
        async move { http("GET", &url, "").await }
    };
    for key in [&lost, &never] {
        let (status, reply) = read(key.clone()).await;
        assert_eq!(status, 503, "{key}: {reply}");
        let error = reply["error"].as_str().unwrap();
        assert!(error.contains("are all down"), "{key}: {error}");
        for id in ["worker2", "worker3", "worker4"] {
            assert!(error.contains(id), "{key}: {error}");
        }
    }
    let (status, reply) = read(kept.clone()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["value"], format!("value-{}", &kept["key:".len()..]));
    let (status, reply) = read(never_here).await;
    assert_eq!(status, 404, "{reply}");
    // Forgotten: the copies are given up on.
    eventually("the dead workers to be forgotten", || async {
        (read(lost.clone()).await.0 == 404).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

/// A client that reads two owners itself (`Consistency::Owner`) gets each
/// owner's own copy, tombstones included, when the epoch it names is the
/// owner's and the owner holds its share of it; otherwise (another epoch,
/// a worker that does not own the key) the worker coordinates the read
/// and answers it whole, as a quorum read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_answers_with_its_own_copy_only_at_its_own_epoch() {
    let cluster = Cluster::start(4).await;
    let epoch = cluster.ready().await;
    let (status, reply) = http("PUT", &cluster.workers[0].url("/kv"), put_body("own", "v1")).await;
    assert_eq!(status, 200, "{reply}");
    let owners = cluster.mapping("own").await;
    let outsider = (cluster.workers.iter())
        .find(|w| !owners.contains(&w.id))
        .unwrap();
    let value = |answer: &Response| match answer {
        Response::OwnCopy(Some(e)) | Response::Value(Some(e)) => e.value.clone(),
        _ => None,
    };
    for id in &owners {
        // Each owner, once its rebalance into the epoch is done.
        let answer = eventually("an owner's own copy", || async {
            let answer = cluster.worker(id).own_copy("own", epoch).await;
            matches!(answer, Response::OwnCopy(Some(_))).then_some(answer)
        })
        .await;
        assert_eq!(value(&answer).as_deref(), Some(&b"v1"[..]), "{id}");
    }
    // A client's read asks two owners and counts as one operation, at the
    // primary.
    let primary = cluster.worker(&owners[0]);
    let replica = cluster.worker(&owners[1]);
    let counted = || async {
        (
            primary.metric("kv_worker_client_ops_total").await,
            replica.metric("kv_worker_client_ops_total").await,
        )
    };
    let before = counted().await;
    primary.own_copy("own", epoch).await;
    replica.own_copy("own", epoch).await;
    assert_eq!(counted().await, (before.0 + 1, before.1));
    for other in [epoch - 1, epoch + 1] {
        let answer = primary.own_copy("own", other).await;
        assert!(
            matches!(answer, Response::Value(_)),
            "epoch {other}: {answer:?}"
        );
        assert_eq!(value(&answer).as_deref(), Some(&b"v1"[..]));
    }
    let answer = outsider.own_copy("own", epoch).await;
    assert!(matches!(answer, Response::Value(_)), "{answer:?}");
    assert_eq!(value(&answer).as_deref(), Some(&b"v1"[..]));

    // A delete: the owners hold a tombstone, which a client must see to
    // compare; a coordinated read says absent.
    let (status, _) = http("DELETE", &primary.url("/kv?key=own"), "").await;
    assert_eq!(status, 200);
    match primary.own_copy("own", epoch).await {
        Response::OwnCopy(Some(tombstone)) => assert_eq!(tombstone.value, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(outsider.own_copy("own", epoch).await, Response::Value(None));
    let never = (0..)
        .map(|i| format!("never:{i}"))
        .find(|k| ring(&cluster).owners(k.as_bytes(), 3)[0] == owners[0])
        .unwrap();
    assert_eq!(
        primary.own_copy(&never, epoch).await,
        Response::OwnCopy(None)
    );
    cluster.shutdown().await;
}

/// A worker that joins answers clients' reads of its own copies only once
/// it holds its share: while it pulls its keys in, it coordinates the
/// reads, which find them on the owners before it. Else a read of two
/// owners, one of them the joiner, could miss a key the other lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_owner_coordinates_reads_until_it_holds_its_share() {
    let mut cluster = Cluster::start(3).await;
    let client = kv_client::Client::connect(
        &format!("http://{}", cluster.controller.http),
        kv_client::Credentials::new("kv", "test"),
    )
    .await
    .unwrap();
    let keys: Vec<(String, bytes::Bytes)> = (0..20_000)
        .map(|i| (format!("join:{i}"), bytes::Bytes::from(format!("v{i}"))))
        .collect();
    assert!(client.put_many(&keys).await.iter().all(Result::is_ok));
    cluster.add("worker4").await;
    let joiner = cluster.worker("worker4");
    let epoch = eventually("the joiner in the ring", || async {
        let (_, health) = joiner.get("/healthz").await;
        (health["in_ring"] == true).then(|| health["epoch"].as_u64().unwrap())
    })
    .await;
    let ring = ring(&cluster);
    let mine: Vec<&str> = (keys.iter().map(|(k, _)| k.as_str()))
        .filter(|k| ring.owners(k.as_bytes(), 3)[..2].contains(&"worker4"))
        .collect();
    let (mut own, mut coordinated) = (0, 0);
    for key in mine.iter().cycle() {
        match joiner.own_copy(key, epoch).await {
            Response::OwnCopy(Some(_)) => own += 1,
            Response::Value(Some(_)) => coordinated += 1,
            other => {
                panic!("{key} at epoch {epoch}: {other:?} (own {own}, coordinated {coordinated})")
            }
        }
        if own >= 100 {
            break;
        }
    }
    cluster.shutdown().await;
}
