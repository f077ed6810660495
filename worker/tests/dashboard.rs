//! The controller's `/cluster` and `/cluster/key` over a live in-process
//! cluster: what each worker holds, a rebalance while it runs, a key's
//! owners with their versions, and a worker going DOWN.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;
use serde_json::Value;
use std::time::Duration;

const KEYS: usize = 30_000;

fn workers(body: &Value) -> &Vec<Value> {
    body["workers"].as_array().unwrap()
}

fn worker<'a>(body: &'a Value, id: &str) -> &'a Value {
    workers(body).iter().find(|w| w["id"] == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shows_what_workers_hold_a_rebalance_while_it_runs_and_a_down_worker() {
    // Every /cluster asks the workers afresh, so a short rebalance is seen.
    let controller = start_controller_with(|c| c.cluster_refresh = Duration::ZERO).await;
    let mut cluster = Cluster {
        controller,
        workers: Vec::new(),
        secret: None,
        configure: |_| {},
    };
    for i in 1..=3 {
        cluster.add(&format!("worker{i}")).await;
    }
    cluster.settled().await;
    write_keys(&cluster, KEYS).await;

    // What every worker holds: three copies of every key among them.
    let body = eventually(
        "three workers answering, settled, with every copy",
        || async {
            let (_, body) = cluster.controller.get("/cluster").await;
            let keys: u64 = workers(&body)
                .iter()
                .filter_map(|w| w["keys"].as_u64())
                .sum();
            (body["settled"] == true && keys == 3 * KEYS as u64).then_some(body)
        },
    )
    .await;
    let epoch = body["epoch"].as_u64().unwrap();
    assert_eq!(body["counts"]["UP"], 3, "{body}");
    let mut share = 0.0;
    for w in workers(&body) {
        assert_eq!(w["answer"], "ok", "{w}");
        assert_eq!(w["status"], "UP", "{w}");
        assert_eq!(w["ready"], true, "{w}");
        assert_eq!(
            (w["applied_epoch"].as_u64(), w["settled_epoch"].as_u64()),
            (Some(epoch), Some(epoch)),
            "{w}"
        );
        assert!(
            w["bytes"].as_u64().unwrap() > w["keys"].as_u64().unwrap() * 10,
            "{w}"
        );
        assert!(w["rebalance"].is_null(), "{w}");
        share += w["share"].as_f64().unwrap();
    }
    assert!((share - 1.0).abs() < 1e-6, "{share}");

    // A join: the joiner's rebalance shows while it runs, with its figures.
    cluster.add("worker4").await;
    let running = eventually("a rebalance in progress", || async {
        let (_, body) = cluster.controller.get("/cluster").await;
        let r = workers(&body).iter().find_map(|w| {
            let r = &w["rebalance"];
            let busy = r["keys_to_go"].as_u64()? + r["keys_moved"].as_u64()? > 0;
            busy.then(|| (w["id"].clone(), r.clone()))
        });
        r.filter(|_| body["settled"] == false)
    })
    .await;
    assert!(running.1["epoch"].as_u64().unwrap() > epoch, "{running:?}");
    let body = eventually("settled on four workers", || async {
        let (_, body) = cluster.controller.get("/cluster").await;
        let ready = workers(&body).iter().all(|w| w["ready"] == true);
        (body["settled"] == true && workers(&body).len() == 4 && ready).then_some(body)
    })
    .await;
    assert!(
        worker(&body, "worker4")["keys"].as_u64().unwrap() > KEYS as u64 / 2,
        "{body}"
    );
    let joined = body["events"].as_array().unwrap().iter().find(|e| {
        e["kind"] == "rebalance" && e["worker"] == "worker4" && e["keys"].as_u64() > Some(0)
    });
    assert!(
        joined.is_some(),
        "no rebalance of worker4 in {}",
        body["events"]
    );

    // A key's owners, primary first, each with the same version.
    let owners = cluster.mapping("key:7").await;
    let (status, lookup) = cluster.controller.get("/cluster/key?key=key:7").await;
    assert_eq!(status, 200, "{lookup}");
    let listed: Vec<&str> = lookup["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, owners, "{lookup}");
    let version = &lookup["owners"][0]["version"];
    assert!(version.is_string(), "{lookup}");
    for o in lookup["owners"].as_array().unwrap() {
        assert_eq!(&o["version"], version, "{lookup}");
        assert_eq!(
            (o["deleted"].clone(), o["bytes"].clone()),
            (Value::Bool(false), Value::from(7)),
            "{lookup}"
        );
    }
    let (_, missing) = cluster
        .controller
        .get("/cluster/key?key=never-written")
        .await;
    assert!(
        missing["owners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["version"].is_null()),
        "{missing}"
    );

    // A worker killed: DOWN, not asked, and the change in the events.
    cluster.stop("worker2").await;
    let body = eventually("worker2 DOWN in /cluster", || async {
        let (_, body) = cluster.controller.get("/cluster").await;
        (worker(&body, "worker2")["status"] == "DOWN").then_some(body)
    })
    .await;
    assert_eq!(body["counts"]["DOWN"], 1, "{body}");
    assert_eq!(worker(&body, "worker2")["answer"], "not asked", "{body}");
    let down = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "status" && e["worker"] == "worker2" && e["to"] == "DOWN");
    assert!(down.is_some(), "{}", body["events"]);
    cluster.shutdown().await;
}
