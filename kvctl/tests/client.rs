//! The client library against an in-process cluster: routing, pipelining,
//! and a retried write across a primary's failure.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use kv_client::{Client, Credentials};
use kv_testkit::inproc::*;

async fn client(cluster: &Cluster) -> Client {
    Client::connect(
        &format!("http://{}", cluster.controller.http),
        Credentials::new("kv", "test"),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_to_the_primary_and_many_share_one_client() {
    let cluster = Cluster::start(4).await;
    let c = client(&cluster).await;
    let version = c.put("user123", Bytes::from("hello")).await.unwrap();
    let owners = cluster.mapping("user123").await;
    let (_, body) = cluster.worker(&owners[0]).get("/kv?key=user123").await;
    assert_eq!(body["version"].as_str(), Some(version.to_string().as_str()));
    assert_eq!(
        c.get("user123").await.unwrap().map(|(v, _)| v),
        Some(Bytes::from("hello"))
    );

    // A thousand writes at once over the client's pipelined connections.
    let writes = (0..1000).map(|i| {
        let c = &c;
        async move {
            c.put(&format!("many:{i}"), Bytes::from(format!("v{i}")))
                .await
        }
    });
    for result in futures::future::join_all(writes).await {
        result.unwrap();
    }
    let items: Vec<(String, Bytes)> = (0..3000)
        .map(|i| (format!("bulk:{i}"), Bytes::from(format!("b{i}"))))
        .collect();
    assert!(c.put_many(&items).await.iter().all(Result::is_ok));
    assert_eq!(
        c.get("bulk:2999").await.unwrap().map(|(v, _)| v),
        Some(Bytes::from("b2999"))
    );
    c.delete("bulk:2999").await.unwrap();
    assert_eq!(c.get("bulk:2999").await.unwrap(), None);
    let refused = c.put("", Bytes::from("x")).await.unwrap_err();
    assert!(
        refused.to_string().contains("key must not be empty"),
        "{refused}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_retried_on_the_new_primary_when_the_old_one_dies() {
    let mut cluster = Cluster::start(4).await;
    let c = client(&cluster).await;
    c.put("survivor", Bytes::from("v1")).await.unwrap();
    let owners = cluster.mapping("survivor").await;
    cluster.stop(&owners[0]).await;
    // The client still routes to the dead primary: the write fails there,
    // and succeeds once the controller has published the new topology.
    c.put("survivor", Bytes::from("v2")).await.unwrap();
    let new_primary = cluster.mapping("survivor").await[0].clone();
    assert_ne!(new_primary, owners[0]);
    assert_eq!(
        cluster
            .worker(&new_primary)
            .local("survivor")
            .await
            .as_deref(),
        Some("v2")
    );
    cluster.shutdown().await;
}

/// A read asks the key's primary and first replica for their copies and
/// takes the newer, wherever it is; with the first replica dead (before
/// the controller notices), an owner coordinates the read and asks the
/// third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_takes_the_newer_of_two_owners_copies_and_gets_past_a_dead_one() {
    let mut cluster = Cluster::start(4).await;
    cluster.ready().await;
    let c = client(&cluster).await;
    let written = c.put("twice", Bytes::from("v1")).await.unwrap();
    let owners = cluster.mapping("twice").await;
    eventually("the third copy", || async {
        cluster.worker(&owners[2]).copy("twice").await.map(|_| ())
    })
    .await;
    let above = |n: u64| kv_wire::Version {
        hlc: written.hlc + n,
        ..written
    };
    let plant = |owner: usize, n: u64, value: Option<&'static str>| {
        cluster.worker(&owners[owner]).plant(kv_wire::Entry {
            key: "twice".into(),
            version: above(n),
            value: value.map(Bytes::from),
        })
    };
    let read = || async { c.get("twice").await.unwrap() };
    plant(1, 1, Some("on-the-first-replica")).await;
    assert_eq!(
        read().await,
        Some((Bytes::from("on-the-first-replica"), above(1)))
    );
    plant(0, 2, Some("on-the-primary")).await;
    assert_eq!(
        read().await,
        Some((Bytes::from("on-the-primary"), above(2)))
    );
    plant(1, 3, None).await;
    assert_eq!(
        read().await,
        None,
        "a newer tombstone on one owner is a delete"
    );
    // The third owner holds v1 only; with the first replica gone the read
    // is the primary's copy and the third's.
    cluster.stop(&owners[1]).await;
    assert_eq!(
        read().await,
        Some((Bytes::from("on-the-primary"), above(2)))
    );
    cluster.shutdown().await;
}

/// A client that only reads learns of a topology change from its reads:
/// owners coordinate a read that names an epoch not theirs, and that
/// sends the client for the new topology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_only_reads_catches_up_with_a_new_topology() {
    let mut cluster = Cluster::start(3).await;
    cluster.ready().await;
    let c = client(&cluster).await;
    c.put("k", Bytes::from("v")).await.unwrap();
    let before = c.epoch();
    cluster.add("worker4").await;
    let after = cluster.ready().await;
    assert!(after > before, "{after} after {before}");
    eventually("the client on the new topology", || async {
        assert_eq!(
            c.get("k").await.unwrap().map(|(v, _)| v),
            Some(Bytes::from("v"))
        );
        (c.epoch() == after).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_now_belongs_to_another_worker_is_refused() {
    let cluster = Cluster::start(2).await;
    let pool = kv_client::Pool::new(
        kv_client::Credentials::new("kv", "test"),
        std::time::Duration::from_secs(5),
    );
    let w = &cluster.workers[0];
    let member = |id: &str| kv_wire::Member {
        id: id.into(),
        host: w.wire.ip().to_string(),
        port: w.http.port(),
        wire_port: w.wire.port(),
        generation: 1,
    };
    let request = || kv_wire::Request::Get {
        key: "k".into(),
        consistency: kv_wire::message::Consistency::Local,
    };
    assert!(pool.call(&member(&w.id), request()).await.is_ok());
    match pool.call(&member("someone-else"), request()).await {
        Err(kv_client::ConnectionError::WrongNode {
            expected, found, ..
        }) => assert_eq!(
            (expected.as_str(), found.as_str()),
            ("someone-else", w.id.as_str())
        ),
        other => panic!("expected WrongNode, got {other:?}"),
    }
    // The same worker at another address (it moved): not the connection
    // pooled for its old one, but one to where it is said to be now — where
    // another worker answers.
    let other = &cluster.workers[1];
    let moved = kv_wire::Member {
        wire_port: other.wire.port(),
        ..member(&w.id)
    };
    match pool.call(&moved, request()).await {
        Err(kv_client::ConnectionError::WrongNode { found, .. }) => assert_eq!(found, other.id),
        other => panic!("expected WrongNode, got {other:?}"),
    }
    assert!(pool.call(&member(&w.id), request()).await.is_ok());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_knows_no_live_worker_waits_for_workers_to_come() {
    // A controller that lists no worker yet, as one just restarted does.
    let controller = start_controller().await;
    let c = Client::connect(
        &format!("http://{}", controller.http),
        Credentials::new("kv", "test"),
    )
    .await
    .unwrap();
    assert!(c.owners("k").is_empty());
    // None come: the client says so once its retry window is over.
    let started = std::time::Instant::now();
    let gave_up = c.put("k", Bytes::from("v")).await.unwrap_err();
    assert!(
        matches!(gave_up, kv_client::ClientError::NoWorkers),
        "{gave_up}"
    );
    assert!(started.elapsed() >= kv_client::client::RETRY_WINDOW);
    // Workers come while a write, a batch and a read wait for them.
    let items: Vec<(String, Bytes)> = (0..100)
        .map(|i| (format!("batch:{i}"), Bytes::from("b")))
        .collect();
    let (put, many, get, workers) = tokio::join!(
        c.put("k", Bytes::from("v")),
        c.put_many(&items),
        c.get("absent"),
        async {
            let mut workers = Vec::new();
            for i in 1..=3 {
                workers.push(start_worker(&format!("worker{i}"), &controller).await);
            }
            workers
        }
    );
    put.unwrap();
    assert!(many.iter().all(Result::is_ok), "{many:?}");
    assert_eq!(get.unwrap(), None);
    assert_eq!(
        c.get("k").await.unwrap().map(|(v, _)| v),
        Some(Bytes::from("v"))
    );
    for w in workers {
        w.kill().await;
    }
}
