//! The kv worker: stores keys, serves clients over HTTP and the wire
//! protocol, replicates at W=2, and rebalances when the topology changes.
//!
//! [`run`] takes bound listeners and a [`Stop`] (leave, or stop now);
//! `main.rs` only parses flags and calls it, and tests start workers on
//! ephemeral ports.

pub mod controller;
pub mod disk;
pub mod heartbeat;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod progress;
pub mod quorum;
pub mod ranges;
pub mod rebalance;
pub mod replication;
pub mod store;
pub mod sync;
pub mod topology;
pub mod transport;
pub mod wire_server;

use crate::controller::{ControllerAddr, Registration};
pub use crate::lifecycle::Stop;
use crate::lifecycle::{drained, Drained};
use crate::node::{Limits, Node};
use crate::presence::Presence;
use crate::store::{MemStore, Store};
use clap::Parser;
use kv_client::{Credentials, Pool};
use kv_wire::{ClusterSecret, Version};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How often expired tombstones are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long a peer call may take before the connection is given up.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The worker's configuration: every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kv-worker",
    version,
    about = "A kv worker: stores keys, replicates them at W=2, and rebalances when workers come and go"
)]
pub struct Config {
    /// Unique worker id (a pod name in Kubernetes). Default: the hostname.
    #[arg(long, env = "KV_NODE_ID")]
    pub id: Option<String>,
    /// HTTP address (PUT/GET/DELETE /kv, /healthz, /metrics).
    #[arg(long, env = "KV_LISTEN", default_value = "0.0.0.0:8001")]
    pub listen: SocketAddr,
    /// Wire-protocol address, for clients and peers.
    #[arg(long, env = "KV_WIRE_LISTEN", default_value = "0.0.0.0:8002")]
    pub wire_listen: SocketAddr,
    /// The host others reach this worker at (POD_IP in Kubernetes).
    /// Default: this machine's address on the route to the controller.
    #[arg(long, env = "KV_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// The controller's URL.
    #[arg(long, env = "KV_CONTROLLER", default_value = "http://127.0.0.1:8000")]
    pub controller: ControllerAddr,
    /// The cluster's name, checked in every wire hello.
    #[arg(long, env = "KV_CLUSTER", default_value = "kv")]
    pub cluster: String,
    /// A file holding the cluster secret (at least 16 bytes; surrounding
    /// whitespace is trimmed). With it, registration, heartbeats and every
    /// wire connection prove the secret, and strangers are refused.
    #[arg(long = "cluster-secret-file", env = "KV_CLUSTER_SECRET_FILE", value_name = "FILE", value_parser = ClusterSecret::from_flag)]
    pub cluster_secret: Option<ClusterSecret>,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "KV_MAX_VALUE_SIZE", default_value_t = kv_wire::DEFAULT_MAX_VALUE_LEN)]
    pub max_value_size: usize,
    /// How long a write may wait for its second copy before answering 503.
    #[arg(long, env = "KV_WRITE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,
    /// A wire connection that completes no frame for this long is closed.
    #[arg(long, env = "KV_WIRE_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub wire_idle_timeout: Duration,
    /// How long deletes are remembered (tombstones) before being purged.
    /// A durable worker that left (SIGTERM) and starts again within half
    /// of it serves the copies it left with; later, it starts empty.
    #[arg(long, env = "KV_TOMBSTONE_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub tombstone_grace: Duration,
    /// How often co-owners compare digests of every arc they share and
    /// repair what differs (anti-entropy). At most half the tombstone
    /// grace, so a missed delete is repaired before its tombstone expires.
    #[arg(long, env = "KV_ANTI_ENTROPY_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub anti_entropy_interval: Duration,
    /// The longest a leaving worker (SIGTERM, Ctrl-C) keeps handing its
    /// keys over before it exits anyway. Keep the pod's
    /// terminationGracePeriodSeconds above it.
    #[arg(long, env = "KV_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Keep this worker's copies in DIR (a fjall store), so they survive a
    /// restart; without it they live in memory only. The dir belongs to
    /// one worker id and one process at a time.
    #[arg(long, env = "KV_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// With --data-dir, when writes reach the disk: `always` (an fsync
    /// before a copy counts towards W=2; concurrent writes share one),
    /// `interval` (an fsync every --sync-every), `never` (when the OS
    /// likes). In every mode a write is handed to the OS before it counts,
    /// so a killed process loses nothing acknowledged.
    #[arg(long, env = "KV_SYNC", value_enum, default_value = "interval")]
    pub sync: disk::SyncPolicy,
    /// With --sync interval, how often the data dir is fsynced.
    #[arg(long, env = "KV_SYNC_EVERY", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub sync_every: Duration,
    /// Threads that run this node's tasks. Default: one per CPU this
    /// process may use, as its CPU quota (a pod's `limits.cpu`, compose's
    /// `cpus`) and affinity allow. Nodes sharing a machine without quotas
    /// run better on their share of its cores (`kvctl local` gives it).
    #[arg(long, env = "KV_THREADS")]
    pub threads: Option<std::num::NonZeroUsize>,
    /// Test-only hooks (`POST /test/forget`: drop local copies behind the
    /// cluster's back, as a lost disk block would). Never in production.
    #[arg(long, env = "KV_TEST_HOOKS", hide = true)]
    pub test_hooks: bool,
}

