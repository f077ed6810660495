//! Test harness: a controller and workers in this process, on ephemeral
//! ports, and a small HTTP client.

use futures::stream::{self, StreamExt};
use kv_client::{Connection, Credentials};
use kv_wire::message::Consistency;
use kv_wire::ClusterSecret;
use kv_wire::Ring;
use kv_wire::{Entry, Request, Response};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use crate::{eventually, PATIENCE};

pub use crate::http;

pub struct Service {
    pub id: String,
    pub http: SocketAddr,
    pub wire: SocketAddr,
    /// Stops it at once.
    pub stop: CancellationToken,
    /// A worker's: leave (as on SIGTERM), or stop at once.
    pub lifecycle: Option<kv_worker::Stop>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Service {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http("GET", &self.url(path), "").await
    }

    /// Stops the service and waits until it has.
    pub async fn kill(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    /// Tells a worker to leave, as SIGTERM does.
    pub fn leave(&self) {
        self.lifecycle.as_ref().expect("a worker").leave();
    }

    /// A counter or gauge from this worker's `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.get("/metrics").await;
        let text = text.as_str().unwrap().to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    }

    /// A wire connection to this worker (no cluster secret).
    pub async fn wire(&self) -> Connection {
        let credentials = Credentials::new("kv", "test");
        Connection::connect(&self.wire.to_string(), &credentials, PATIENCE)
            .await
            .unwrap()
    }

    /// The copy this worker holds of `key`, tombstones included.
    pub async fn copy(&self, key: &str) -> Option<Entry> {
        let request = Request::Get {
            key: key.into(),
            consistency: Consistency::Local,
        };
        match self.wire().await.call(request).await.unwrap() {
            Response::Value(entry) => entry,
            other => panic!("{other:?}"),
        }
    }

    /// Stores `entry` on this worker as a peer's copy arrives (a
    /// replication), which must be newer than the copy it held.
    pub async fn plant(&self, entry: Entry) {
        let request = Request::Replicate {
            entries: vec![entry],
        };
        let reply = self.wire().await.call(request).await.unwrap();
        assert!(
            matches!(reply, Response::Replicated { applied: 1, .. }),
            "{reply:?}"
        );
    }

    /// This worker's answer to a client that reads `key` from two owners
    /// itself by the topology of `epoch` (`Consistency::Owner`).
    pub async fn own_copy(&self, key: &str, epoch: u64) -> Response {
        let request = Request::Get {
            key: key.into(),
            consistency: Consistency::Owner { epoch },
        };
        self.wire().await.call(request).await.unwrap()
    }

    /// The value this worker holds locally for `key`, if any.
    pub async fn local(&self, key: &str) -> Option<String> {
        let (status, body) = self.get(&format!("/kv?key={key}")).await;
        (status == 200).then(|| body["value"].as_str().unwrap().to_string())
    }
}

pub struct Cluster {
    pub controller: Service,
    pub workers: Vec<Service>,
    /// The cluster secret every node has, if any.
    pub secret: Option<ClusterSecret>,
    /// Applied to every worker's configuration.
    pub configure: fn(&mut kv_worker::Config),
}

/// A secret for tests.
pub fn test_secret(text: &str) -> ClusterSecret {
    ClusterSecret::new(text.as_bytes()).unwrap()
}

