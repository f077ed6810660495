//! Fault injection on real processes, with a history checker.
//!
//! A controller and four workers run as OS processes (`kvctl node ...`).
//! Writers put keys through the client library while a seeded schedule
//! injects one fault; every acknowledged write is recorded. After the fault
//! and a settle period, the checker reads each key's copy on every live
//! owner: it must be the last acknowledged value, or a later attempt whose
//! outcome was unknown — never older. Each scenario prints its seed
//! (`KV_FAULT_SEED` replays one), operations, acknowledged writes, losses
//! and time to converge.
//!
//! The scenarios run one at a time: several clusters at once would starve
//! each other on a small machine and turn timing into noise.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use kv_client::{Client, HttpClient};
use kv_wire::{Ring, Version};
use serde_json::Value;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PATIENCE: Duration = Duration::from_secs(60);
const WRITERS: usize = 8;
const KEYS_PER_WRITER: usize = 200;
/// Keys written once before the fault and never again: only replication
/// and rebalancing can bring them to their owners after it.
const STILL_KEYS: usize = 2000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill {sig} {pid}"
    );
}

struct Node {
    args: Vec<String>,
    child: Child,
    http: u16,
}

impl Node {
    fn spawn(args: Vec<String>, http: u16, log: &std::path::Path) -> Node {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .arg("node")
            .args(&args)
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::piped()) // the node exits when the test does
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Node { args, child, http }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    controller_port: u16,
    nodes: HashMap<String, Node>,
    logs: std::path::PathBuf,
    http: HttpClient,
}

impl Cluster {
    async fn start(workers: usize) -> Cluster {
        let logs = std::env::temp_dir().join(format!(
            "kv-faults-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&logs).unwrap();
        let controller_port = free_port();
        let mut cluster = Cluster {
            controller_port,
            nodes: HashMap::new(),
            logs,
            http: HttpClient::new(),
        };
        cluster.spawn_controller();
        for i in 1..=workers {
            let (http, wire) = (free_port(), free_port());
            let args = [
                "worker",
                "--id",
                &format!("worker{i}"),
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--wire-listen",
                &format!("127.0.0.1:{wire}"),
                "--advertise-host",
                "127.0.0.1",
                "--controller",
                &cluster.controller_url(),
            ];
            let node = Node::spawn(
                args.iter().map(|s| s.to_string()).collect(),
                http,
                &cluster.logs.join(format!("worker{i}.log")),
            );
            cluster.nodes.insert(format!("worker{i}"), node);
        }
        cluster.wait_all_up(workers).await;
        cluster
    }

    fn controller_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.controller_port)
    }