impl Config {
    /// The defaults, with these addresses and controller.
    pub fn for_test(id: &str, controller: &str) -> Config {
        let mut config = Config::parse_from(["kv-worker", "--controller", controller]);
        config.id = Some(id.to_string());
        config.advertise_host = Some("127.0.0.1".into());
        config
    }
}

/// Why the worker could not run.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// A flag's value makes no sense.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data dir cannot be used.
    #[error("{0}")]
    DataDir(#[from] disk::OpenError),
    /// A socket could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> WorkerError {
    let context = context.into();
    move |source| WorkerError::Io { context, source }
}

/// The worker's listeners.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP.
    pub http: TcpListener,
    /// Wire protocol.
    pub wire: TcpListener,
}

impl Listeners {
    /// Binds both.
    pub fn bind(http: SocketAddr, wire: SocketAddr) -> Result<Listeners, WorkerError> {
        Ok(Listeners {
            http: TcpListener::bind(http).map_err(io_error(format!("cannot listen on {http}")))?,
            wire: TcpListener::bind(wire).map_err(io_error(format!("cannot listen on {wire}")))?,
        })
    }
}

/// The worker's id: the flag, else the hostname.
fn worker_id(config: &Config) -> Result<String, WorkerError> {
    if let Some(id) = &config.id {
        return Ok(id.clone());
    }
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| WorkerError::Config("no --id given and no hostname found; pass --id".into()))
}

