//! The kv controller: membership, failure detection, topology, admin HTTP.
//!
//! [`run`] serves HTTP (`/register`, `/leave`, `/nodes`, `/mapping`,
//! `/healthz`, `/metrics`) and UDP heartbeats on the same port number, detects failures,
//! and pushes every new topology to the workers over the wire protocol.
//! `main.rs` only parses flags and calls it; tests bind `127.0.0.1:0` with
//! [`Listeners::bind`] and pass the listeners in.

pub mod auth;
pub mod bus;
pub mod cluster;
pub mod detector;
pub mod heartbeat;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod state;

use clap::Parser;
use kv_client::Credentials;
use kv_wire::ClusterSecret;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Receive buffer asked for the heartbeat socket, so a burst of heartbeats
/// from thousands of workers waits in the kernel rather than being dropped.
/// The kernel caps it at `net.core.rmem_max`.
const UDP_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// The controller's configuration: every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kv-controller",
    version,
    about = "The kv controller: tracks workers by UDP heartbeats, detects failures, and publishes the topology"
)]
pub struct Config {
    /// Address for HTTP (TCP) and heartbeats (UDP), on the same port number.
    #[arg(long, env = "KV_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// How often workers send heartbeats (told to them at registration).
    #[arg(long, env = "KV_HEARTBEAT_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is DOWN (SUSPECT from half of it).
    #[arg(long, env = "KV_DOWN_AFTER", default_value = "1s", value_parser = humantime::parse_duration)]
    pub down_after: Duration,
    /// After start, how long to wait for workers to register before
    /// declaring anyone DOWN or publishing a topology that drops a worker
    /// (one that only adds workers to a fresh cluster goes out at once).
    #[arg(long, env = "KV_GRACE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How long a DOWN worker stays listed in /nodes (0: for ever), so
    /// replaced pods do not pile up.
    #[arg(long, env = "KV_FORGET_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub forget_after: Duration,
    /// How long `/cluster` reuses what the workers said before asking them
    /// again: any number of viewers cost one gathering per period.
    #[arg(long, env = "KV_CLUSTER_REFRESH", default_value = "1s", value_parser = humantime::parse_duration)]
    pub cluster_refresh: Duration,
    /// The cluster's name, checked in every wire hello.
    #[arg(long, env = "KV_CLUSTER", default_value = "kv")]
    pub cluster: String,
    /// A file holding the cluster secret (at least 16 bytes; surrounding
    /// whitespace is trimmed). With it, registrations, leaves, heartbeats and the
    /// topology pushes to workers prove the secret, and strangers are refused.
    #[arg(long = "cluster-secret-file", env = "KV_CLUSTER_SECRET_FILE", value_name = "FILE", value_parser = ClusterSecret::from_flag)]
    pub cluster_secret: Option<ClusterSecret>,
    /// Threads that run this node's tasks. Default: one per CPU this
    /// process may use, as its CPU quota (a pod's `limits.cpu`, compose's
    /// `cpus`) and affinity allow. Nodes sharing a machine without quotas
    /// run better on their share of its cores (`kvctl local` gives it).
    #[arg(long, env = "KV_THREADS")]
    pub threads: Option<std::num::NonZeroUsize>,
}

impl Config {
    /// The defaults, listening on `listen`.
    pub fn with_listen(listen: SocketAddr) -> Config {
        let mut config = Config::parse_from(["kv-controller"]);
        config.listen = listen;
        config
    }

    fn validate(&self) -> Result<(), ControllerError> {
        if self.heartbeat_interval.is_zero() {
            return Err(ControllerError::Config(
                "--heartbeat-interval must be above zero".into(),
            ));
        }
        if self.down_after < 2 * self.heartbeat_interval {
            return Err(ControllerError::Config(format!(
                "--down-after ({:?}) must be at least twice --heartbeat-interval ({:?}), or one lost heartbeat marks a worker SUSPECT",
                self.down_after, self.heartbeat_interval
            )));
        }
        Ok(())
    }
}

/// Why the controller could not run.
#[derive(Debug, Error)]
pub enum ControllerError {
    /// A flag's value makes no sense.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
}

impl ControllerError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ControllerError {
        let context = context.into();
        move |source| ControllerError::Io { context, source }
    }
}

/// The controller's sockets: HTTP on TCP and heartbeats on UDP, same port.
#[derive(Debug)]
pub struct Listeners {
    /// The HTTP listener.
    pub http: TcpListener,
    /// The heartbeat socket.
    pub udp: UdpSocket,
}

impl Listeners {
    /// Binds both sockets. With port 0, the OS picks the TCP port and the UDP
    /// socket takes the same number (retrying if that UDP port is taken).
    pub fn bind(addr: SocketAddr) -> Result<Listeners, ControllerError> {
        let attempts = if addr.port() == 0 { 20 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            let http = TcpListener::bind(addr)
                .map_err(ControllerError::io(format!("cannot listen on tcp {addr}")))?;
            let port = http
                .local_addr()
                .map_err(ControllerError::io("cannot read the tcp port"))?
                .port();
            match bind_udp(SocketAddr::new(addr.ip(), port)) {
                Ok(udp) => return Ok(Listeners { http, udp }),
                Err(e) => last = Some(e),
            }
        }
        let source = last.unwrap_or_else(|| io::Error::other("no attempt made"));
        Err(ControllerError::Io {
            context: format!("cannot listen on udp {addr}"),
            source,
        })
    }

    /// The shared port number.
    pub fn port(&self) -> u16 {
        self.http.local_addr().map(|a| a.port()).unwrap_or(0)
    }
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    // Best effort: a smaller buffer still works, it only drops bursts sooner.
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Runs the controller until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    config.validate()?;
    let port = listeners.port();
    let shared = Arc::new(state::Shared::new(&config, port));
    let tracker = TaskTracker::new();
    let (lagging_tx, lagging_rx) = mpsc::channel(1024);

    let heartbeats = {
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        let udp = listeners.udp;
        std::thread::Builder::new()
            .name("heartbeats".into())
            .spawn(move || heartbeat::serve(udp, shared, lagging_tx, shutdown))
            .map_err(ControllerError::io("cannot start the heartbeat thread"))?
    };

    tracker.spawn(bus::run(
        shared.clone(),
        Credentials::new(config.cluster.clone(), "controller")
            .with_secret(config.cluster_secret.clone()),
        lagging_rx,
        shutdown.clone(),
        tracker.clone(),
    ));

    listeners
        .http
        .set_nonblocking(true)
        .map_err(ControllerError::io("cannot configure the http listener"))?;
    let http = tokio::net::TcpListener::from_std(listeners.http)
        .map_err(ControllerError::io("cannot adopt the http listener"))?;
    if config.cluster_secret.is_none() {
        warn!("no cluster secret (--cluster-secret-file): registrations, heartbeats and topology pushes are unauthenticated; anyone who can reach this port can join the cluster");
    }
    info!(port, cluster = %config.cluster, authenticated = config.cluster_secret.is_some(), heartbeat_interval = ?config.heartbeat_interval, down_after = ?config.down_after, grace = ?config.grace, "controller listening (http on tcp, heartbeats on udp)");
    // Peer addresses reach the handlers, for the refusal log.
    let app = http::router(shared).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(http, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(ControllerError::io("http server failed"));

    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    // The thread wakes at least every EVALUATE_EVERY to check the token.
    let _ = tokio::task::spawn_blocking(move || heartbeats.join()).await;
    info!("controller stopped");
    served
}
