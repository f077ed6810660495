//! The worker's heartbeat thread: the socket side of [`Presence`].
//!
//! It runs on an OS thread with a blocking socket, so a worker saturated
//! with data traffic still sends its heartbeats on time: busy must never
//! look dead. It sends what [`Presence::heartbeat`] says, feeds it every
//! datagram that comes back, wakes the registration task when an ack says
//! the controller restarted (or a fresh socket shows this worker's address
//! moved), and opens a fresh socket, resolving the controller's name again,
//! when [`Presence::silent`] says so.

use crate::controller::{lock, Controller};
use crate::metrics::Metrics;
use crate::presence::{Ack, Presence};
use crate::topology::Topologies;
use kv_wire::auth::RefusalLog;
use kv_wire::heartbeat::MAX_SEALED_LEN;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the heartbeat thread works with.
pub struct Beating {
    /// The controller.
    pub controller: Controller,
    /// Whether the advertised host is the local address of the route to
    /// the controller (no `--advertise-host`).
    pub host_from_route: bool,
    /// The worker's standing, shared with the registration task.
    pub presence: Arc<Mutex<Presence>>,
    /// Wakes the registration task.
    pub wake: Arc<Notify>,
    /// The epoch to report.
    pub topologies: Arc<Topologies>,
    /// Refused acks are counted here.
    pub metrics: Arc<Metrics>,
}

/// Sends heartbeats until `shutdown`.
pub fn run(b: Beating, shutdown: CancellationToken) {
    let secret = b.controller.secret.as_ref();
    let mut socket: Option<UdpSocket> = None;
    let mut refusals = RefusalLog::default();
    let mut buf = [0u8; MAX_SEALED_LEN + 1];
    while !shutdown.is_cancelled() {
        let Some((interval, port)) = lock(&b.presence).beat_settings() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if socket.is_none() {
            socket = open(&b, port);
        }
        let next = Instant::now() + interval;
        let Some(s) = &socket else {
            std::thread::sleep(interval);
            continue;
        };
        if let Some(hb) = lock(&b.presence).heartbeat(b.topologies.current().epoch()) {
            // A send error (no route yet, ICMP refusal) is just a missed beat.
            let _ = s.send(&hb.seal(secret));
        }
        // Read acks until the next beat is due.
        while let Some(wait) = next
            .checked_duration_since(Instant::now())
            .filter(|w| !w.is_zero())
        {
            if s.set_read_timeout(Some(wait)).is_err() {
                break;
            }
            let Ok(len) = s.recv(&mut buf) else {
                sleep_until(next);
                break;
            };
            let ack = lock(&b.presence).ack(&buf[..len], secret, Instant::now());
            match ack {
                Ack::Restarted => {
                    info!("the controller restarted (a new incarnation acknowledges); registering again");
                    b.wake.notify_one();
                }
                Ack::Wrong | Ack::Replayed if secret.is_some() => {
                    let reason = if ack == Ack::Wrong {
                        "wrong"
                    } else {
                        "replayed"
                    };
                    b.metrics.refused("ack", reason);
                    if refusals.should_log(controller_ip(s), Instant::now()) {
                        warn!(controller = %b.controller.addr.host, reason, "heartbeat ack refused: it does not prove the cluster secret for this worker's heartbeats (not logged again for a minute)");
                    }
                }
                _ => {}
            }
        }
        if lock(&b.presence).silent(Instant::now()) {
            info!(
                silent_for_intervals = crate::presence::SILENT_INTERVALS,
                authenticated = secret.is_some(),
                "no heartbeat ack; looking the controller up again (a controller answers only heartbeats that prove its cluster secret, if it has one)"
            );
            socket = None;
        }
    }
}

/// A socket to the controller's heartbeat port, its name resolved afresh.
fn open(b: &Beating, port: u16) -> Option<UdpSocket> {
    match b.controller.addr.udp_socket(port) {
        Ok(s) => {
            if b.host_from_route {
                if let Ok(local) = s.local_addr() {
                    let local = local.ip().to_string();
                    if lock(&b.presence).route_from(&local) {
                        info!(now = %local, "this worker's address changed; registering again");
                        b.wake.notify_one();
                    }
                }
            }
            Some(s)
        }
        Err(e) => {
            warn!(controller = %b.controller.addr.host, error = %e, "cannot open the heartbeat socket; retrying");
            None
        }
    }
}

fn controller_ip(socket: &UdpSocket) -> std::net::IpAddr {
    socket
        .peer_addr()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip())
}

/// A recv error is a timeout (the next beat is due) or an ICMP refusal
/// (the controller is not there right now): either way, wait out the
/// interval rather than spin.
fn sleep_until(next: Instant) {
    if let Some(rest) = next.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
}
