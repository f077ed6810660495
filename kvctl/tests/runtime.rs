//! How many threads a node runs on: `--threads` (`KV_THREADS`), else one
//! per CPU the process may use, which follows its affinity and its CPU
//! quota (a pod's `limits.cpu`, compose's `cpus`).
#![allow(clippy::unwrap_used)]

use kv_client::HttpClient;
use kv_testkit::procs::{metric_of, Node};

/// The runtime threads of a worker started under `prefix` with
/// `KV_THREADS` set to `threads` (or unset), as its `/metrics` say.
async fn threads_of(prefix: &[&str], threads: Option<usize>) -> f64 {
    let logs = std::env::temp_dir().join(format!("kv-runtime-{}", fastrand::u32(..)));
    std::fs::create_dir_all(&logs).unwrap();
    let args = [
        "worker",
        "--id",
        "sized",
        "--listen",
        "127.0.0.1:0",
        "--wire-listen",
        "127.0.0.1:0",
        "--advertise-host",
        "127.0.0.1",
        // Nothing listens there: the worker serves /metrics regardless.
        "--controller",
        "http://127.0.0.1:9",
    ];
    let node = Node::spawn_sized(
        prefix.iter().map(|s| s.to_string()).collect(),
        args.iter().map(|s| s.to_string()).collect(),
        "127.0.0.1",
        &logs.join("worker.log"),
        threads,
    )
    .await;
    let threads = metric_of(&HttpClient::new(), &node.url(), "kv_worker_runtime_threads").await;
    drop(node);
    let _ = std::fs::remove_dir_all(&logs);
    threads
}

/// The first CPU this process may run on.
fn first_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    list.trim()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_worker_takes_one_thread_per_cpu_it_may_use_unless_told() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(threads_of(&[], None).await, cpus as f64, "every CPU");
    // Pinned to one CPU, as a CPU quota of one leaves it.
    let one = ["taskset", "-c", &first_cpu()];
    assert_eq!(threads_of(&one, None).await, 1.0, "pinned to one CPU");
    assert_eq!(threads_of(&one, Some(3)).await, 3.0, "--threads 3");
}
