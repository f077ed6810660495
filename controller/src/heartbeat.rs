//! The UDP heartbeat loop: receives heartbeats, answers each with an ack,
//! and drives the failure detector.
//!
//! It runs on an OS thread of its own with blocking sockets, so no amount of
//! HTTP or bus work on the async runtime can delay a heartbeat or the
//! detector's clock: a busy controller must not declare healthy workers DOWN.

use crate::metrics::Reason;
use crate::state::Shared;
use kv_wire::heartbeat::{Datagram, Heartbeat, HeartbeatAck};
use kv_wire::DatagramError;
use std::io::ErrorKind;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the detector is evaluated: the precision of detection times.
pub const EVALUATE_EVERY: Duration = Duration::from_millis(10);

/// Receives heartbeats until `shutdown`. `lagging` hears the ids of workers
/// whose heartbeats show they missed a topology push.
pub fn serve(
    socket: UdpSocket,
    shared: Arc<Shared>,
    lagging: mpsc::Sender<String>,
    shutdown: CancellationToken,
) {
    let mut buf = [0u8; 2048];
    // Wake at least once per evaluation period, even with no traffic; with
    // traffic the loop checks the clock after every datagram.
    if let Err(e) = socket.set_read_timeout(Some(EVALUATE_EVERY)) {
        warn!(error = %e, "cannot set the heartbeat socket's timeout; detection may lag");
    }
    let mut next_tick = Instant::now();
    while !shutdown.is_cancelled() {
        let now = Instant::now();
        if now >= next_tick {
            shared.tick();
            next_tick = now + EVALUATE_EVERY;
        }
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            // ICMP errors from an earlier ack to a vanished worker surface
            // here on some systems; they say nothing about this socket.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                warn!(error = %e, "heartbeat socket failed; retrying");
                std::thread::sleep(EVALUATE_EVERY);
                continue;
            }
        };
        let hb = match Heartbeat::decode(&buf[..len]) {
            Ok(hb) => hb,
            Err(e) => {
                shared
                    .metrics
                    .dropped
                    .get_or_create(&Reason {
                        reason: drop_reason(&e),
                    })
                    .inc();
                continue;
            }
        };
        let (outcome, epoch) = shared.heartbeat(&hb);
        match outcome.observation {
            crate::detector::Observation::Alive | crate::detector::Observation::Recovered(_) => {
                shared.metrics.heartbeats.inc();
            }
            crate::detector::Observation::StaleGeneration => {
                shared
                    .metrics
                    .dropped
                    .get_or_create(&Reason {
                        reason: "stale_generation",
                    })
                    .inc();
            }
            crate::detector::Observation::UnknownMember => {
                shared
                    .metrics
                    .dropped
                    .get_or_create(&Reason {
                        reason: "unknown_member",
                    })
                    .inc();
            }
        }
        if outcome.lagging {
            if let Some(id) = shared.membership().id_of(hb.member) {
                // A full queue means nudges are pending already: fine to drop.
                let _ = lagging.try_send(id.to_string());
            }
        }
        // Every heartbeat is answered, even from strangers: the ack carries
        // our incarnation, which is how a worker of a previous controller
        // learns it must register again.
        let ack = HeartbeatAck {
            epoch,
            incarnation: shared.incarnation,
        };
        if let Err(e) = socket.send_to(&ack.encode(), from) {
            shared
                .metrics
                .dropped
                .get_or_create(&Reason {
                    reason: "ack_send_failed",
                })
                .inc();
            tracing::debug!(error = %e, %from, "cannot send heartbeat ack");
        }
    }
}

fn drop_reason(e: &DatagramError) -> &'static str {
    match e {
        DatagramError::Size { .. } => "size",
        DatagramError::Magic => "magic",
        DatagramError::Version(_) => "version",
        DatagramError::Malformed => "malformed",
    }
}
