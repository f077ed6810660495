//! The UDP heartbeat loop: receives heartbeats, answers each with an ack,
//! and drives the failure detector.
//!
//! It runs on an OS thread of its own with blocking sockets, so no amount of
//! HTTP or bus work on the async runtime can delay a heartbeat or the
//! detector's clock: a busy controller must not declare healthy workers DOWN.
//!
//! With a cluster secret, a heartbeat counts only if its MAC is right and
//! its sequence number is above the last one counted for that worker; a
//! refused heartbeat gets no ack, and the acks that are sent are sealed and
//! bound to the heartbeat they answer.

use crate::detector::Observation;
use crate::state::Shared;
use kv_wire::auth::TAG_LEN;
use kv_wire::heartbeat::{Datagram, Heartbeat, HeartbeatAck};
use kv_wire::DatagramError;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
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
        let Some(hb) = open(&shared, &buf[..len], from) else {
            continue;
        };
        let (outcome, epoch) = shared.heartbeat(&hb);
        let authenticated = shared.guard.secret().is_some();
        match outcome.observation {
            Observation::Alive | Observation::Recovered(_) => {
                shared.metrics.heartbeats.inc();
            }
            Observation::StaleGeneration => shared.metrics.drop("stale_generation"),
            Observation::UnknownMember => shared.metrics.drop("unknown_member"),
            Observation::Replayed if authenticated => {
                shared.refused(
                    from.ip(),
                    "heartbeat",
                    "replayed",
                    "a heartbeat whose sequence number was seen before (a replay)",
                );
                // A replay learns nothing, not even an ack.
                continue;
            }
            Observation::Replayed => shared.metrics.drop("old_seq"),
        }
        if outcome.lagging {
            if let Some(id) = shared.membership().id_of(hb.member) {
                // A full queue means nudges are pending already: fine to drop.
                let _ = lagging.try_send(id.to_string());
            }
        }
        // Every heartbeat is answered, even from members we do not know (if
        // it proves the secret, when there is one): the ack carries our
        // incarnation, which is how a worker of a previous controller learns
        // it must register again.
        let ack = HeartbeatAck {
            epoch,
            incarnation: shared.incarnation,
        };
        if let Err(e) = socket.send_to(&ack.seal(&hb, shared.guard.secret()), from) {
            shared.metrics.drop("ack_send_failed");
            tracing::debug!(error = %e, %from, "cannot send heartbeat ack");
        }
    }
}

/// The heartbeat in a datagram, if it is one and, with a cluster secret,
/// proves it; anything else is counted (and refusals logged).
fn open(shared: &Shared, datagram: &[u8], from: SocketAddr) -> Option<Heartbeat> {
    let secret = shared.guard.secret();
    match Heartbeat::open(datagram, secret) {
        Ok(hb) => Some(hb),
        // A plain heartbeat where a sealed one is due: a worker without the
        // secret, which should hear so in the log.
        Err(_) if secret.is_some() && Heartbeat::decode(datagram).is_ok() => {
            shared.refused(
                from.ip(),
                "heartbeat",
                "missing",
                "a heartbeat without a MAC: the worker has no cluster secret",
            );
            None
        }
        // A sealed heartbeat where a plain one is due: a worker with a
        // secret this controller lacks.
        Err(_) if secret.is_none() && looks_sealed(datagram) => {
            shared.refused(from.ip(), "heartbeat", "unexpected", "a heartbeat with a MAC: the worker has a cluster secret and this controller has none");
            None
        }
        Err(DatagramError::Unauthenticated) => {
            shared.refused(
                from.ip(),
                "heartbeat",
                "wrong",
                "a heartbeat with a wrong MAC: forged, or the worker's cluster secret differs",
            );
            None
        }
        Err(e) => {
            shared.metrics.drop(drop_reason(&e));
            None
        }
    }
}

/// Whether a datagram is a heartbeat followed by a MAC.
fn looks_sealed(datagram: &[u8]) -> bool {
    datagram
        .len()
        .checked_sub(TAG_LEN)
        .is_some_and(|body| Heartbeat::decode(&datagram[..body]).is_ok())
}

fn drop_reason(e: &DatagramError) -> &'static str {
    match e {
        DatagramError::Size { .. } => "size",
        DatagramError::Magic => "magic",
        DatagramError::Version(_) => "version",
        DatagramError::Malformed => "malformed",
        DatagramError::Unauthenticated => "unauthenticated",
    }
}