/// Runs the worker until `stop` says to: once it leaves, it hands its
/// keys over first (up to `--drain-timeout`); stopped now, it just stops.
pub async fn run(config: Config, listeners: Listeners, stop: Stop) -> Result<(), WorkerError> {
    let shutdown = stop.stopping().clone();
    let id = worker_id(&config)?;
    if config.anti_entropy_interval.is_zero()
        || config.anti_entropy_interval > config.tombstone_grace / 2
    {
        return Err(WorkerError::Config(format!(
            "--anti-entropy-interval {} must be above zero and at most half of --tombstone-grace {}, so a missed delete is repaired before its tombstone is purged",
            humantime::format_duration(config.anti_entropy_interval),
            humantime::format_duration(config.tombstone_grace)
        )));
    }
    kv_wire::validate_key(&id)
        .map_err(|_| WorkerError::Config("the worker id must be 1 to 1024 bytes".into()))?;
    let http_port = listeners
        .http
        .local_addr()
        .map_err(io_error("http listener"))?
        .port();
    let wire_port = listeners
        .wire
        .local_addr()
        .map_err(io_error("wire listener"))?
        .port();
    let tracker = TaskTracker::new();

    let pool = Arc::new(Pool::new(
        Credentials::new(config.cluster.clone(), id.clone())
            .with_secret(config.cluster_secret.clone()),
        PEER_TIMEOUT,
    ));
    if config.sync_every.is_zero() {
        return Err(WorkerError::Config(
            "--sync-every must be above zero".into(),
        ));
    }
    let (store, newest): (Arc<dyn Store>, _) = match &config.data_dir {
        Some(dir) => {
            // Half the grace: a delete the worker missed before it left
            // is repaired within an anti-entropy interval (at most half
            // the grace), so its tombstone outlives this window.
            let keep_left = config.tombstone_grace / 2;
            let (store, opened) =
                disk::DiskStore::open(dir, &id, config.sync, config.sync_every, keep_left)?;
            (Arc::new(store), Some(opened.newest))
        }
        None => (Arc::new(MemStore::new()), None),
    };
    let node = Arc::new(Node::new(
        id.clone(),
        store.clone(),
        pool,
        transport::system_wall(),
        Limits {
            max_value: config.max_value_size,
            write_timeout: config.write_timeout,
            read_timeout: Duration::from_secs(1),
        },
        stop.leaving().clone(),
        shutdown.clone(),
    ));
    if let Some(newest) = newest {
        // Never issue a version older than one this worker already did.
        node.clock.observe(newest);
    }
    let topologies = node.topologies.clone();
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    node.metrics
        .runtime_threads
        .set(i64::try_from(threads).unwrap_or(i64::MAX));

    listeners
        .wire
        .set_nonblocking(true)
        .map_err(io_error("wire listener"))?;
    let wire =
        tokio::net::TcpListener::from_std(listeners.wire).map_err(io_error("wire listener"))?;
    let wire_settings = wire_server::Settings::new(
        config.cluster.clone(),
        config.cluster_secret.clone(),
        config.wire_idle_timeout,
    );
    tracker.spawn(wire_server::serve(
        wire,
        node.clone(),
        Arc::new(wire_settings),
        shutdown.clone(),
        tracker.clone(),
    ));
    tracker.spawn(rebalance::run(
        node.clone(),
        config.anti_entropy_interval,
        shutdown.clone(),
    ));
    tracker.spawn(purge_tombstones(
        store,
        config.tombstone_grace,
        shutdown.clone(),
    ));

    let me = Registration {
        id: id.clone(),
        host: config.advertise_host.clone().unwrap_or_default(),
        port: http_port,
        wire_port,
        epoch: None,
        generation: None,
        peers: Vec::new(),
        empty: false,
    };
    let presence = Arc::new(Mutex::new(Presence::new(me, std::time::Instant::now())));
    let wake = Arc::new(Notify::new());
    let controller = controller::Controller {
        addr: config.controller.clone(),
        secret: config.cluster_secret.clone(),
    };
    tracker.spawn(controller::keep_registered(
        controller.clone(),
        presence.clone(),
        config.advertise_host.is_some(),
        wake.clone(),
        topologies.clone(),
        node.store.clone(),
        stop.leaving().clone(),
        shutdown.clone(),
    ));
    tracker.spawn(leave_when_told(
        node.clone(),
        controller.clone(),
        presence.clone(),
        config.drain_timeout,
        config.data_dir.clone(),
        stop.clone(),
    ));
    let heartbeats = {
        let beating = heartbeat::Beating {
            controller,
            host_from_route: config.advertise_host.is_none(),
            presence,
            wake,
            topologies,
            metrics: node.metrics.clone(),
        };
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("heartbeats".into())
            .spawn(move || heartbeat::run(beating, shutdown))
            .map_err(io_error("cannot start the heartbeat thread"))?
    };

    listeners
        .http
        .set_nonblocking(true)
        .map_err(io_error("http listener"))?;
    let http =
        tokio::net::TcpListener::from_std(listeners.http).map_err(io_error("http listener"))?;
    if config.cluster_secret.is_none() {
        warn!("no cluster secret (--cluster-secret-file): registration, heartbeats and wire connections are unauthenticated; anyone who can reach this worker can write to it");
    }
    info!(%id, http_port, wire_port, controller = %config.controller.host, authenticated = config.cluster_secret.is_some(), "worker listening");
    let served = axum::serve(http, http::router(node, config.test_hooks))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(io_error("http server failed"));
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    let _ = tokio::task::spawn_blocking(move || heartbeats.join()).await;
    info!(%id, "worker stopped");
    served
}

