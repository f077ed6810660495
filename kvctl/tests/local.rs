//! `kvctl local` as a user runs it: a real process tree, driven over HTTP
//! through the seed demo's story, then killed without leaving a node behind.
#![allow(clippy::unwrap_used)]

use kv_client::HttpClient;
use kv_testkit::local::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_local_runs_the_demo_and_leaves_no_orphans() {
    let local = Local::start(&[]);
    let pids = local.pids.clone();
    assert_eq!(pids.len(), 5, "{pids:?}");

    let http = HttpClient::new();
    let controller = local.controller();
    let (_, nodes) = json(&http, &format!("{controller}/nodes")).await;
    let statuses: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["UP"; 4]);
    // "Ready" means ready: every worker in the ring with its first sync done.
    for id in ["worker1", "worker2", "worker3", "worker4"] {
        let url = format!("http://127.0.0.1:{}/readyz", local.http_port(id));
        let (status, ready) = json(&http, &url).await;
        assert_eq!(status, 200, "{id} is not ready: {ready}");
        assert_eq!(ready["epoch"], nodes["epoch"], "{id}: {ready}");
    }

    let (_, mapping) = json(&http, &format!("{controller}/mapping?key=user123")).await;
    let owners: Vec<String> = mapping["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    let port_of = |id: &str| local.http_port(id);
    let body = r#"{"key":"user123","value":"hello-k8s"}"#;
    let (status, _) = http
        .request(
            "PUT".parse().unwrap(),
            &format!("http://127.0.0.1:{}/kv", port_of(&owners[0])),
            body.into(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    for id in &owners {
        let url = format!("http://127.0.0.1:{}/kv?key=user123", port_of(id));
        eventually("the value on every owner", || async {
            (json(&http, &url).await.1["value"] == "hello-k8s").then_some(())
        })
        .await;
    }

    // `kill -9` of the primary: the local "scale to 0".
    let victim = owners[0].clone();
    assert!(Command::new("kill")
        .args(["-9", &pids[&victim].to_string()])
        .status()
        .unwrap()
        .success());
    eventually("the killed worker to be DOWN", || async {
        let (_, nodes) = json(&http, &format!("{controller}/nodes")).await;
        nodes["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["id"] == victim.as_str() && n["status"] == "DOWN")
            .then_some(())
    })
    .await;
    let new_owners: Vec<String> = eventually("a mapping without the killed worker", || async {
        let (_, m) = json(&http, &format!("{controller}/mapping?key=user123")).await;
        let owners: Vec<String> = m["workers"]
            .as_array()?
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        (owners.len() == 3 && !owners.contains(&victim)).then_some(owners)
    })
    .await;
    for id in &new_owners {
        let url = format!("http://127.0.0.1:{}/kv?key=user123", port_of(id));
        eventually("the value on every new owner", || async {
            (json(&http, &url).await.1["value"] == "hello-k8s").then_some(())
        })
        .await;
    }

    // kvctl itself dies hard: its nodes follow, none left behind.
    local.kill().await;
}
