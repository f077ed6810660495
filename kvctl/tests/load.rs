//! `kvctl load`, and kvctl's output into a closed pipe, as processes
//! against an in-process cluster.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;
use std::process::{Command, Stdio};

fn kvctl(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--controller")
        .arg(format!("http://{}", cluster.controller.http))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_load_stores_every_key() {
    let cluster = Cluster::start(3).await;
    let out = tokio::task::block_in_place(|| {
        kvctl(
            &cluster,
            &[
                "load",
                "--generate",
                "5000",
                "--value-size",
                "32",
                "--prefix",
                "gen:",
            ],
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("loaded 5000 keys") && stdout.contains("0 failed"),
        "{stdout}"
    );
    let owners = cluster.mapping("gen:4999").await;
    let (status, body) = cluster.worker(&owners[0]).get("/kv?key=gen:4999").await;
    assert_eq!(
        (status, body["value"].as_str().map(str::len)),
        (200, Some(32))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_file_reports_its_bad_lines_and_loads_the_rest() {
    let cluster = Cluster::start(3).await;
    let path = std::env::temp_dir().join(format!("kvctl-load-{}.txt", std::process::id()));
    let empty_key = r#"{"key":"","value":"x"}"#;
    std::fs::write(
        &path,
        format!(
            "{}\n{}\nno tab here\n\nb\t2\n{{\"key\":\"c\"}}\n{empty_key}\n",
            r#"{"key":"a","value":"1"}"#, "plain\tvalue"
        ),
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| kvctl(&cluster, &["load", path.to_str().unwrap()]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "a partial load must not exit 0");
    assert!(
        stderr.contains("line 3: neither a JSON object nor key<TAB>value"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 6: not a {\"key\",\"value\"} JSON object"),
        "{stderr}"
    );
    assert!(
        stderr.contains("failed : ") && stderr.contains("key must not be empty"),
        "{stderr}"
    );
    assert!(
        stdout.contains("loaded 3 keys") && stdout.contains("1 failed, 2 malformed lines"),
        "{stdout}"
    );
    for (key, value) in [("a", "1"), ("plain", "value"), ("b", "2")] {
        let owners = cluster.mapping(key).await;
        assert_eq!(
            cluster.worker(&owners[0]).local(key).await.as_deref(),
            Some(value)
        );
    }
    let _ = std::fs::remove_file(path);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_whose_reader_went_away_end_quietly() {
    // `kvctl nodes | head -0`: the pipe is closed before kvctl writes.
    let cluster = Cluster::start(3).await;
    let commands: [&[&str]; 3] = [&["nodes"], &["nodes", "--json"], &["mapping", "user123"]];
    for args in commands {
        let out = tokio::task::block_in_place(|| {
            let mut child = Command::new(env!("CARGO_BIN_EXE_kvctl"))
                .arg("--controller")
                .arg(format!("http://{}", cluster.controller.http))
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kvctl {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "kvctl {args:?}: {stderr}");
    }
}
