//! A cluster with a secret, as a user runs it: `kvctl local` given the
//! secret file, kvctl commands with and without it, and a mixed cluster:
//! workers without the secret (or with another) are kept out, and both
//! sides say why in their logs.
#![allow(clippy::unwrap_used)]

use kv_client::HttpClient;
use kv_testkit::local::*;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn kvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A worker process outside `kvctl local`, logging to `log`.
fn worker(id: &str, controller: &str, secret_file: Option<&Path>, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    let mut args = vec![
        "node".to_string(),
        "worker".into(),
        "--id".into(),
        id.into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--wire-listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--advertise-host".into(),
        "127.0.0.1".into(),
        "--controller".into(),
        controller.into(),
    ];
    if let Some(file) = secret_file {
        args.extend(["--cluster-secret-file".into(), file.display().to_string()]);
    }
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(&args)
        .env_remove("KV_CLUSTER_SECRET_FILE")
        .stdin(Stdio::piped()) // it stops when the test drops it
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_secret_serves_its_own_and_keeps_strangers_out() {
    let dir = std::env::temp_dir().join(format!("kv-secret-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    // Whitespace around it, as `echo` and Kubernetes Secrets leave it.
    std::fs::write(&secret, "  local-secret-0123456789\n").unwrap();
    let other = dir.join("other");
    std::fs::write(&other, "another-secret-0123456789").unwrap();
    let short = dir.join("short");
    std::fs::write(&short, "too-short\n").unwrap();
    let secret_flag = secret.to_str().unwrap();

    // A secret under 16 bytes stops kvctl before it starts anything.
    let refused = kvctl(&["--cluster-secret-file", short.to_str().unwrap(), "local"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("at least 16"), "{stderr}");

    let local = Local::start(&["--cluster-secret-file", secret_flag]);
    assert_eq!(local.pids.len(), 5, "{:?}", local.pids);
    let controller = local.controller();

    // kvctl with the secret reads and writes; without it, or with another,
    // it is refused and says why.
    let with = |args: &[&str]| {
        let mut all = vec![
            "--controller",
            &controller,
            "--cluster-secret-file",
            secret_flag,
        ];
        all.extend_from_slice(args);
        kvctl(&all)
    };
    let put = with(&["put", "user123", "hello-k8s"]);
    assert!(put.status.success(), "{put:?}");
    let get = with(&["get", "user123"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello-k8s");
    let without = kvctl(&["--controller", &controller, "put", "stranger", "x"]);
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("requires its cluster secret"), "{stderr}");
    let wrong = kvctl(&[
        "--controller",
        &controller,
        "--cluster-secret-file",
        other.to_str().unwrap(),
        "put",
        "impostor",
        "x",
    ]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && stderr.contains("differs"),
        "{stderr}"
    );

    // Workers without the secret, or with another, never join, and both
    // sides log why.
    let stranger_log = dir.join("stranger.log");
    let impostor_log = dir.join("impostor.log");
    let mut outsiders = [
        worker("stranger", &controller, None, &stranger_log),
        worker("impostor", &controller, Some(&other), &impostor_log),
    ];
    let log_of = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    eventually("the stranger to log its refusal", || async {
        let log = log_of(&stranger_log);
        (log.contains("registration failed")
            && log.contains("requires proof of its cluster secret"))
        .then_some(())
    })
    .await;
    eventually("the impostor to log its refusal", || async {
        log_of(&impostor_log)
            .contains("secrets differ")
            .then_some(())
    })
    .await;
    // Both outsiders retry, from one address: the controller logs one line
    // for that peer (the first refusal), and counts every one.
    let controller_log = local.log("controller");
    let refusal_lines: Vec<&str> = controller_log
        .lines()
        .filter(|l| l.contains("refused") && l.contains("what=\"register\""))
        .collect();
    assert_eq!(refusal_lines.len(), 1, "{controller_log}");
    assert!(
        refusal_lines[0].contains("requires proof of its cluster secret")
            || refusal_lines[0].contains("secrets differ"),
        "{controller_log}"
    );
    let (_, nodes) = json(&HttpClient::new(), &format!("{controller}/nodes")).await;
    let ids: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["worker1", "worker2", "worker3", "worker4"]);
    let (_, metrics) = HttpClient::new()
        .request(
            "GET".parse().unwrap(),
            &format!("{controller}/metrics"),
            Default::default(),
        )
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        metrics.contains(r#"kv_controller_auth_refusals_total{what="register",reason="missing"}"#)
            && metrics
                .contains(r#"kv_controller_auth_refusals_total{what="register",reason="wrong"}"#),
        "{metrics}"
    );

    // The cluster still serves its own.
    let get = with(&["get", "user123"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello-k8s");
    for outsider in &mut outsiders {
        outsider.kill().unwrap();
        outsider.wait().unwrap();
    }
    local.kill().await;
    let _ = std::fs::remove_dir_all(dir);
}
