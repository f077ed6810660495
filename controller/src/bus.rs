//! The message bus: pushes each new topology to every live or leaving
//! worker at once, over the wire protocol (a leaving worker learns this way
//! that it is out of the ring, and whom to hand its keys to).
//!
//! One link task per worker holds a connection to its wire port and sends
//! the latest topology whenever the epoch moves past what the worker last
//! acknowledged. All links watch the same channel, so a publication reaches
//! every worker in parallel. A worker whose heartbeat shows an older epoch
//! nudges its link, which pushes again: the safety net for a lost push.

use crate::metrics::Outcome;
use crate::state::{Published, Shared};
use kv_client::{Connection, Credentials};
use kv_service::Backoff;
use kv_wire::{Member, Request, Response, Topology};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How long connecting, the hello and one push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Retry delays after a failed push.
const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

struct Link {
    member: Member,
    nudge: Arc<Notify>,
    stop: CancellationToken,
}

/// Runs the bus until `shutdown`: keeps one link per live or leaving worker.
pub async fn run(
    shared: Arc<Shared>,
    credentials: Credentials,
    mut lagging: mpsc::Receiver<String>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut published = shared.subscribe();
    let mut links: HashMap<String, Link> = HashMap::new();
    loop {
        let current = published.borrow_and_update().clone();
        reconcile(
            &mut links,
            &current.topology,
            &shared,
            &credentials,
            &published,
            &shutdown,
            &tracker,
        );
        tokio::select! {
            changed = published.changed() => if changed.is_err() { break },
            Some(id) = lagging.recv() => {
                if let Some(link) = links.get(&id) {
                    link.nudge.notify_one();
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
    for link in links.values() {
        link.stop.cancel();
    }
}

/// Starts links for new or changed members and stops those of departed ones.
fn reconcile(
    links: &mut HashMap<String, Link>,
    topology: &Topology,
    shared: &Arc<Shared>,
    credentials: &Credentials,
    published: &watch::Receiver<Arc<Published>>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    links.retain(|id, link| {
        let keep = topology
            .everyone()
            .any(|m| m.id == *id && *m == link.member);
        if !keep {
            link.stop.cancel();
        }
        keep
    });
    for member in topology.everyone() {
        if links.contains_key(&member.id) {
            continue;
        }
        let link = Link {
            member: member.clone(),
            nudge: Arc::new(Notify::new()),
            stop: shutdown.child_token(),
        };
        tracker.spawn(push_loop(
            member.clone(),
            credentials.clone(),
            published.clone(),
            link.nudge.clone(),
            link.stop.clone(),
            shared.clone(),
        ));
        links.insert(member.id.clone(), link);
    }
}

/// Keeps one worker up to date until stopped.
async fn push_loop(
    member: Member,
    credentials: Credentials,
    mut published: watch::Receiver<Arc<Published>>,
    nudge: Arc<Notify>,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    let mut connection: Option<Connection> = None;
    let mut acked = 0;
    let mut retry = RETRY;
    loop {
        let latest = published.borrow_and_update().clone();
        let epoch = latest.topology.epoch;
        if epoch > acked {
            match push(&mut connection, &member, &credentials, &latest.topology).await {
                Ok(now_at) => {
                    acked = now_at;
                    retry.reset();
                    shared
                        .metrics
                        .pushes
                        .get_or_create(&Outcome { outcome: "ok" })
                        .inc();
                    debug!(node = %member.id, epoch, "topology pushed");
                }
                Err(error) => {
                    connection = None;
                    shared
                        .metrics
                        .pushes
                        .get_or_create(&Outcome { outcome: "error" })
                        .inc();
                    warn!(node = %member.id, addr = %member.wire_addr(), epoch, %error, "topology push failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(retry.next_wait()) => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
            () = nudge.notified() => {
                // The worker says it is behind what it acknowledged: it lost
                // state (or the ack lied); push again.
                acked = acked.min(epoch.saturating_sub(1));
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Sends `topology` over `connection` (opening it first if needed); returns
/// the epoch the worker now holds.
async fn push(
    connection: &mut Option<Connection>,
    member: &Member,
    credentials: &Credentials,
    topology: &Topology,
) -> Result<u64, String> {
    let conn = match connection {
        Some(conn) if !conn.is_closed() => conn,
        _ => {
            let conn = Connection::connect(&member.wire_addr(), credentials, PUSH_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            // The address may belong to another worker by now (a reused IP):
            // never hand it this worker's topology as if it were this worker.
            if conn.welcome().node != member.id {
                return Err(format!(
                    "{} answers as {}",
                    member.wire_addr(),
                    conn.welcome().node
                ));
            }
            connection.insert(conn)
        }
    };
    match conn.call(Request::Topology(topology.clone())).await {
        Ok(Response::TopologyAccepted { epoch }) => Ok(epoch),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