/// Once `stop` says leave: waits until this worker's keys are handed
/// over (or nobody is left to take them, or the drain timeout runs out, or
/// a second signal), tells the controller it left, and stops the worker.
/// A durable worker that handed everything over marks its data dir so (see
/// [`disk::mark_left`]).
async fn leave_when_told(
    node: Arc<Node>,
    controller: controller::Controller,
    presence: Arc<Mutex<Presence>>,
    drain_timeout: Duration,
    data_dir: Option<std::path::PathBuf>,
    stop: Stop,
) {
    tokio::select! {
        () = stop.leaving().cancelled() => {}
        () = stop.stopping().cancelled() => return,
    }
    let began = tokio::time::Instant::now();
    let keys = node.store.stats().0;
    info!(keys, drain_timeout = %humantime::format_duration(drain_timeout), "leaving: handing this worker's keys to their owners (a second signal stops at once)");
    let mut current = node.topologies.subscribe();
    let mut settled = node.topologies.subscribe_settled();
    let deadline = began + drain_timeout;
    let outcome = loop {
        let done = drained(
            &node.id,
            &current.borrow_and_update(),
            &settled.borrow_and_update(),
        );
        if let Some(done) = done {
            break Some(done);
        }
        tokio::select! {
            _ = current.changed() => {}
            _ = settled.changed() => {}
            () = tokio::time::sleep_until(deadline) => break None,
            () = stop.stopping().cancelled() => break None,
        }
    };
    let took_ms = began.elapsed().as_millis() as u64;
    let pending = node.metrics.handoff_pending.get();
    match outcome {
        Some(Drained::HandedOver) => {
            info!(
                keys,
                took_ms,
                rebalance_keys_total = node.metrics.rebalance_keys.get(),
                rebalance_bytes_total = node.metrics.rebalance_bytes.get(),
                "every key this worker held is confirmed by its owners; exiting"
            );
            if let Some(dir) = &data_dir {
                if let Err(e) = disk::mark_left(dir) {
                    warn!(error = %e, dir = %dir.display(), "could not mark the data dir as handed over: the copies in it are kept whenever this worker comes back");
                }
            }
        }
        Some(Drained::NowhereToGo) => {
            warn!(keys = node.store.stats().0, "no other worker is left to take this worker's keys; exiting without handing them over")
        }
        None if node.topologies.current().member(&node.id).is_some() => {
            warn!(keys, took_ms, "stopped before the controller took this worker out of the ring: no key was handed over")
        }
        None => {
            warn!(
                unconfirmed = pending,
                took_ms, "stopped before the drain finished: keys not confirmed by their owners"
            )
        }
    }
    if outcome.is_some() {
        tell_left(&controller, &presence).await;
    }
    stop.now();
}

/// Tells the controller this worker left, so it is DOWN at once rather
/// than after `--down-after` of silence. Best effort: silence says the same.
async fn tell_left(controller: &controller::Controller, presence: &Mutex<Presence>) {
    let Some(leave) = controller::lock(presence).left() else {
        return;
    };
    let client = kv_client::HttpClient::new();
    match tokio::time::timeout(Duration::from_secs(1), controller.leave(&client, &leave)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "could not tell the controller this worker left; it will notice the silence")
        }
        Err(_) => warn!("the controller did not answer in time; it will notice the silence"),
    }
}

async fn purge_tombstones(store: Arc<dyn Store>, grace: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(PURGE_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        let cutoff = Version {
            hlc: crate::transport::system_now_ms().saturating_sub(grace.as_millis() as u64) << 16,
            node: 0,
        };
        let purged = store.purge_tombstones(cutoff);
        if purged > 0 {
            info!(purged, "expired tombstones purged");
        }
    }
}
