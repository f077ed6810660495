//! The wire-protocol server: clients and peers, pipelined.
//!
//! Each connection has a reader (this task) and a writer shared under a
//! lock. Cheap requests — local reads, replication batches, offers,
//! topology pushes — are answered inline, in order, and their answers go
//! out in one write once every request read so far is answered; writes and
//! quorum reads, which wait on other workers, run as tasks of their own and
//! write their answer when done (sharing a write with the answers done in
//! the same turn of the event loop), so one slow write does not hold up the
//! requests behind it. A connection has at most [`MAX_IN_FLIGHT`] such
//! tasks: past that it stops reading, and TCP pushes back on the client.
//! Across connections, the node bounds the keys it coordinates at once
//! ([`crate::node::MAX_COORDINATING`]): a task past that waits its turn.

use crate::node::{Node, OwnCopy};
use futures::{FutureExt, SinkExt, StreamExt};
use kv_wire::auth::RefusalLog;
use kv_wire::message::{Challenge, Consistency, Hello, Refusal};
use kv_wire::{
    ClientFrame, ClusterSecret, Entry, FrameCodec, HelloError, Request, Response, ServerFrame,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Time a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most; more are refused.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Waiting requests per connection at most.
pub const MAX_IN_FLIGHT: usize = 1024;

/// How the wire server treats its connections.
#[derive(Debug)]
pub struct Settings {
    /// The cluster name every hello must carry.
    pub cluster: String,
    /// The cluster secret every hello must prove, if the cluster has one.
    pub secret: Option<ClusterSecret>,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// A connection that completes no frame for this long is closed: it
    /// bounds how long a stalled or half-sent frame holds a connection slot
    /// and its buffer. Pooled peer connections that idle this long simply
    /// reconnect on next use.
    pub idle_timeout: Duration,
    /// Which refused hellos get a log line (one per peer per minute).
    pub refusals: Mutex<RefusalLog>,
}

impl Settings {
    /// Settings for `cluster` (and `secret`, if any), closing connections
    /// idle for `idle_timeout`, with the default frame limit.
    pub fn new(
        cluster: impl Into<String>,
        secret: Option<ClusterSecret>,
        idle_timeout: Duration,
    ) -> Settings {
        Settings {
            cluster: cluster.into(),
            secret,
            max_frame: kv_wire::DEFAULT_MAX_FRAME_LEN,
            idle_timeout,
            refusals: Mutex::default(),
        }
    }

    fn should_log(&self, peer: SocketAddr) -> bool {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .should_log(peer.ip(), Instant::now())
    }
}

/// Accepts connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: back off, keep serving.
                    warn!(error = %e, "wire accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many wire connections; refusing one");
            let mut writer = FramedWrite::new(
                stream,
                FrameCodec::<ClientFrame, ServerFrame>::new(settings.max_frame),
            );
            let refusal = Refusal::busy(format!(
                "this worker has {MAX_CONNECTIONS} connections open; retry later"
            ));
            tokio::spawn(async move {
                let _ = writer.send(ServerFrame::Refused(refusal)).await;
            });
            continue;
        };
        let (node, settings, shutdown) = (node.clone(), settings.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(reason) = connection(stream, peer, node, &settings, shutdown).await {
                debug!(%peer, %reason, "wire connection closed");
            }
            drop(slot);
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    node: Arc<Node>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let max_frame = settings.max_frame;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::<ClientFrame, ServerFrame>::new(max_frame));
    let mut writer = FramedWrite::new(
        write,
        FrameCodec::<ClientFrame, ServerFrame>::new(max_frame),
    );

    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ClientFrame::Hello(hello)))) => hello,
        Ok(Some(Ok(_))) => return refuse(&mut writer, "the first frame must be a hello").await,
        Ok(Some(Err(e))) => return refuse(&mut writer, &format!("unreadable hello: {e}")).await,
        Ok(None) => return Err("closed before the hello".into()),
        Err(_) => return refuse(&mut writer, "no hello within 5 s").await,
    };
    let proved = match admit(&hello, &mut reader, &mut writer, settings).await {
        Ok(proved) => proved,
        Err(e) => {
            if e.is_auth() {
                node.metrics.refused("hello", e.kind());
            }
            if settings.should_log(peer) {
                warn!(%peer, from = %hello.from, reason = %e, "wire hello refused (further refusals of this peer are not logged for a minute)");
            }
            return refuse(&mut writer, &e.to_string()).await;
        }
    };
    let welcome = hello.welcome(
        node.id.clone(),
        node.topologies.current().epoch(),
        proved
            .as_ref()
            .map(|(challenge, secret)| (challenge, *secret)),
    );
    writer
        .send(ServerFrame::Welcome(welcome))
        .await
        .map_err(|e| e.to_string())?;

    // No writer task: an answer costs no hand-off through a channel and no
    // wake-up of another task (server CPU per op 10-15% lower, PUT and
    // 90/10, with as many writes per op).
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Made once, not for every wait: the shutdown signal, and the idle
    // deadline, which moves only when it comes (to the last frame's time
    // plus the timeout) instead of being a new timer each time.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let idle = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(idle);
    let mut last_frame = tokio::time::Instant::now();
    let result = loop {
        let frame = match reader.next().now_or_never() {
            Some(frame) => frame,
            None => {
                if let Err(e) = writer.lock().await.flush().await {
                    break Err(format!("cannot write: {e}"));
                }
                tokio::select! {
                    frame = reader.next() => frame,
                    () = &mut idle => {
                        let quiet_until = last_frame + settings.idle_timeout;
                        if tokio::time::Instant::now() >= quiet_until {
                            break Err(format!("no complete frame within {:?}", settings.idle_timeout));
                        }
                        idle.as_mut().reset(quiet_until);
                        continue;
                    }
                    () = &mut cancelled => break Ok(()),
                }
            }
        };
        last_frame = tokio::time::Instant::now();
        let (id, body) = match frame {
            Some(Ok(ClientFrame::Request { id, body })) => (id, body),
            Some(Ok(ClientFrame::Hello(_))) => break Err("a second hello".to_string()),
            Some(Ok(ClientFrame::Proof(_))) => break Err("a proof nobody asked for".to_string()),
            Some(Err(e)) => break Err(format!("bad frame: {e}")),
            None => break Ok(()),
        };
        let answered = match own_copy_now(&node, body) {
            Ok(answered) => answered,
            Err(body) if waits_on_peers(&body) => {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break Ok(());
                };
                let (node, writer) = (node.clone(), writer.clone());
                tokio::spawn(async move {
                    let body = answer(&node, body).await;
                    // Feed the answer, then let the other answers done in this
                    // turn of the event loop feed theirs (one replica's
                    // acknowledgements finish several writes at once) before
                    // one flush sends them all; later flushes find nothing
                    // left. A failed write shows in the reader's next flush.
                    let fed = writer
                        .lock()
                        .await
                        .feed(ServerFrame::Response { id, body })
                        .await;
                    if fed.is_ok() {
                        tokio::task::yield_now().await;
                        let _ = writer.lock().await.flush().await;
                    }
                    drop(permit);
                });
                continue;
            }
            Err(body) => answer(&node, body).await,
        };
        if let Err(e) = writer
            .lock()
            .await
            .feed(ServerFrame::Response { id, body: answered })
            .await
        {
            break Err(format!("cannot write: {e}"));
        }
    };
    if let Err(reason) = &result {
        // Tell the client why, if the writer still works, then close.
        let _ = writer
            .lock()
            .await
            .send(ServerFrame::Refused(Refusal::new(reason.clone())))
            .await;
    }
    result
}

