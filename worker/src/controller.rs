//! Talking to the controller over HTTP: the registrations and leaves that
//! [`Presence`] calls for, each retried with backoff.

use crate::presence::Presence;
use crate::store::Store;
use crate::topology::Topologies;
use kv_client::HttpClient;
use kv_service::Backoff;
use kv_wire::auth::Signed;
use kv_wire::register::{LeaveReply, LeaveRequest};
use kv_wire::ClusterSecret;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Backoff between registration attempts.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Where the controller is: `http://host:port`.
#[derive(Debug, Clone)]
pub struct ControllerAddr {
    /// Host name or IP.
    pub host: String,
    /// HTTP (and heartbeat) port.
    pub port: u16,
}

impl std::str::FromStr for ControllerAddr {
    type Err = String;

    fn from_str(url: &str) -> Result<ControllerAddr, String> {
        let bad = || format!("{url:?} is not an http://host:port URL");
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            return Err(bad());
        }
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ControllerAddr {
            host: host.to_string(),
            port: port.parse().map_err(|_| bad())?,
        })
    }
}

impl ControllerAddr {
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host (again: a Kubernetes Service may have moved).
    pub fn resolve(&self, port: u16) -> std::io::Result<SocketAddr> {
        (self.host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} resolves to nothing", self.host),
                )
            })
    }

    /// A UDP socket connected to the controller's `port` (the name
    /// resolved afresh): only the controller's datagrams reach it.
    pub fn udp_socket(&self, port: u16) -> std::io::Result<UdpSocket> {
        let target = self.resolve(port)?;
        let any: SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(any)?;
        socket.connect(target)?;
        Ok(socket)
    }

    /// The local address of the route to the controller: what others most
    /// likely reach this worker at.
    pub fn local_route_ip(&self) -> std::io::Result<std::net::IpAddr> {
        Ok(self.udp_socket(self.port)?.local_addr()?.ip())
    }
}

/// The controller as a worker knows it: where it is, and the cluster
/// secret to prove to it (if the cluster has one).
#[derive(Debug, Clone)]
pub struct Controller {
    /// Its address.
    pub addr: ControllerAddr,
    /// The cluster secret, if any.
    pub secret: Option<ClusterSecret>,
}

impl Controller {
    /// POSTs `body` as JSON to `path`, with a proof of the secret for `what`.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        client: &HttpClient,
        what: Signed,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, kv_client::HttpError> {
        let url = format!("http://{}{path}", self.addr.authority());
        // The proof covers these exact bytes.
        let body = serde_json::to_vec(body).unwrap_or_default();
        let proof = self.secret.as_ref().map(|s| {
            s.prove_request(what, &body, crate::transport::system_now_ms())
                .header_value()
        });
        client.post_authorized(&url, body, proof.as_deref()).await
    }

    /// Tells the controller that this incarnation leaves (`done: false`)
    /// or has left (`done: true`).
    pub async fn leave(
        &self,
        client: &HttpClient,
        leave: &LeaveRequest,
    ) -> Result<LeaveReply, kv_client::HttpError> {
        self.post(client, Signed::Leave, "/leave", leave).await
    }
}

pub use kv_wire::register::{RegisterReply as Registered, RegisterRequest as Registration};

