//! The harness of the process-level fault tests: a controller and workers
//! as OS processes (`kvctl node ...`) on loopback or in network namespaces,
//! a seeded write load, and the acknowledged-write checker.

use bytes::Bytes;
use kv_client::{Client, Credentials, HttpClient, Pool};
use kv_wire::message::Consistency;
use kv_wire::{Member, Request, Response, Ring, Version};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
pub const PATIENCE: Duration = Duration::from_secs(60);
pub const WRITERS: usize = 8;
pub const KEYS_PER_WRITER: usize = 200;
/// Keys written once before the fault and never again: only replication
/// and rebalancing can bring them to their owners after it.
pub const STILL_KEYS: usize = 2000;

pub fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill {sig} {pid}"
    );
}

pub struct Node {
    pub args: Vec<String>,
    pub child: Child,
    /// The address its ports are reached at.
    pub host: String,
    /// Its HTTP port (the controller's: HTTP and heartbeats).
    pub http: u16,
    /// Its wire port (0 for the controller).
    pub wire: u16,
    /// The command it runs under (`ip netns exec NS`), if any.
    pub prefix: Vec<String>,
    pub log: std::path::PathBuf,
}

impl Node {
    /// Starts `kvctl node ARGS` (its output appended to `log`) and waits
    /// until it says which ports it listens on. Nodes bind port 0 and
    /// report the port, so no other process can take it between a test
    /// choosing it and the node binding it.
    pub async fn spawn(
        prefix: Vec<String>,
        args: Vec<String>,
        host: &str,
        log: &std::path::Path,
    ) -> Node {
        // One thread each: many nodes share the machine's cores.
        Node::spawn_sized(prefix, args, host, log, Some(1)).await
    }

