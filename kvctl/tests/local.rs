//! `kvctl local` as a user runs it: a real process tree, driven over HTTP
//! through the seed demo's story, then killed without leaving a node behind.
#![allow(clippy::unwrap_used)]

use kv_client::HttpClient;
use serde_json::Value;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(60);

/// A base port whose controller and worker ports are all free now.
fn free_base() -> u16 {
    loop {
        let base = 20_000 + 1000 * fastrand::u16(0..40);
        let ports = std::iter::once(base)
            .chain((1..=4).flat_map(|i| [base + 100 * i + 1, base + 100 * i + 2]));
        let free = ports
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .all(|b| b.is_ok());
        if free {
            return base;
        }
    }
}

/// Whether a process is gone (or a zombie awaiting its reaper).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn json(http: &HttpClient, url: &str) -> (u16, Value) {
    let (status, body) = http
        .request("GET".parse().unwrap(), url, Default::default())
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_local_runs_the_demo_and_leaves_no_orphans() {
    let base = free_base();
    let logs = std::env::temp_dir().join(format!("kvctl-local-test-{}", std::process::id()));
    let mut kvctl = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args([
            "local",
            "--base-port",
            &base.to_string(),
            "--logs",
            logs.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = kvctl.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The table, then "Ready.".
    let mut pids = std::collections::HashMap::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("kvctl local did not get ready");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 2 && (fields[0] == "controller" || fields[0].starts_with("worker")) {
            if let Ok(pid) = fields[1].parse::<u32>() {
                pids.insert(fields[0].to_string(), pid);
            }
        }
        if line.starts_with("Ready.") {
            break;
        }
    }
    assert_eq!(pids.len(), 5, "{pids:?}");

    let http = HttpClient::new();
    let controller = format!("http://127.0.0.1:{base}");
    let (_, nodes) = json(&http, &format!("{controller}/nodes")).await;
    let statuses: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["UP"; 4]);

    let (_, mapping) = json(&http, &format!("{controller}/mapping?key=user123")).await;
    let owners: Vec<String> = mapping["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    let port_of =
        |id: &str| base + 100 * id.trim_start_matches("worker").parse::<u16>().unwrap() + 1;
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
    assert!(Command::new("kill")
        .args(["-9", &kvctl.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = kvctl.wait();
    for (name, pid) in &pids {
        eventually(&format!("{name} to exit"), || async {
            gone(*pid).then_some(())
        })
        .await;
    }
    let _ = std::fs::remove_dir_all(logs);
}
