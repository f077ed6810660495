//! The worker's heartbeat thread.
//!
//! It runs on an OS thread with a blocking socket, so a worker saturated
//! with data traffic still sends its heartbeats on time: busy must never
//! look dead. It also reads the acks: a new controller incarnation means
//! the controller restarted and forgot us (register again), and silence for
//! a few intervals means the controller's address may have moved (resolve
//! it again and open a fresh socket, leaving stale conntrack state behind).

use crate::controller::{ControllerAddr, Registered, Shared};
use crate::topology::Topologies;
use kv_wire::heartbeat::{Datagram, Heartbeat, HeartbeatAck};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Intervals without an ack before the controller is looked up afresh.
const SILENT_INTERVALS: u32 = 3;

/// Sends heartbeats until `shutdown`.
pub fn run(
    controller: ControllerAddr,
    registered: Shared,
    topologies: Arc<Topologies>,
    reregister: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut socket: Option<UdpSocket> = None;
    let mut seq = 0u64;
    let mut last_ack = Instant::now();
    let mut asked_to_reregister = false;
    let mut buf = [0u8; 128];
    while !shutdown.is_cancelled() {
        let Some(reg) = registered.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
        if socket.is_none() {
            match controller.udp_socket(reg.heartbeat_port) {
                Ok(s) => socket = Some(s),
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
            let _ = s.send(&hb.encode());
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
                let Ok(ack) = HeartbeatAck::decode(&buf[..len]) else {
                    continue;
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
        if asked_to_reregister && registered_changed(&registered, &reg) {
            asked_to_reregister = false;
        }
        if last_ack.elapsed() > interval * SILENT_INTERVALS && socket.is_some() {
            info!(
                silent_ms = last_ack.elapsed().as_millis() as u64,
                "no heartbeat ack; looking the controller up again"
            );
            socket = None;
            last_ack = Instant::now();
        }
    }
}

/// A recv error is a timeout (the next beat is due) or an ICMP refusal
/// (the controller is not there right now): either way, wait out the
/// interval rather than spin.
fn sleep_until(next: Instant) {
    if let Some(rest) = next.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
}

fn registered_changed(shared: &Shared, before: &Registered) -> bool {
    shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|now| now != before)
}
