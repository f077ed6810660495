//! The worker's HTTP contract: every bad input gets a JSON error with the
//! right status, and the cluster's limits answer 503 with what to do.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_json_error_with_the_right_status() {
    let cluster = Cluster::start(3).await;
    let w = &cluster.workers[0];
    let kv = w.url("/kv");
    let big_value = "v".repeat(kv_wire::DEFAULT_MAX_VALUE_LEN + 1);
    let long_key = "k".repeat(1025);
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        ("PUT", kv.clone(), b"{oops".to_vec(), 400, "invalid body"),
        (
            "PUT",
            kv.clone(),
            br#"{"key":"a"}"#.to_vec(),
            400,
            "missing field `value`",
        ),
        (
            "PUT",
            kv.clone(),
            br#"{"key":"a","value":7}"#.to_vec(),
            400,
            "invalid body",
        ),
        (
            "PUT",
            kv.clone(),
            br#"{"key":"","value":"x"}"#.to_vec(),
            400,
            "key must not be empty",
        ),
        (
            "PUT",
            kv.clone(),
            put_body(&long_key, "x").into_bytes(),
            400,
            "1024 bytes",
        ),
        (
            "PUT",
            kv.clone(),
            put_body("a", &big_value).into_bytes(),
            413,
            "limit is 1048576 bytes",
        ),
        (
            "PUT",
            kv.clone(),
            vec![b' '; 7 * 1024 * 1024],
            413,
            "too large",
        ),
        ("PUT", kv.clone(), vec![0xff, 0xfe], 400, "invalid body"),
        (
            "PUT",
            kv.clone(),
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            400,
            "invalid body",
        ),
        (
            "PUT",
            kv.clone(),
            br#"{"key":"a","value":"\ud800"}"#.to_vec(),
            400,
            "invalid body",
        ),
        (
            "GET",
            kv.clone(),
            vec![],
            400,
            "missing query parameter \"key\"",
        ),
        (
            "GET",
            w.url("/kv?key="),
            vec![],
            400,
            "key must not be empty",
        ),
        (
            "GET",
            w.url("/kv?key=a&consistency=strong"),
            vec![],
            400,
            "\"strong\" is not one of",
        ),
        ("GET", w.url("/kv?key=absent"), vec![], 404, "key not found"),
        (
            "GET",
            w.url("/kv?key=absent&consistency=quorum"),
            vec![],
            404,
            "key not found",
        ),
        (
            "DELETE",
            kv.clone(),
            vec![],
            400,
            "missing query parameter \"key\"",
        ),
        ("POST", kv.clone(), vec![], 405, "not allowed"),
        (
            "GET",
            w.url("/nothing/here"),
            vec![],
            404,
            "no route /nothing/here",
        ),
    ];
    for (method, url, body, status, says) in cases {
        let (got, reply) = http(method, &url, body).await;
        let error = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {url}: no JSON error in {reply}"));
        assert_eq!(got, status, "{method} {url}: {error}");
        assert!(
            error.contains(says),
            "{method} {url}: {error:?} does not say {says:?}"
        );
    }
    // Still healthy, and nothing was written by any of it.
    let (status, health) = w.get("/healthz").await;
    assert_eq!((status, health["keys"].as_u64()), (200, Some(0)));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_worker_refuses_writes_it_cannot_replicate() {
    let cluster = Cluster::start(1).await;
    let (status, reply) = http("PUT", &cluster.workers[0].url("/kv"), put_body("k", "v")).await;
    assert_eq!(status, 503);
    assert_eq!(reply["error"], "write quorum not reached: 1 of 2");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_topology_says_so() {
    // The controller address answers nothing: the worker never registers.
    let nowhere = nowhere();
    // A request waits for the first topology up to the write timeout.
    let w = start_worker_with("orphan", &nowhere, |c| {
        c.write_timeout = std::time::Duration::from_millis(200)
    })
    .await;
    let (status, reply) = eventually("the worker to serve HTTP", || async {
        let url = w.url("/kv");
        let request = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            http("PUT", &url, put_body("k", "v")),
        );
        request.await.ok()
    })
    .await;
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("no topology"),
        "{reply}"
    );
    w.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_failure_on_the_primary_reaches_a_client_of_another_worker_as_spec_words_it() {
    let mut cluster = Cluster::start(4).await;
    let owners = cluster.mapping("lonely").await;
    let via = cluster
        .workers
        .iter()
        .find(|w| !owners.contains(&w.id))
        .unwrap()
        .url("/kv");
    // Both replicas die; before the controller notices, the primary can
    // store the write only on itself.
    cluster.stop(&owners[1]).await;
    cluster.stop(&owners[2]).await;
    let (status, reply) = http("PUT", &via, put_body("lonely", "v")).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"], "write quorum not reached: 1 of 2");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_arrives_before_the_first_topology_waits_for_it() {
    let cluster = Cluster::start(2).await;
    // A worker whose controller never answers has no topology: it stands
    // for one that has just started, which clients may see UP before the
    // controller's push reaches it.
    let late = start_worker_with("late", &nowhere(), |c| {
        c.write_timeout = std::time::Duration::from_secs(20)
    })
    .await;
    eventually("the late worker to serve HTTP", || async {
        (late.get("/healthz").await.0 == 200).then_some(())
    })
    .await;
    let url = late.url("/kv");
    let put = tokio::spawn(async move { http("PUT", &url, put_body("early", "bird")).await });
    // Let the write reach the worker before its topology does (without the
    // wait it would fail with "no topology" at once, and this test with it).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!put.is_finished(), "{:?}", put.await);
    // The controller's topology, pushed as the controller pushes it.
    let (_, nodes) = cluster.controller.get("/nodes").await;
    let members = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| kv_wire::Member {
            id: n["id"].as_str().unwrap().into(),
            host: n["host"].as_str().unwrap().into(),
            port: n["port"].as_u64().unwrap() as u16,
            wire_port: n["wire_port"].as_u64().unwrap() as u16,
            generation: n["generation"].as_u64().unwrap(),
        })
        .collect();
    let topology = kv_wire::Topology {
        epoch: nodes["epoch"].as_u64().unwrap(),
        members,
        leaving: Vec::new(),
        down: Vec::new(),
        fresh: Vec::new(),
    };
    let credentials = kv_client::Credentials::new("kv", "controller");
    let conn = kv_client::Connection::connect(
        &late.wire.to_string(),
        &credentials,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    conn.call(kv_wire::Request::Topology(topology))
        .await
        .unwrap();
    let (status, reply) = put.await.unwrap();
    assert_eq!(status, 200, "{reply}");
    let owners = cluster.mapping("early").await;
    eventually("the write on every owner", || async {
        for owner in &owners {
            if cluster.worker(owner).local("early").await.as_deref() != Some("bird") {
                return None;
            }
        }
        Some(())
    })
    .await;
    late.kill().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let cluster = Cluster::start(2).await;
    let (status, text) = cluster.workers[0].get("/metrics").await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap();
    for name in [
        "kv_worker_epoch",
        "kv_worker_rebalances_total",
        "kv_worker_keys",
        "# EOF",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    cluster.shutdown().await;
}
