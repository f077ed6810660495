//! The admin HTTP API on an ephemeral port: every endpoint and every error.
#![allow(clippy::unwrap_used)]

use kv_testkit::fake::*;
use kv_wire::Ring;
use std::time::Duration;

#[tokio::test]
async fn every_bad_input_gets_a_json_error_with_the_right_status() {
    let c = Controller::start(Duration::ZERO).await;
    let register = c.url("/register");
    let valid = r#"{"id":"worker1","host":"127.0.0.1","port":8001,"wire_port":8002}"#;
    let long_key = format!("/mapping?key={}", "k".repeat(1025));
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        ("POST", register.clone(), b"{not json".to_vec(), 400, "invalid registration"),
        ("POST", register.clone(), br#"{"id":"w"}"#.to_vec(), 400, "missing field"),
        ("POST", register.clone(), br#"{"id":"","host":"h","port":1,"wire_port":2}"#.to_vec(), 400, "\"id\" must not be empty"),
        ("POST", register.clone(), br#"{"id":"w","host":"h","port":0,"wire_port":2}"#.to_vec(), 400, "\"port\" must be"),
        ("POST", register.clone(), br#"{"id":"w","host":"h","port":70000,"wire_port":2}"#.to_vec(), 400, "invalid registration"),
        ("POST", register.clone(), br#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]"#.to_vec(), 400, "invalid registration"),
        ("POST", register.clone(), vec![0xff, 0xfe, b'{'], 400, "invalid registration"),
        ("POST", register.clone(), vec![b' '; 70_000], 413, "larger than"),
        ("GET", register.clone(), vec![], 405, "not allowed"),
        ("DELETE", c.url("/nodes"), vec![], 405, "not allowed"),
        ("GET", c.url("/no/such/route"), vec![], 404, "no route /no/such/route"),
        ("GET", c.url("/mapping"), vec![], 400, "missing query parameter \"key\""),
        ("GET", c.url("/mapping?key="), vec![], 400, "key must not be empty"),
        ("GET", c.url(&long_key), vec![], 400, "1024 bytes"),
        ("GET", c.url("/mapping?key=user123"), vec![], 503, "retry"),
        ("POST", c.url("/leave"), b"{not json".to_vec(), 400, "invalid leave"),
        ("POST", c.url("/leave"), br#"{"id":"w"}"#.to_vec(), 400, "missing field"),
        ("POST", c.url("/leave"), br#"{"id":"nobody","generation":1}"#.to_vec(), 404, "register first"),
        ("GET", c.url("/leave"), vec![], 405, "not allowed"),
        ("GET", c.url("/cluster/key"), vec![], 400, "missing query parameter \"key\""),
        ("GET", c.url("/cluster/key?key="), vec![], 400, "key must not be empty"),
        ("GET", c.url("/cluster/key?key=user123"), vec![], 503, "no worker is live"),
        ("POST", c.url("/cluster"), vec![], 405, "not allowed"),
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
    // Nothing above registered anyone; the valid body does.
    let (_, nodes) = c.get("/nodes").await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 0);
    let (status, _) = http("POST", &register, valid).await;
    assert_eq!(status, 200);
    let (status, reply) = http(
        "POST",
        &c.url("/leave"),
        r#"{"id":"worker1","generation":9}"#,
    )
    .await;
    assert_eq!(status, 409, "another incarnation's leave: {reply}");
    let (status, health) = c.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    c.stop().await;
}

#[tokio::test]
async fn nodes_and_mapping_follow_the_contract() {
    // worker5 registers but never sends a heartbeat: with the default
    // down-after it would turn SUSPECT 0.5 s later, on a slow machine
    // before /nodes is read. A minute keeps every status here UP.
    let c = Controller::start_configured(|config| {
        config.grace = Duration::ZERO;
        config.down_after = Duration::from_secs(60);
    })
    .await;
    let mut workers = Vec::new();
    for id in ["worker3", "worker1", "worker4", "worker2"] {
        workers.push(FakeWorker::start(&c, id).await);
    }
    let reply = register(c.addr, "worker5", 9, Some(7), None).await;
    assert_eq!(reply["id"], "worker5");
    assert_eq!(
        reply["heartbeat_port"].as_u64(),
        Some(u64::from(c.addr.port()))
    );
    assert_eq!(reply["heartbeat_interval_ms"].as_u64(), Some(200));
    assert!(
        reply["epoch"].as_u64().unwrap() >= 7,
        "a presented epoch raises the controller's: {reply}"
    );

    let (status, nodes) = c.get("/nodes").await;
    assert_eq!(status, 200);
    let list = nodes["nodes"].as_array().unwrap();
    let ids: Vec<_> = list.iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["worker1", "worker2", "worker3", "worker4", "worker5"]);
    for n in list {
        assert_eq!(n["status"], "UP");
        assert_eq!(n["host"], "127.0.0.1");
        for field in ["port", "wire_port", "generation", "last_heartbeat_ms_ago"] {
            assert!(n[field].is_u64(), "{field} in {n}");
        }
        let stamp = n["last_heartbeat"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(stamp).is_ok(), "{stamp}");
    }

    // The mapping agrees with the shared ring over the live workers.
    let (status, mapping) = eventually("a mapping over five workers", || async {
        let (status, m) = c.get("/mapping?key=user123").await;
        (status == 200
            && m["workers"].as_array().unwrap().len() == 3
            && m["epoch"].as_u64() > Some(7))
        .then_some((status, m))
    })
    .await;
    assert_eq!(status, 200);
    let ring = Ring::new(ids.iter().copied());
    let expected = ring.owners(b"user123", 3);
    assert_eq!(mapping["key"], "user123");
    assert_eq!(mapping["workers"], serde_json::json!(expected));
    assert_eq!(mapping["primary"]["id"], expected[0]);
    assert_eq!(mapping["replicas"][0]["id"], expected[1]);
    assert_eq!(mapping["replicas"][1]["id"], expected[2]);
    assert_eq!(mapping["primary"]["status"], "UP");

    // Keys are text, URL-decoded.
    let (_, spaced) = c.get("/mapping?key=a%20b%2Fc").await;
    assert_eq!(spaced["key"], "a b/c");
    c.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let c = Controller::start(Duration::ZERO).await;
    let (status, text) = http_raw("GET", &c.url("/metrics"), Default::default()).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(text.to_vec()).unwrap();
    for name in [
        "kv_controller_heartbeats_total",
        "kv_controller_epoch",
        "# EOF",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    c.stop().await;
}

#[tokio::test]
async fn a_fresh_controller_maps_keys_as_soon_as_a_worker_registered_even_in_its_grace() {
    let c = Controller::start(Duration::from_secs(600)).await;
    let _worker = FakeWorker::start(&c, "worker1").await;
    let (status, mapping) = eventually("a mapping", || async {
        let (status, m) = c.get("/mapping?key=user123").await;
        (status == 200).then_some((status, m))
    })
    .await;
    assert_eq!((status, &mapping["workers"][0]), (200, &"worker1".into()));
    c.stop().await;
}

#[tokio::test]
async fn down_workers_are_forgotten_after_forget_after_with_their_reason_shown_until_then() {
    let c = Controller::start_configured(|c| {
        c.grace = Duration::ZERO;
        c.forget_after = Duration::from_secs(2);
    })
    .await;
    let stays = FakeWorker::start(&c, "worker1").await;
    let goes = FakeWorker::start(&c, "worker2").await;
    goes.beating
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let reason = eventually("worker2 DOWN", || async {
        let (_, nodes) = c.get("/nodes").await;
        let node = nodes["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == "worker2")?
            .clone();
        (node["status"] == "DOWN").then(|| node["reason"].clone())
    })
    .await;
    assert_eq!(reason, "silent");
    eventually("worker2 forgotten", || async {
        let (_, nodes) = c.get("/nodes").await;
        let ids: Vec<_> = nodes["nodes"]
            .as_array()?
            .iter()
            .map(|n| n["id"].clone())
            .collect();
        (ids == ["worker1"]).then_some(())
    })
    .await;
    assert_eq!(c.status("worker1").await.as_deref(), Some("UP"));
    drop((stays, goes));
    c.stop().await;
}

#[tokio::test]
async fn slow_workers_do_not_stall_cluster_and_are_shown_as_slow() {
    // Every request gathers afresh.
    let c = Controller::start_configured(|config| {
        config.grace = Duration::ZERO;
        config.cluster_refresh = Duration::ZERO;
    })
    .await;
    // Fake workers heartbeat but never answer how they are doing.
    let mut fakes = Vec::new();
    for i in 0..3 {
        fakes.push(FakeWorker::start(&c, &format!("slow{i}")).await);
    }
    eventually("three UP in /cluster", || async {
        let (_, body) = c.get("/cluster").await;
        (body["counts"]["UP"] == 3).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let (status, body) = c.get("/cluster").await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    // Every worker is asked at once, each for at most 500 ms.
    assert!(
        took < Duration::from_secs(3),
        "/cluster took {took:?} with three slow workers"
    );
    let workers = body["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{body}");
    for w in workers {
        assert_eq!(w["status"], "UP", "{w}");
        assert_eq!(w["answer"], "slow", "{w}");
        assert!(
            w["error"].as_str().unwrap().contains("no answer within"),
            "{w}"
        );
        assert!(w["share"].as_f64().unwrap() > 0.2, "{w}");
    }
    assert_eq!(body["ring"]["segments"].as_array().unwrap().len(), 360);
    let kinds: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"registered") && kinds.contains(&"epoch"),
        "{kinds:?}"
    );
    // The key lookup names the owners even when none of them answers.
    let (status, lookup) = c.get("/cluster/key?key=user123").await;
    assert_eq!(status, 200, "{lookup}");
    let owners = lookup["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 3, "{lookup}");
    assert!(owners.iter().all(|o| o["error"].is_string()), "{lookup}");
    // The page itself.
    let (status, page) = http_raw("GET", &c.url("/ui"), Default::default()).await;
    assert_eq!(status, 200);
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(page.contains("fetch(\"/cluster\"") && page.contains("setInterval(refresh, 1000)"));
    drop(fakes);
}