type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec<ClientFrame, ServerFrame>>;
type Writer = FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec<ClientFrame, ServerFrame>>;

/// Checks a hello and, with a cluster secret, challenges the client to
/// prove it: the challenge it proved itself over (and the secret), or why
/// the connection is refused.
async fn admit<'s>(
    hello: &Hello,
    reader: &mut Reader,
    writer: &mut Writer,
    settings: &'s Settings,
) -> Result<Option<(Challenge, &'s ClusterSecret)>, HelloError> {
    let secret = settings.secret.as_ref();
    hello.check(&settings.cluster, secret)?;
    let Some(secret) = secret else {
        return Ok(None);
    };
    let challenge = Challenge::new();
    if writer
        .send(ServerFrame::Challenge(challenge))
        .await
        .is_err()
    {
        return Err(HelloError::NoProof);
    }
    match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ClientFrame::Proof(proof)))) => {
            hello.check_proof(&challenge, &proof, secret)?;
            Ok(Some((challenge, secret)))
        }
        _ => Err(HelloError::NoProof),
    }
}

async fn refuse(writer: &mut Writer, reason: &str) -> Result<(), String> {
    let _ = writer
        .send(ServerFrame::Refused(Refusal::new(reason)))
        .await;
    Err(reason.to_string())
}

fn waits_on_peers(body: &Request) -> bool {
    matches!(
        body,
        Request::Put { .. }
            | Request::Delete { .. }
            | Request::PutMany { .. }
            | Request::Get {
                consistency: Consistency::Quorum | Consistency::Owner { .. },
                ..
            }
    )
}