/// Locks `m`, whatever a panicking holder left behind (the state machines
/// behind these locks stay consistent between calls).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers whenever [`Presence`] wants it (at start, then each time the
/// heartbeat thread or a refused leave asks and `wake`s this task), and
/// says the leave once `leaving`, after every registration, until
/// `shutdown`. The host to advertise is worked out on every attempt when
/// not given. With a cluster secret, each request proves it. Each
/// registration says whether `store` holds nothing.
#[allow(clippy::too_many_arguments)]
pub async fn keep_registered(
    controller: Controller,
    presence: Arc<Mutex<Presence>>,
    advertise_given: bool,
    wake: Arc<Notify>,
    topologies: Arc<Topologies>,
    store: Arc<dyn Store>,
    leaving: CancellationToken,
    shutdown: CancellationToken,
) {
    let client = HttpClient::new();
    while !shutdown.is_cancelled() {
        if lock(&presence).wants_registration() {
            register(
                &controller,
                &client,
                &presence,
                advertise_given,
                &topologies,
                store.as_ref(),
                &shutdown,
            )
            .await;
            continue;
        }
        let leave = lock(&presence).leave_to_say();
        if let Some(leave) = leave {
            tell_leave(&controller, &client, &leave, &presence, &wake, &shutdown).await;
            continue;
        }
        tokio::select! {
            () = wake.notified() => {}
            () = leaving.cancelled(), if !lock(&presence).is_leaving() => lock(&presence).leave(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// One registration, retried with backoff until it is taken or `shutdown`.
async fn register(
    controller: &Controller,
    client: &HttpClient,
    presence: &Mutex<Presence>,
    advertise_given: bool,
    topologies: &Topologies,
    store: &dyn Store,
    shutdown: &CancellationToken,
) {
    if lock(presence).current().is_some() {
        info!("registering again (the controller restarted or forgot this worker, or this worker's address changed)");
    }
    let mut retry = RETRY;
    loop {
        let host = if advertise_given {
            None
        } else {
            match controller.addr.local_route_ip() {
                Ok(ip) => Some(ip.to_string()),
                Err(e) => {
                    warn!(controller = %controller.addr.authority(), error = %e, "cannot work out the address to advertise yet");
                    None
                }
            }
        };
        let me =
            lock(presence).registration(host, &topologies.current().topology, store.is_empty());
        match controller
            .post::<Registered>(client, Signed::Register, "/register", &me)
            .await
        {
            Ok(reply) => {
                info!(controller = %controller.addr.authority(), member = reply.member, generation = reply.generation, host = %me.host, "registered with the controller");
                lock(presence).registered(reply, me.host, std::time::Instant::now());
                return;
            }
            Err(e) => {
                warn!(controller = %controller.addr.authority(), error = %e, retry_in = ?retry.peek(), "registration failed")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry.next_wait()) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Says `leave` until the controller takes it, the controller turns out
/// not to know this incarnation (register again first), `wake` asks for a
/// registration, or `shutdown`.
async fn tell_leave(
    controller: &Controller,
    client: &HttpClient,
    leave: &LeaveRequest,
    presence: &Mutex<Presence>,
    wake: &Notify,
    shutdown: &CancellationToken,
) {
    let mut retry = RETRY;
    loop {
        match controller.leave(client, leave).await {
            Ok(reply) => {
                info!(status = %reply.status, epoch = reply.epoch, "the controller knows this worker is leaving");
                lock(presence).leave_taken(leave.generation);
                return;
            }
            Err(kv_client::HttpError::Status {
                status: 404 | 409,
                message,
                ..
            }) => {
                warn!(%message, "the controller does not know this incarnation; registering again before leaving");
                lock(presence).unknown();
                return;
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?retry.peek(), "telling the controller this worker leaves failed")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry.next_wait()) => {}
            () = wake.notified() => return,
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_urls_parse_or_say_what_is_wrong() {
        let a: ControllerAddr = "http://controller.kv-system:8000".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("controller.kv-system", 8000));
        let b: ControllerAddr = "http://[::1]:8000/".parse().unwrap();
        assert_eq!(
            (b.host.as_str(), b.authority()),
            ("::1", "[::1]:8000".to_string())
        );
        for bad in [
            "controller:8000",
            "http://controller",
            "http://:80",
            "http://h:x",
            "http://h:1/path",
        ] {
            assert!(
                bad.parse::<ControllerAddr>()
                    .unwrap_err()
                    .contains("http://host:port"),
                "{bad}"
            );
        }
    }
}