    /// [`Node::spawn`] with `KV_THREADS` set to `threads`, or unset.
    pub async fn spawn_sized(
        prefix: Vec<String>,
        args: Vec<String>,
        host: &str,
        log: &std::path::Path,
        threads: Option<usize>,
    ) -> Node {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let from = file.metadata().unwrap().len() as usize;
        let kvctl = crate::kvctl_binary().display().to_string();
        let mut argv: Vec<String> = prefix
            .iter()
            .cloned()
            .chain([kvctl, "node".to_string()])
            .chain(args.iter().cloned())
            .collect();
        let program = argv.remove(0);
        let mut command = Command::new(program);
        match threads {
            Some(n) => command.env("KV_THREADS", n.to_string()),
            None => command.env_remove("KV_THREADS"),
        };
        let mut child = command
            .args(&argv)
            .stdin(Stdio::piped()) // the node exits when the test does
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        let line = loop {
            let text = std::fs::read(log).unwrap_or_default();
            let fresh = String::from_utf8_lossy(&text[from.min(text.len())..]).to_string();
            if let Some(line) = fresh.lines().find(|l| l.contains(" listening")) {
                break line.to_string();
            }
            let exited = child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{argv:?} did not start ({exited:?}); its log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let field = |name: &str| -> u16 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        let (http, wire) = match field("http_port") {
            0 => (field("port"), 0),
            http => (http, field("wire_port")),
        };
        assert!(http != 0, "no port in {line:?}");
        Node {
            args,
            child,
            host: host.to_string(),
            http,
            wire,
            prefix,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its HTTP base URL.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.http)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub controller_host: String,
    pub controller_port: u16,
    pub nodes: HashMap<String, Node>,
    pub logs: std::path::PathBuf,
    pub http: HttpClient,
    /// Reads workers' own copies over the wire (tombstones included).
    pub wire: Pool,
    /// The network namespaces the workers run in, if any (removed on drop,
    /// after the nodes).
    pub net: Option<Net>,
    /// Nodes whose process exited ([`Cluster::exited`]), kept so they can
    /// be started again.
    pub gone: HashMap<String, Node>,
    /// Flags every worker gets besides the harness's own; `{data}` stands
    /// for a data dir of the worker's own (under the logs dir).
    pub worker_flags: Vec<String>,
}

impl Cluster {
    /// A controller and `workers` workers on loopback.
    pub async fn start(workers: usize) -> Cluster {
        Cluster::start_on(None, workers, &[]).await
    }

    /// A controller and `workers` workers on loopback, each worker with
    /// `flags` too (`{data}`: its own data dir).
    pub async fn start_with(workers: usize, flags: &[&str]) -> Cluster {
        Cluster::start_on(None, workers, flags).await
    }

    /// A controller on the host side of `net` and each worker in a network
    /// namespace of its own.
    pub async fn start_in(net: Net, workers: usize) -> Cluster {
        Cluster::start_on(Some(net), workers, &[]).await
    }

    async fn start_on(net: Option<Net>, workers: usize, flags: &[&str]) -> Cluster {
        let logs = std::env::temp_dir().join(format!(
            "kv-faults-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&logs).unwrap();
        let controller_host = net.as_ref().map_or("127.0.0.1".to_string(), Net::gateway);
        let mut cluster = Cluster {
            controller_host,
            controller_port: 0,
            nodes: HashMap::new(),
            logs,
            http: HttpClient::new(),
            wire: Pool::new(Credentials::new("kv", "checker"), Duration::from_secs(5)),
            net,
            gone: HashMap::new(),
            worker_flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        cluster.spawn_controller().await;
        for i in 1..=workers {
            cluster.spawn_worker(i).await;
        }
        cluster.wait_all_up(workers).await;
        cluster
    }

    /// Starts worker *i* as `worker{i}` (its own process; in namespace *i*
    /// when the cluster has namespaces).
    pub async fn spawn_worker(&mut self, i: usize) {
        self.spawn_worker_as(i, &format!("worker{i}")).await;
    }

    /// Starts worker *i* under the id `id`: a new pod of worker *i*'s
    /// Deployment, as a rolling restart makes one.
    pub async fn spawn_worker_as(&mut self, i: usize, id: &str) {
        let (host, http, wire, prefix) = match &self.net {
            Some(net) => (
                net.ip(i),
                8001,
                8002,
                vec!["ip".into(), "netns".into(), "exec".into(), net.ns(i)],
            ),
            None => ("127.0.0.1".to_string(), 0, 0, Vec::new()),
        };
        let args = [
            "worker",
            "--id",
            id,
            "--listen",
            &format!("{host}:{http}"),
            "--wire-listen",
            &format!("{host}:{wire}"),
            "--advertise-host",
            &host,
            "--controller",
            &self.controller_url(),
        ];
        let data = self.logs.join("data").join(id).display().to_string();
        let args = args
            .iter()
            .map(|s| s.to_string())
            .chain(self.worker_flags.iter().map(|f| f.replace("{data}", &data)))
            .collect();
        let node = Node::spawn(prefix, args, &host, &self.logs.join(format!("{id}.log"))).await;
        self.nodes.insert(id.to_string(), node);
    }

    pub fn controller_url(&self) -> String {
        format!("http://{}:{}", self.controller_host, self.controller_port)
    }

    /// Starts the controller; a restart binds the port the first one got.
    pub async fn spawn_controller(&mut self) {
        let args = vec![
            "controller".to_string(),
            "--listen".into(),
            format!("{}:{}", self.controller_host, self.controller_port),
        ];
        let log = self.logs.join("controller.log");
        let node = Node::spawn(Vec::new(), args, &self.controller_host.clone(), &log).await;
        self.controller_port = node.http;
        self.nodes.insert("controller".into(), node);
    }

    /// Starts `name` again with the same flags (same id, a new process; a
    /// worker's ports are new, as a new pod's address is).
    pub async fn restart(&mut self, name: &str) {
        let old = self
            .nodes
            .remove(name)
            .or_else(|| self.gone.remove(name))
            .unwrap();
        let (prefix, args, host) = (old.prefix.clone(), old.args.clone(), old.host.clone());
        drop(old);
        if name == "controller" {
            return self.spawn_controller().await;
        }
        let node = Node::spawn(prefix, args, &host, &self.logs.join(format!("{name}.log"))).await;
        self.nodes.insert(name.to_string(), node);
    }

    pub async fn json(&self, url: &str) -> Option<Value> {
        let (status, body) = self
            .http
            .request("GET".parse().unwrap(), url, Bytes::new())
            .await
            .ok()?;
        (status == 200 || status == 404)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    pub async fn nodes(&self) -> Vec<(String, String)> {
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

    /// Waits until `workers` workers are UP and every running worker is
    /// ready (`/readyz`: in the topology, its sync towards it complete), so
    /// nothing moves any more once this returns.
    pub async fn wait_all_up(&self, workers: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let up = self.nodes().await.iter().filter(|(_, s)| s == "UP").count();
            let mut ready = 0;
            for name in self.nodes.keys().filter(|n| *n != "controller") {
                ready += usize::from(self.ready(name).await);
            }
            if up == workers && ready == workers {
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

    /// Loads `key:0..n` (100-byte values) through `kvctl load --generate`.
    pub async fn load(&self, n: usize) {
        let out = tokio::process::Command::new(crate::kvctl_binary())
            .args(["--controller", &self.controller_url(), "load", "--generate"])
            .args([n.to_string().as_str(), "--value-size", "100"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Loads `key:0..n` as [`Cluster::load`] does, and waits until the
    /// cluster's workers hold three copies of each.
    pub async fn load_replicated(&self, n: usize) {
        self.load(n).await;
        let all: Vec<String> = self
            .nodes
            .keys()
            .filter(|name| *name != "controller")
            .cloned()
            .collect();
        self.three_copies("every loaded key", &all, n as u64).await;
    }

    /// Waits until `among` hold exactly three copies (tombstones
    /// included) of each of `keys` keys; `of` says which in a timeout.
    pub async fn three_copies(&self, of: &str, among: &[String], keys: u64) {
        let what = format!("three copies of each of {keys} keys ({of}) on {among:?}");
        self.until(&what, async || self.copies(among).await == 3 * keys)
            .await;
    }

    /// Copies held by `live` (tombstones included), from each `/healthz`.
    pub async fn copies(&self, live: &[String]) -> u64 {
        let mut sum = 0;
        for w in live {
            let health = self.json(&format!("{}/healthz", self.nodes[w].url())).await;
            sum += health.and_then(|h| h["keys"].as_u64()).unwrap_or(0);
        }
        sum
    }

    /// Waits until `check` holds, or fails the test after [`PATIENCE`].
    pub async fn until(&self, what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the controller shows `id` DOWN.
    pub async fn down(&self, id: &str) {
        self.until(&format!("{id} DOWN"), async || {
            self.nodes()
                .await
                .iter()
                .any(|(n, s)| n == id && s == "DOWN")
        })
        .await;
    }

    /// `id`'s entry in `/nodes`.
    pub async fn node(&self, id: &str) -> Option<Value> {
        let nodes = self
            .json(&format!("{}/nodes", self.controller_url()))
            .await?;
        nodes["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
    }

    /// Whether `id`'s `/readyz` answers 200.
    pub async fn ready(&self, id: &str) -> bool {
        let url = format!("{}/readyz", self.nodes[id].url());
        let answer = self
            .http
            .request("GET".parse().unwrap(), &url, Bytes::new())
            .await;
        matches!(answer, Ok((200, _)))
    }

    /// Waits until `id`'s process has exited by itself, and takes it out
    /// of the cluster.
    pub async fn exited(&mut self, id: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.nodes.get_mut(id).unwrap().child.try_wait().unwrap() {
                let node = self.nodes.remove(id).unwrap();
                self.gone.insert(id.to_string(), node);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not exit; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads every `step`th of the `n` keys `Cluster::load` wrote from each
    /// of its owners among `live`; fails naming the first one missing.
    pub async fn sample_on_owners(&self, live: &[String], n: usize, step: usize, scenario: &str) {
        let ring = Ring::new(live.iter().cloned());
        for i in (0..n).step_by(step) {
            let key = format!("key:{i}");
            for owner in ring.owners(key.as_bytes(), 3) {
                assert!(
                    self.local(owner, &key).await.is_some(),
                    "{scenario}: {key} missing on its owner {owner}"
                );
            }
        }
    }

    /// A worker's own copy of `key`: (version, value).
    pub async fn local(&self, worker: &str, key: &str) -> Option<(Version, String)> {
        let node = self.nodes.get(worker)?;
        let body = self.json(&format!("{}/kv?key={key}", node.url())).await?;
        Some((
            body["version"].as_str()?.parse().ok()?,
            body["value"].as_str()?.to_string(),
        ))
    }

    /// A worker's own copy of `key` read over the wire, so a tombstone
    /// shows: (version, value, `None` for a tombstone); an error when the
    /// worker could not be asked.
    pub async fn copy(&self, worker: &str, key: &str) -> Result<Option<Copy>, String> {
        let node = self.nodes.get(worker).ok_or("not running")?;
        let member = Member {
            id: worker.to_string(),
            host: node.host.clone(),
            port: node.http,
            wire_port: node.wire,
            generation: 0,
        };
        let get = Request::Get {
            key: key.to_string(),
            consistency: Consistency::Local,
        };
        match self.wire.call(&member, get).await {
            Ok(Response::Value(entry)) => Ok(entry.map(|e| {
                let value = e.value.map(|v| String::from_utf8_lossy(&v).into_owned());
                (e.version, value)
            })),
            other => Err(format!("{other:?}")),
        }
    }

    pub async fn metric(&self, worker: &str, name: &str) -> f64 {
        metric_of(&self.http, &self.nodes[worker].url(), name).await
    }
}

/// A copy of a key: its version, and its value (`None`: deleted).
pub type Copy = (Version, Option<String>);

/// What the writers saw, per key; a value of `None` is a delete.
#[derive(Default)]
pub struct History {
    /// The last acknowledged (version, value).
    pub acked: HashMap<String, Copy>,
    /// Values tried since the last acknowledgement whose outcome is unknown.
    pub unknown: HashMap<String, Vec<Option<String>>>,
    /// Deletes acknowledged.
    pub deletes: u64,
    /// The first few errors the writers got, for the report.
    pub errors: Vec<String>,
}

impl History {
    /// Every key written or deleted, or tried.
    pub fn keys(&self) -> BTreeSet<&String> {
        self.acked.keys().chain(self.unknown.keys()).collect()
    }

    /// Whether `key` must hold a value: the last acknowledged operation on
    /// it left one, and no delete tried since has an unknown outcome (a
    /// delete that failed on the client may still have been applied).
    pub fn must_have_value(&self, key: &str) -> bool {
        self.acked.get(key).is_some_and(|(_, v)| v.is_some())
            && !self
                .unknown
                .get(key)
                .is_some_and(|tried| tried.iter().any(Option::is_none))
    }
}

pub struct Load {
    pub history: Arc<Mutex<History>>,
    pub ops: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub async fn start(cluster: &Cluster, seed: u64) -> Load {
        let history = Arc::new(Mutex::new(History::default()));
        let (ops, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let client = Client::connect(
            &cluster.controller_url(),
            kv_client::Credentials::new("kv", "faults"),
        )
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
        for ((key, value), result) in still.iter().cloned().zip(client.put_many(&still).await) {
            let version = result.unwrap();
            history.lock().unwrap().acked.insert(
                key,
                (version, Some(String::from_utf8(value.to_vec()).unwrap())),
            );
        }
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let client = Client::connect(
                &cluster.controller_url(),
                kv_client::Credentials::new("kv", "faults"),
            )
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
                    // One operation in eight is a delete.
                    let value = (rng.u32(..8) != 0).then(|| format!("{w}-{seq}"));
                    ops.fetch_add(1, Ordering::Relaxed);
                    let result = match &value {
                        Some(v) => client.put(&key, Bytes::from(v.clone())).await,
                        None => client.delete(&key).await,
                    };
                    match result {
                        Ok(version) => {
                            let mut h = history.lock().unwrap();
                            h.unknown.remove(&key);
                            h.deletes += u64::from(value.is_none());
                            h.acked.insert(key, (version, value));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut h = history.lock().unwrap();
                            if h.errors.len() < 5 {
                                h.errors.push(format!("{key}: {e}"));
                            }
                            h.unknown.entry(key).or_default().push(value);
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

    pub async fn stop(self) -> (History, u64, u64) {
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

/// What is wrong with the copies of the history's keys on their `live`
/// owners, read over the wire: each must be the last acknowledged write
/// (or delete: a tombstone), or a later attempt whose outcome was unknown
/// — never older, never missing, never a value nobody wrote — and every
/// owner of a key must hold the same copy.
pub async fn violations(cluster: &Cluster, history: &History, live: &[String]) -> Vec<String> {
    use futures::StreamExt;
    let ring = Ring::new(live.iter().cloned());
    let ring = &ring;
    let checks = futures::stream::iter(history.keys()).map(|key| async move {
        let acked = history.acked.get(key);
        let tried = |v: &Option<String>| history.unknown.get(key).is_some_and(|t| t.contains(v));
        let mut wrong = Vec::new();
        let mut copies = Vec::new();
        for owner in ring.owners(key.as_bytes(), 3) {
            let copy = cluster.copy(owner, key).await;
            let ok = match (&copy, acked) {
                (Ok(Some((v, value))), Some((version, last))) if v == version => value == last,
                (Ok(Some((v, value))), Some((version, _))) if v > version => tried(value),
                (Ok(Some((_, value))), None) => tried(value),
                (Ok(None), None) => true,
                _ => false,
            };
            if !ok {
                let found = copy
                    .as_ref()
                    .map_or_else(Clone::clone, |c| show(c.as_ref()));
                wrong.push(format!(
                    "{key} on {owner}: expected {}, found {found}",
                    show(acked)
                ));
            }
            copies.push((owner, copy));
        }
        if copies.windows(2).any(|pair| pair[0].1 != pair[1].1) {
            let each: Vec<String> = copies
                .iter()
                .map(|(owner, c)| {
                    format!(
                        "{owner} {}",
                        c.as_ref().map_or_else(Clone::clone, |c| show(c.as_ref()))
                    )
                })
                .collect();
            wrong.push(format!("{key}: its owners disagree: {}", each.join(", ")));
        }
        wrong
    });
    checks.buffer_unordered(64).concat().await
}

/// A copy as a report shows it.
fn show(copy: Option<&Copy>) -> String {
    match copy {
        None => "no copy".into(),
        Some((version, Some(value))) => format!("{value:?} at {version}"),
        Some((version, None)) => format!("a tombstone at {version}"),
    }
}

/// Checks the `n` keys `Cluster::load` wrote, once a scenario is over:
/// every one readable through the cluster, every 25th on each of its
/// owners, and the `live` workers holding exactly three copies of every
/// key there is (the loaded ones, those of `history` that exist, and
/// `tombstones` deleted keys), so no owner lacks one and no non-owner kept
/// one.
pub async fn loaded_keys_intact(
    cluster: &Cluster,
    live: &[String],
    n: usize,
    history: &History,
    tombstones: usize,
    scenario: &str,
) {
    use futures::StreamExt;
    let client = Client::connect(
        &cluster.controller_url(),
        kv_client::Credentials::new("kv", "faults"),
    )
    .await
    .unwrap();
    let client = &client;
    let keys = (0..n)
        .map(|i| format!("key:{i}"))
        .chain(history.keys().into_iter().cloned())
        .collect::<BTreeSet<_>>();
    let found: Vec<(String, bool)> = futures::stream::iter(keys)
        .map(|key| async move {
            let got = client.get(&key).await;
            let found = got.as_ref().is_ok_and(Option::is_some);
            assert!(got.is_ok(), "{scenario}: reading {key}: {got:?}");
            (key, found)
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let missing: Vec<&String> = found
        .iter()
        .filter(|(k, f)| !f && (k.starts_with("key:") || history.must_have_value(k)))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "{scenario}: {} keys unreadable, such as {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    cluster.sample_on_owners(live, n, 25, scenario).await;
    // The history's keys deleted last are tombstones on their owners.
    let ring = Ring::new(live.iter().cloned());
    let mut tombstones = tombstones;
    for (key, _) in found.iter().filter(|(k, f)| !f && !k.starts_with("key:")) {
        let primary = ring.owners(key.as_bytes(), 1)[0];
        if matches!(cluster.copy(primary, key).await, Ok(Some((_, None)))) {
            tombstones += 1;
        }
    }
    let existing = (found.iter().filter(|(_, f)| *f).count() + tombstones) as u64;
    cluster.three_copies(scenario, live, existing).await;
}

/// Waits for convergence; returns the time it took, or the violations left.
pub async fn converge(
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

pub fn seed() -> u64 {
    std::env::var("KV_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

pub fn report(
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
    println!("FAULTS | {scenario} | seed {seed} | {ops} ops | {} acknowledged keys, {} acknowledged deletes | {failed} unacknowledged | lost {lost} | converged in {converged}", history.acked.len(), history.deletes);
    for e in &history.errors {
        println!("  write failed: {e}");
    }
    if let Err(left) = result {
        for v in left.iter().take(20) {
            println!("  violation: {v}");
        }
    }
}

/// What a scenario ends with.
pub struct Settled {
    pub history: History,
    pub failed: u64,
    pub result: Result<Duration, Vec<String>>,
}

/// Stops the load, waits for the copies on the `live` workers to converge,
/// and prints the scenario's line.
pub async fn settle(
    cluster: &Cluster,
    load: Load,
    live: &[String],
    scenario: &str,
    seed: u64,
) -> Settled {
    let (mut history, ops, failed) = load.stop().await;
    let result = converge(cluster, &history, live).await;
    report(scenario, seed, ops, &history, failed, &result);
    if result.is_ok() {
        available(cluster, &mut history, scenario).await;
    }
    Settled {
        history,
        failed,
        result,
    }
}

/// After the fault healed, the cluster takes writes and reads again: one
/// key of every ten each writer used is written and read back at once
/// (quorum), every one of them succeeding (the client retries through
/// topology changes for its retry window). The writes join the history.
pub async fn available(cluster: &Cluster, history: &mut History, scenario: &str) {
    let client = Client::connect(&cluster.controller_url(), Credentials::new("kv", "probe"))
        .await
        .unwrap();
    for w in 0..WRITERS {
        for k in (0..KEYS_PER_WRITER).step_by(10) {
            let key = format!("w{w}:k{k}");
            let value = format!("probe-{w}-{k}");
            let version = client.put(&key, Bytes::from(value.clone())).await;
            let version = version.unwrap_or_else(|e| {
                panic!("{scenario}: after the fault healed, writing {key} failed: {e}")
            });
            let read = client.get(&key).await;
            assert!(
                matches!(&read, Ok(Some((v, at))) if *v == value.as_bytes() && *at == version),
                "{scenario}: after the fault healed, {key} read back as {read:?}, not {value:?} at {version}"
            );
            history.unknown.remove(&key);
            history.acked.insert(key, (version, Some(value)));
        }
    }
}

pub fn workers(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("worker{i}")).collect()
}

/// Whether any worker but `except` is DOWN now.
pub async fn others_down(cluster: &Cluster, except: &str) -> Vec<String> {
    cluster
        .nodes()
        .await
        .into_iter()
        .filter(|(id, s)| id != except && s == "DOWN")
        .map(|(id, _)| id)
        .collect()
}

/// The value of the metric `name` of the node at `url` (0 when it cannot
/// be read).
pub async fn metric_of(http: &HttpClient, url: &str, name: &str) -> f64 {
    let Ok((_, body)) = http
        .request(
            "GET".parse().unwrap(),
            &format!("{url}/metrics"),
            Bytes::new(),
        )
        .await
    else {
        return 0.0;
    };
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A worker metric summed over `among`.
pub async fn metric_sum(cluster: &Cluster, among: &[String], name: &str) -> f64 {
    let mut sum = 0.0;
    for w in among {
        sum += cluster.metric(w, name).await;
    }
    sum
}

/// Copies moved by rebalancing (pulled or handed off), summed over `among`.
pub async fn moved(cluster: &Cluster, among: &[String]) -> f64 {
    metric_sum(cluster, among, "kv_worker_rebalance_keys_total").await
}

/// Network namespaces for partition tests: a bridge in a namespace of its
/// own (so the host's firewall never sees the traffic), the host attached
/// to it as the controller's side, and one namespace per worker. Cuts are
/// blackhole routes. Everything is removed on drop.
pub struct Net {
    name: String,
    subnet: u8,
    workers: usize,
}

fn ip_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Sets up namespaces for `workers` workers, or says why it cannot
    /// (not root, no `ip`, no namespaces in this sandbox).
    pub fn create(workers: usize) -> Result<Net, String> {
        let net = Net {
            name: format!(
                "kv{}x{}",
                std::process::id() % 100_000,
                fastrand::u16(..1000)
            ),
            subnet: fastrand::u8(100..200),
            workers,
        };
        let (s, host) = (net.switch(), format!("{}h", net.name));
        let gateway = format!("{}/24", net.gateway());
        ip_cmd(&["netns", "add", &s])?;
        ip_cmd(&["-n", &s, "link", "add", "br0", "type", "bridge"])?;
        ip_cmd(&["-n", &s, "link", "set", "br0", "up"])?;
        ip_cmd(&[
            "link", "add", &host, "type", "veth", "peer", "name", "up0", "netns", &s,
        ])?;
        ip_cmd(&["addr", "add", &gateway, "dev", &host])?;
        ip_cmd(&["link", "set", &host, "up"])?;
        ip_cmd(&["-n", &s, "link", "set", "up0", "master", "br0", "up"])?;
        for i in 1..=workers {
            let (ns, port) = (net.ns(i), format!("{}p{i}", net.name));
            let addr = format!("{}/24", net.ip(i));
            ip_cmd(&["netns", "add", &ns])?;
            ip_cmd(&[
                "-n", &s, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip_cmd(&["-n", &s, "link", "set", &port, "master", "br0", "up"])?;
            ip_cmd(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip_cmd(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip_cmd(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn switch(&self) -> String {
        format!("{}s", self.name)
    }

    /// The host's (the controller's) address.
    pub fn gateway(&self) -> String {
        format!("10.213.{}.1", self.subnet)
    }

    /// Worker `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, 10 + i)
    }

    /// Worker `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}w{i}", self.name)
    }

    /// Drops traffic between worker `i` and every other worker, both ways.
    pub fn cut_from_peers(&self, i: usize, cut: bool) {
        for j in (1..=self.workers).filter(|&j| j != i) {
            self.blackhole(Some(i), &self.ip(j), cut);
            self.blackhole(Some(j), &self.ip(i), cut);
        }
    }

    /// Drops traffic between worker `i` and the controller, both ways.
    pub fn cut_from_controller(&self, i: usize, cut: bool) {
        self.blackhole(Some(i), &self.gateway(), cut);
        self.blackhole(None, &self.ip(i), cut);
    }

    fn blackhole(&self, worker: Option<usize>, to: &str, add: bool) {
        let route = format!("{to}/32");
        let verb = if add { "add" } else { "del" };
        let ns = worker.map(|i| self.ns(i));
        let mut args: Vec<&str> = Vec::new();
        if let Some(ns) = &ns {
            args.extend(["-n", ns.as_str()]);
        }
        args.extend(["route", verb, "blackhole", &route]);
        ip_cmd(&args).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.workers {
            let _ = ip_cmd(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip_cmd(&["netns", "del", &self.switch()]);
        let _ = ip_cmd(&["link", "del", &format!("{}h", self.name)]);
        for i in 1..=self.workers {
            let _ = ip_cmd(&["route", "del", "blackhole", &format!("{}/32", self.ip(i))]);
        }
    }
}