/// A client's read of this worker's own copy ([`Consistency::Owner`]),
/// answered at once when the worker can vouch for it, as it nearly
/// always can; the request back otherwise (any other request, or one that
/// must be coordinated: a task of its own, as [`answer`] does it).
fn own_copy_now(node: &Node, body: Request) -> Result<Response, Request> {
    match body {
        Request::Get {
            key,
            consistency: Consistency::Owner { epoch },
        } => match node.own_copy(&key, epoch) {
            Some(copy) => Ok(own_copy_answer(node, key, copy)),
            None => Err(Request::Get {
                key,
                consistency: Consistency::Owner { epoch },
            }),
        },
        other => Err(other),
    }
}

fn own_copy_answer(node: &Node, key: String, own: OwnCopy) -> Response {
    node.metrics.own_copy(own.copy.is_some(), own.primary);
    Response::OwnCopy(own.copy.map(|c| Entry {
        key,
        version: c.version,
        value: c.value,
    }))
}

/// A quorum read's answer to a client: tombstones read as absent.
async fn quorum_answer(node: &Node, key: String) -> Response {
    match node.get_quorum(&key).await {
        Ok(copy) => {
            // Clients never see tombstones.
            let live = copy.filter(|c| c.value.is_some());
            node.metrics.count(
                "get_quorum",
                if live.is_some() { "ok" } else { "not_found" },
            );
            Response::Value(live.map(|c| Entry {
                key,
                version: c.version,
                value: c.value,
            }))
        }
        Err(e) => {
            node.metrics.count("get_quorum", e.label());
            Response::Failed(e.to_failure())
        }
    }
}

/// The answer to one request.
pub async fn answer(node: &Node, body: Request) -> Response {
    let metrics = &node.metrics;
    match body {
        Request::Get {
            key,
            consistency: Consistency::Local,
        } => {
            let copy = node.get_local(&key);
            metrics.count("get", if copy.is_some() { "ok" } else { "not_found" });
            Response::Value(copy.map(|c| Entry {
                key,
                version: c.version,
                value: c.value,
            }))
        }
        Request::Get {
            key,
            consistency: Consistency::Quorum,
        } => quorum_answer(node, key).await,
        Request::Get {
            key,
            consistency: Consistency::Owner { epoch },
        } => match node.own_copy(&key, epoch) {
            Some(copy) => own_copy_answer(node, key, copy),
            None => quorum_answer(node, key).await,
        },
        Request::Put { key, value } => {
            written(node, "put", node.coordinate(&key, Some(value)).await)
        }
        Request::Delete { key } => written(node, "delete", node.coordinate(&key, None).await),
        Request::PutMany { items } => {
            let results = node.put_many(items).await;
            let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
            metrics.count_many("put", "ok", ok);
            metrics.count_many("put", "error", results.len() as u64 - ok);
            Response::PutMany(results)
        }
        Request::Replicate { entries } => {
            metrics.count("replicate", "ok");
            node.replicate(entries).await
        }
        Request::Offer { items } => {
            metrics.count("offer", "ok");
            node.offered(&items).await
        }
        Request::Compare { ranges } => {
            metrics.count("compare", "ok");
            crate::ranges::compare(node.store.as_ref(), &ranges)
        }
        Request::List { range, after } => {
            metrics.count("list", "ok");
            crate::ranges::list(node.store.as_ref(), range, after.as_deref())
        }
        Request::FetchRange { range, after } => {
            metrics.count("fetch_range", "ok");
            crate::ranges::fetch_range(node.store.as_ref(), range, after.as_deref())
        }
        Request::Fetch { keys } => {
            metrics.count("fetch", "ok");
            crate::ranges::fetch(node.store.as_ref(), keys)
        }
        Request::Stats => {
            metrics.count("stats", "ok");
            Response::Stats(Box::new(node.stats()))
        }
        Request::Topology(topology) => {
            metrics.count("topology", "ok");
            let epoch = node.topologies.offer(topology);
            metrics.epoch.set(epoch as i64);
            Response::TopologyAccepted { epoch }
        }
    }
}

fn written(
    node: &Node,
    op: &'static str,
    result: Result<crate::node::Written, crate::node::OpError>,
) -> Response {
    match result {
        Ok(w) => {
            node.metrics.count(op, "ok");
            Response::Written {
                version: w.version,
                acks: w.acks,
            }
        }
        Err(e) => {
            node.metrics.count(op, e.label());
            Response::Failed(e.to_failure())
        }
    }
}
