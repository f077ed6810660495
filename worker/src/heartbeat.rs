//! The worker's heartbeat thread.
//!
//! It runs on an OS thread with a blocking socket, so a worker saturated
//! with data traffic still sends its heartbeats on time: busy must never
//! look dead. It also reads the acks: a new controller incarnation means
//! the controller restarted and forgot us (register again), and silence for
//! a few intervals means the controller's address may have moved (resolve
//! it again and open a fresh socket, leaving stale conntrack state behind).
//!
//! With a cluster secret, heartbeats are sealed, and an ack counts only if
//! its tag is right and it answers a heartbeat sent since the last ack
//! counted: a forged or replayed ack cannot make the worker register again.

use crate::controller::{Controller, Current, Shared};
use crate::metrics::Metrics;
use crate::topology::Topologies;
use kv_wire::auth::RefusalLog;
use kv_wire::heartbeat::{Heartbeat, HeartbeatAck, MAX_SEALED_LEN};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Intervals without an ack before the controller is looked up afresh.
const SILENT_INTERVALS: u32 = 3;

/// Sends heartbeats until `shutdown`. With `host_from_route`, the worker
/// advertises the local address of its route to the controller; when a
/// fresh socket shows that address changed (a container reattached to its
/// network, say), it registers again so peers dial the new one.
pub fn run(
    Controller {
        addr: controller,
        secret,
    }: Controller,
    host_from_route: bool,
    registered: Shared,
    topologies: Arc<Topologies>,
    reregister: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut socket: Option<UdpSocket> = None;
    let mut seq = 0u64;
    // The highest heartbeat an authenticated ack answered.
    let mut acked_seq = 0u64;
    let mut last_ack = Instant::now();
    let mut asked_to_reregister = false;
    let mut refusals = RefusalLog::default();
    let mut buf = [0u8; MAX_SEALED_LEN + 1];
    while !shutdown.is_cancelled() {
        let Some(current) = registered.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let reg = &current.reply;
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
        if socket.is_none() {
            match controller.udp_socket(reg.heartbeat_port) {
                Ok(s) => {
                    let local = s.local_addr().map(|a| a.ip().to_string());
                    if host_from_route
                        && local.as_ref().is_ok_and(|ip| *ip != current.host)
                        && !asked_to_reregister
                    {
                        info!(registered = %current.host, now = ?local, "this worker's address changed");
                        asked_to_reregister = true;
                        reregister.notify_one();
                    }
                    socket = Some(s);
                }
                Err(e) => {
                    warn!(controller = %controller.host, error = %e, "cannot open the heartbeat socket; retrying")
                }
            }
        }
        let next = Instant::now() + interval;
        if let Some(s) = &socket {
            seq += 1;
            let hb = Heartbeat {
                member: reg.member,
                generation: reg.generation,
                seq,
                epoch_seen: topologies.current().epoch(),
            };
            // A send error (no route yet, ICMP refusal) is just a missed beat.
            let _ = s.send(&hb.seal(secret.as_ref()));
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
                let ack = match HeartbeatAck::open(
                    &buf[..len],
                    secret.as_ref(),
                    reg.member,
                    reg.generation,
                ) {
                    Ok((ack, None)) => ack,
                    Ok((ack, Some(answered))) if answered > acked_seq && answered <= seq => {
                        acked_seq = answered;
                        ack
                    }
                    outcome => {
                        if secret.is_some() {
                            let reason = if outcome.is_ok() { "replayed" } else { "wrong" };
                            metrics.refused("ack", reason);
                            if refusals.should_log(controller_ip(s), Instant::now()) {
                                warn!(controller = %controller.host, reason, "heartbeat ack refused: it does not prove the cluster secret for this worker's heartbeats (not logged again for a minute)");
                            }
                        }
                        continue;
                    }
                };
                last_ack = Instant::now();
                if ack.incarnation != reg.incarnation && !asked_to_reregister {
                    asked_to_reregister = true;
                    reregister.notify_one();
                }
            }
        } else {
            std::thread::sleep(interval);
        }
        if asked_to_reregister && registered_changed(&registered, &current) {
            asked_to_reregister = false;
        }
        if last_ack.elapsed() > interval * SILENT_INTERVALS && socket.is_some() {
            info!(
                silent_ms = last_ack.elapsed().as_millis() as u64,
                authenticated = secret.is_some(),
                "no heartbeat ack; looking the controller up again (a controller answers only heartbeats that prove its cluster secret, if it has one)"
            );
            socket = None;
            last_ack = Instant::now();
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

fn registered_changed(shared: &Shared, before: &Current) -> bool {
    shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|now| now != before)
}