impl Cluster {
    /// A controller (no grace period) and `n` workers named worker1..n,
    /// waiting until every worker holds the topology with all of them.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with_secret(n, None).await
    }

    /// The same, every node with `secret`.
    pub async fn start_with_secret(n: usize, secret: Option<ClusterSecret>) -> Cluster {
        Cluster::start_configured(n, secret, |_| {}).await
    }

    /// The same, every worker's configuration changed by `configure`.
    pub async fn start_configured(
        n: usize,
        secret: Option<ClusterSecret>,
        configure: fn(&mut kv_worker::Config),
    ) -> Cluster {
        Cluster::start_with(n, secret, configure, |_| {}).await
    }

    /// The same, without a secret, the controller's configuration changed
    /// by `adjust`.
    pub async fn start_with_controller(
        n: usize,
        adjust: fn(&mut kv_controller::Config),
    ) -> Cluster {
        Cluster::start_with(n, None, |_| {}, adjust).await
    }

    async fn start_with(
        n: usize,
        secret: Option<ClusterSecret>,
        configure: fn(&mut kv_worker::Config),
        adjust: fn(&mut kv_controller::Config),
    ) -> Cluster {
        let controller = start_controller_with(|c| {
            c.cluster_secret = secret.clone();
            adjust(c);
        })
        .await;
        let mut cluster = Cluster {
            controller,
            workers: Vec::new(),
            secret,
            configure,
        };
        for i in 1..=n {
            cluster.add(&format!("worker{i}")).await;
        }
        cluster.settled().await;
        cluster
    }

    pub async fn add(&mut self, id: &str) {
        let (secret, configure) = (self.secret.clone(), self.configure);
        let worker = start_worker_with(id, &self.controller, |c| {
            c.cluster_secret = secret;
            configure(c);
        })
        .await;
        self.workers.push(worker);
    }

    pub fn worker(&self, id: &str) -> &Service {
        self.workers
            .iter()
            .find(|w| w.id == id)
            .unwrap_or_else(|| panic!("no worker {id}"))
    }

    /// Waits until every running worker holds the controller's epoch, with
    /// exactly the running workers in the ring.
    pub async fn settled(&self) -> u64 {
        let ids: Vec<&str> = self.workers.iter().map(|w| w.id.as_str()).collect();
        eventually("the cluster to settle", || async {
            let (_, nodes) = self.controller.get("/nodes").await;
            let epoch = nodes["epoch"].as_u64()?;
            let up: Vec<&str> = nodes["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["status"] != "DOWN")
                .map(|n| n["id"].as_str().unwrap())
                .collect();
            if up != ids {
                return None;
            }
            for w in &self.workers {
                let (_, health) = w.get("/healthz").await;
                if health["epoch"].as_u64() != Some(epoch) || health["in_ring"] != true {
                    return None;
                }
            }
            Some(epoch)
        })
        .await
    }

    /// Waits until the cluster has settled ([`Cluster::settled`]) and
    /// every worker is ready (`/readyz`: it holds its share of the epoch,
    /// so owners answer clients' reads of their own copies); the epoch.
    pub async fn ready(&self) -> u64 {
        let epoch = self.settled().await;
        for w in &self.workers {
            eventually("every worker to be ready", || async {
                (w.get("/readyz").await.0 == 200).then_some(())
            })
            .await;
        }
        epoch
    }

    pub async fn mapping(&self, key: &str) -> Vec<String> {
        let query = serde_urlencoded::to_string([("key", key)]).unwrap();
        let (status, m) = self.controller.get(&format!("/mapping?{query}")).await;
        assert_eq!(status, 200, "{m}");
        m["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect()
    }

    /// Stops worker `id` and removes it from the cluster.
    pub async fn stop(&mut self, id: &str) {
        let i = self.workers.iter().position(|w| w.id == id).unwrap();
        self.workers.remove(i).kill().await;
    }

    pub async fn shutdown(self) {
        for w in self.workers {
            w.kill().await;
        }
        self.controller.kill().await;
    }
}

pub async fn start_controller() -> Service {
    start_controller_with(|_| {}).await
}

/// A controller whose configuration `adjust` changes first.
pub async fn start_controller_with(adjust: impl FnOnce(&mut kv_controller::Config)) -> Service {
    let listeners = kv_controller::Listeners::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let http = listeners.http.local_addr().unwrap();
    let mut config = kv_controller::Config::with_listen(http);
    config.grace = Duration::ZERO;
    adjust(&mut config);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { kv_controller::run(config, listeners, stop).await.unwrap() }
    });
    Service {
        id: "controller".into(),
        http,
        wire: http,
        stop,
        lifecycle: None,
        task,
    }
}

/// A controller address where nothing listens.
pub fn nowhere() -> Service {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    elsewhere("nowhere", format!("127.0.0.1:{port}").parse().unwrap())
}

/// A service this harness did not start, known by its address (a fake
/// controller, say), for the helpers that take a [`Service`].
pub fn elsewhere(id: &str, addr: SocketAddr) -> Service {
    Service {
        id: id.into(),
        http: addr,
        wire: addr,
        stop: Default::default(),
        lifecycle: None,
        task: tokio::spawn(async {}),
    }
}

pub async fn start_worker(id: &str, controller: &Service) -> Service {
    start_worker_with(id, controller, |_| {}).await
}

/// A worker whose configuration `adjust` changes first.
pub async fn start_worker_with(
    id: &str,
    controller: &Service,
    adjust: impl FnOnce(&mut kv_worker::Config),
) -> Service {
    let listeners = kv_worker::Listeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let http = listeners.http.local_addr().unwrap();
    let wire = listeners.wire.local_addr().unwrap();
    let mut config = kv_worker::Config::for_test(id, &format!("http://{}", controller.http));
    adjust(&mut config);
    let lifecycle = kv_worker::Stop::new();
    let task = tokio::spawn({
        let lifecycle = lifecycle.clone();
        async move { kv_worker::run(config, listeners, lifecycle).await.unwrap() }
    });
    Service {
        id: id.into(),
        http,
        wire,
        stop: lifecycle.stopping().clone(),
        lifecycle: Some(lifecycle),
        task,
    }
}

pub fn put_body(key: &str, value: &str) -> String {
    serde_json::json!({ "key": key, "value": value }).to_string()
}

/// Writes `key:{i}` = `value-{i}` for i in 0..n through HTTP, spread over
/// the workers, 64 at a time.
pub async fn write_keys(cluster: &Cluster, n: usize) {
    let urls: Vec<String> = cluster.workers.iter().map(|w| w.url("/kv")).collect();
    stream::iter(0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            async move {
                let (status, reply) = http(
                    "PUT",
                    &url,
                    put_body(&format!("key:{i}"), &format!("value-{i}")),
                )
                .await;
                assert_eq!(status, 200, "key:{i}: {reply}");
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

/// The ring the running workers form.
pub fn ring(cluster: &Cluster) -> Ring {
    Ring::new(cluster.workers.iter().map(|w| w.id.clone()))
}

/// Keys (tombstones included) each worker holds, from /healthz.
pub async fn held(cluster: &Cluster) -> HashMap<String, u64> {
    let mut held = HashMap::new();
    for w in &cluster.workers {
        let (_, health) = w.get("/healthz").await;
        held.insert(w.id.clone(), health["keys"].as_u64().unwrap());
    }
    held
}