    fn spawn_controller(&mut self) {
        let args = vec![
            "controller".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.controller_port),
        ];
        let node = Node::spawn(
            args,
            self.controller_port,
            &self.logs.join("controller.log"),
        );
        self.nodes.insert("controller".into(), node);
    }

    /// Starts `name` again with the same flags (same id, a new process).
    fn restart(&mut self, name: &str) {
        let old = self.nodes.remove(name).unwrap();
        let (args, http) = (old.args.clone(), old.http);
        drop(old);
        let node = Node::spawn(args, http, &self.logs.join(format!("{name}.log")));
        self.nodes.insert(name.to_string(), node);
    }

    async fn json(&self, url: &str) -> Option<Value> {
        let (status, body) = self
            .http
            .request("GET".parse().unwrap(), url, Bytes::new())
            .await
            .ok()?;
        (status == 200 || status == 404)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    async fn nodes(&self) -> Vec<(String, String)> {
        let Some(nodes) = self.json(&format!("{}/nodes", self.controller_url())).await else {
            return Vec::new();
        };
        nodes["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["id"].as_str().unwrap().to_string(),
                    n["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn wait_all_up(&self, workers: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let up = self.nodes().await.iter().filter(|(_, s)| s == "UP").count();
            let mut in_ring = 0;
            for (name, node) in &self.nodes {
                if name != "controller" {
                    let health = self
                        .json(&format!("http://127.0.0.1:{}/healthz", node.http))
                        .await;
                    in_ring += usize::from(health.is_some_and(|h| h["in_ring"] == true));
                }
            }
            if up == workers && in_ring == workers {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A worker's own copy of `key`: (version, value).
    async fn local(&self, worker: &str, key: &str) -> Option<(Version, String)> {
        let node = self.nodes.get(worker)?;
        let body = self
            .json(&format!("http://127.0.0.1:{}/kv?key={key}", node.http))
            .await?;
        Some((
            body["version"].as_str()?.parse().ok()?,
            body["value"].as_str()?.to_string(),
        ))
    }

    async fn metric(&self, worker: &str, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.nodes[worker].http);
        let Ok((_, body)) = self
            .http
            .request("GET".parse().unwrap(), &url, Bytes::new())
            .await
        else {
            return 0.0;
        };
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// What the writers saw, per key.
#[derive(Default)]
struct History {
    /// The last acknowledged (version, value).
    acked: HashMap<String, (Version, String)>,
    /// Values tried since the last acknowledgement whose outcome is unknown.
    unknown: HashMap<String, Vec<String>>,
}

struct Load {
    history: Arc<Mutex<History>>,
    ops: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(cluster: &Cluster, seed: u64) -> Load {
        let history = Arc::new(Mutex::new(History::default()));
        let (ops, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let client = Client::connect(&cluster.controller_url(), "kv", "faults")
            .await
            .unwrap();
        let still: Vec<(String, Bytes)> = (0..STILL_KEYS)
            .map(|i| {
                (
                    format!("still:{i}"),
                    Bytes::from(format!("still-{seed}-{i}")),
                )
            })
            .collect();
        for ((key, value), result) in still.clone().into_iter().zip(client.put_many(still).await) {
            let version = result.unwrap();
            history
                .lock()
                .unwrap()
                .acked
                .insert(key, (version, String::from_utf8(value.to_vec()).unwrap()));
        }
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let client = Client::connect(&cluster.controller_url(), "kv", "faults")
                .await
                .unwrap();
            let (history, ops, failed, stop) =
                (history.clone(), ops.clone(), failed.clone(), stop.clone());
            let mut rng = fastrand::Rng::with_seed(seed ^ w as u64);
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Each writer owns its keys: "the last acknowledged write" is well defined.
                    let key = format!("w{w}:k{}", rng.usize(..KEYS_PER_WRITER));
                    seq += 1;
                    let value = format!("{w}-{seq}");
                    ops.fetch_add(1, Ordering::Relaxed);
                    match client.put(&key, Bytes::from(value.clone())).await {
                        Ok(version) => {
                            let mut h = history.lock().unwrap();
                            h.unknown.remove(&key);
                            h.acked.insert(key, (version, value));
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            history
                                .lock()
                                .unwrap()
                                .unknown
                                .entry(key)
                                .or_default()
                                .push(value);
                        }
                    }
                }
            }));
        }
        Load {
            history,
            ops,
            failed,
            stop,
            tasks,
        }
    }

    async fn stop(self) -> (History, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let history = std::mem::take(&mut *self.history.lock().unwrap());
        (
            history,
            self.ops.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Every acknowledged key's copy on every live owner that is older than its
/// last acknowledged write: (key, owner, expected, found).
async fn violations(cluster: &Cluster, history: &History, live: &[String]) -> Vec<String> {
    let ring = Ring::new(live.iter().cloned());
    let mut found = Vec::new();
    for (key, (version, value)) in &history.acked {
        for owner in ring.owners(key.as_bytes(), 3) {
            let copy = cluster.local(owner, key).await;
            let ok = match &copy {
                Some((v, val)) if v == version => val == value,
                Some((v, val)) if v > version => history
                    .unknown
                    .get(key)
                    .is_some_and(|tried| tried.contains(val)),
                _ => false,
            };
            if !ok {
                found.push(format!(
                    "{key} on {owner}: expected {version} {value:?}, found {copy:?}"
                ));
            }
        }
    }
    found
}

/// Waits for convergence; returns the time it took, or the violations left.
async fn converge(
    cluster: &Cluster,
    history: &History,
    live: &[String],
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    loop {
        let left = violations(cluster, history, live).await;
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn seed() -> u64 {
    std::env::var("KV_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

fn report(
    scenario: &str,
    seed: u64,
    ops: u64,
    history: &History,
    failed: u64,
    result: &Result<Duration, Vec<String>>,
) {
    let lost = result.as_ref().err().map_or(0, Vec::len);
    let converged = result
        .as_ref()
        .map_or("never".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!("FAULTS | {scenario} | seed {seed} | {ops} ops | {} acknowledged keys | {failed} unacknowledged | lost {lost} | converged in {converged}", history.acked.len());
    if let Err(left) = result {
        for v in left.iter().take(20) {
            println!("  violation: {v}");
        }
    }
}

/// What a scenario ends with.
struct Settled {
    history: History,
    failed: u64,
    result: Result<Duration, Vec<String>>,
}

/// Stops the load, waits for the copies on the `live` workers to converge,
/// and prints the scenario's line.
async fn settle(
    cluster: &Cluster,
    load: Load,
    live: &[String],
    scenario: &str,
    seed: u64,
) -> Settled {
    let (history, ops, failed) = load.stop().await;
    let result = converge(cluster, &history, live).await;
    report(scenario, seed, ops, &history, failed, &result);
    Settled {
        history,
        failed,
        result,
    }
}

fn workers(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("worker{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_primary_under_steady_writes_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    // Every worker is the primary of some keys under load: kill one.
    let victim = format!("worker{}", rng.usize(1..=4));
    signal(cluster.nodes[&victim].pid(), "-9");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live: Vec<String> = workers(4).into_iter().filter(|w| *w != victim).collect();
    let settled = settle(
        &cluster,
        load,
        &live,
        &format!("kill -9 {victim} under writes"),
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "acknowledged writes lost (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_for_3s_comes_back_and_converges_without_resurrecting_old_values() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    let victim = format!("worker{}", rng.usize(1..=4));
    let pid = cluster.nodes[&victim].pid();
    signal(pid, "-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(pid, "-CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Back in the ring: all four are live owners again.
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        &format!("SIGSTOP {victim} 3 s"),
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "stale or lost copies after a gray failure (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_marks_nobody_down_and_moves_no_data_while_writes_go_on() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = Cluster::start(4).await;
    let moved_before: f64 = {
        let mut sum = 0.0;
        for w in workers(4) {
            sum += cluster.metric(&w, "kv_worker_rebalance_keys_total").await;
        }
        sum
    };
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(cluster.nodes["controller"].pid(), "-9");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart("controller");
    // Through the restart and the new controller's grace period.
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        let down: Vec<_> = cluster
            .nodes()
            .await
            .into_iter()
            .filter(|(_, s)| s == "DOWN")
            .collect();
        assert!(
            down.is_empty(),
            "{down:?} marked DOWN by a restarted controller"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        "controller kill -9 and restart",
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "writes lost across a controller restart (seed {seed})"
    );
    assert_eq!(
        settled.failed, 0,
        "writes failed while the controller was away"
    );
    let mut moved_after = 0.0;
    for w in workers(4) {
        moved_after += cluster.metric(&w, "kv_worker_rebalance_keys_total").await;
    }
    assert_eq!(moved_after, moved_before, "a controller restart moved data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_empty_with_the_same_id_receives_its_share() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    let victim = format!("worker{}", rng.usize(1..=4));
    signal(cluster.nodes[&victim].pid(), "-9");
    cluster.restart(&victim); // a new pod: same id, empty store, new generation
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        &format!("{victim} restarted empty"),
        seed,
    )
    .await;
    assert!(
        settled.result.is_ok(),
        "the restarted worker did not get its share back (seed {seed})"
    );
}

/// Whether any worker but `except` is DOWN now.
async fn others_down(cluster: &Cluster, except: &str) -> Vec<String> {
    cluster
        .nodes()
        .await
        .into_iter()
        .filter(|(id, s)| id != except && s == "DOWN")
        .map(|(id, _)| id)
        .collect()
}

async fn moved(cluster: &Cluster, among: &[String]) -> f64 {
    let mut sum = 0.0;
    for w in among {
        sum += cluster.metric(w, "kv_worker_rebalance_keys_total").await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_worker_loses_nothing_and_never_takes_the_others_down() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    let victim = format!("worker{}", rng.usize(1..=4));
    let pid = cluster.nodes[&victim].pid();
    let all = workers(4);
    let before = moved(&cluster, &all).await;
    // Stopped and continued every second for 20 s.
    let flapping_until = Instant::now() + Duration::from_secs(20);
    let mut stopped = false;
    while Instant::now() < flapping_until {
        signal(pid, if stopped { "-CONT" } else { "-STOP" });
        stopped = !stopped;
        let tick = Instant::now() + Duration::from_secs(1);
        while Instant::now() < tick {
            let down = others_down(&cluster, &victim).await;
            assert!(
                down.is_empty(),
                "{down:?} marked DOWN while {victim} flapped (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if stopped {
        signal(pid, "-CONT");
    }
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &all,
        &format!("{victim} flapping 1 s / 1 s for 20 s"),
        seed,
    )
    .await;
    let moved = moved(&cluster, &all).await - before;
    let mut hints = 0.0;
    for w in &all {
        hints += cluster.metric(w, "kv_worker_hints_total").await;
    }
    println!("FAULTS |   {hints} hints queued for owners that flapped out of the topology");
    println!("FAULTS |   rebalancing moved {moved} keys over 10 flaps of a worker holding about {} copies", 3 * settled.history.acked.len() / 4);
    assert!(
        settled.result.is_ok(),
        "data lost while a worker flapped (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_cpu_causes_no_false_down() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let cluster = Cluster::start(4).await;
    let load = Load::start(&cluster, seed).await;
    // Three busy loops per core, at the same priority as the cluster.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut burners: Vec<Child> = (0..3 * cores)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(10);
    let mut worst = Vec::new();
    while Instant::now() < until {
        worst.extend(others_down(&cluster, "").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for b in &mut burners {
        let _ = b.kill();
        let _ = b.wait();
    }
    let label = format!(
        "CPU saturated ({} busy loops on {cores} cores) for 10 s",
        3 * cores
    );
    let settled = settle(&cluster, load, &workers(4), &label, seed).await;
    let url = format!("{}/metrics", cluster.controller_url());
    let (_, metrics) = cluster
        .http
        .request("GET".parse().unwrap(), &url, Bytes::new())
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        worst.is_empty(),
        "false DOWN under CPU load: {worst:?} (seed {seed})"
    );
    assert!(
        !metrics.contains("to=\"DOWN\""),
        "a DOWN transition happened:\n{metrics}"
    );
    assert!(
        settled.result.is_ok(),
        "data lost under CPU load (seed {seed})"
    );
}
