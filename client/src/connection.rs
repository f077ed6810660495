//! A pipelined wire-protocol connection, and a pool of them.
//!
//! A writer task sends requests as callers submit them (flushing once per
//! burst, so concurrent callers share syscalls), a reader task matches
//! responses to callers by request id. Reading and writing never wait on
//! each other, so a peer that is slow to read cannot stop us from draining
//! its responses. At most [`MAX_IN_FLIGHT`] requests wait for answers; past
//! that, callers wait for room (back-pressure, not unbounded memory). A
//! call's deadline waits beside it, and the reader times out the overdue
//! calls on one timer (see `pending`), not a timer per call.

use crate::pending::Pending;
use futures::{SinkExt, StreamExt};
use kv_wire::message::{Hello, Welcome};
use kv_wire::{
    ClientFrame, ClusterSecret, FrameCodec, Member, Request, Response, ServerFrame, WireError,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// Requests in flight per connection before callers wait.
pub const MAX_IN_FLIGHT: usize = 4096;

/// Who the connecting side is: the cluster and name its hello carries, and
/// the cluster secret it proves, if the cluster has one.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The cluster's name.
    pub cluster: String,
    /// Who is connecting, for the server's logs.
    pub from: String,
    /// The cluster secret, if any.
    pub secret: Option<ClusterSecret>,
}

impl Credentials {
    /// Credentials without a secret.
    pub fn new(cluster: impl Into<String>, from: impl Into<String>) -> Credentials {
        Credentials {
            cluster: cluster.into(),
            from: from.into(),
            secret: None,
        }
    }

    /// The same, proving `secret` (if some).
    pub fn with_secret(self, secret: Option<ClusterSecret>) -> Credentials {
        Credentials { secret, ..self }
    }
}

/// Why a call failed.
#[derive(Debug, Error, Clone)]
pub enum ConnectionError {
    /// Could not connect (refused, unreachable, bad address).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// The OS's words.
        reason: String,
    },
    /// The server refused the handshake.
    #[error("refused by {addr}: {reason}")]
    Refused {
        /// The address.
        addr: String,
        /// The server's words.
        reason: String,
        /// Whether the server said to retry later (it is busy).
        retry: bool,
    },
    /// The server could not prove the cluster secret: this client will not
    /// trust it with requests.
    #[error("{addr} is not trusted: {reason}")]
    Unauthenticated {
        /// The address.
        addr: String,
        /// What was wrong.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer from {addr} within {after:?}")]
    Timeout {
        /// The address.
        addr: String,
        /// The time allowed.
        after: Duration,
    },
    /// The address answered as another worker than the one expected.
    #[error("{addr} is {found} now, not {expected}")]
    WrongNode {
        /// The address.
        addr: String,
        /// The worker meant.
        expected: String,
        /// The worker that answered.
        found: String,
    },
    /// The connection broke before the answer came.
    #[error("connection to {addr} lost: {reason}")]
    Lost {
        /// The address.
        addr: String,
        /// What broke.
        reason: String,
    },
}

impl ConnectionError {
    /// Whether retrying cannot help: the server refused who this client is
    /// (another cluster, no or another cluster secret), or could not prove
    /// who it is.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ConnectionError::Refused { retry: false, .. } | ConnectionError::Unauthenticated { .. }
        )
    }
}

/// Whether a connection has broken: a flag for the per-call check (a
/// `CancellationToken` takes a lock to answer) and a token to wake the
/// reader and writer tasks.
#[derive(Debug, Default)]
struct Closed {
    flag: AtomicBool,
    token: CancellationToken,
}

impl Closed {
    fn close(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn is_closed(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// One pipelined connection to a worker.
#[derive(Debug)]
pub struct Connection {
    addr: String,
    welcome: Welcome,
    calls: mpsc::Sender<(u64, Request)>,
    pending: Arc<Pending>,
    room: Arc<Semaphore>,
    next_id: AtomicU64,
    closed: Arc<Closed>,
    timeout: Duration,
}

impl Connection {
    /// Connects to `addr`, says hello and waits for the welcome (with a
    /// secret in the credentials: answers the server's challenge with proof
    /// of it, and requires the welcome to prove it back); the handshake and
    /// each later call may take at most `timeout`.
    pub async fn connect(
        addr: &str,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let lost = |reason: String| ConnectionError::Lost {
            addr: addr.to_string(),
            reason,
        };
        let handshake = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| ConnectionError::Connect {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
            stream.set_nodelay(true).map_err(|e| lost(e.to_string()))?;
            let (read, write) = stream.into_split();
            let mut reader =
                FramedRead::new(read, FrameCodec::<ServerFrame, ClientFrame>::default());
            let mut writer =
                FramedWrite::new(write, FrameCodec::<ServerFrame, ClientFrame>::default());
            let secret = credentials.secret.as_ref();
            let hello = Hello::new(&credentials.cluster, &credentials.from).with_secret(secret);
            writer
                .send(ClientFrame::Hello(hello.clone()))
                .await
                .map_err(|e| lost(e.to_string()))?;
            // With a secret, the server challenges before it welcomes.
            let mut challenge = None;
            let welcome = loop {
                match handshake_frame(&mut reader, addr).await? {
                    ServerFrame::Welcome(welcome) => break welcome,
                    ServerFrame::Challenge(c) if challenge.is_none() => {
                        let secret = secret.ok_or_else(|| ConnectionError::Unauthenticated {
                            addr: addr.to_string(),
                            reason: "challenged for a cluster secret this client was not given"
                                .into(),
                        })?;
                        writer
                            .send(ClientFrame::Proof(hello.proof(&c, secret)))
                            .await
                            .map_err(|e| lost(e.to_string()))?;
                        challenge = Some(c);
                    }
                    other => return Err(lost(format!("unexpected in the handshake: {other:?}"))),
                }
            };
            hello
                .check_welcome(&welcome, challenge.as_ref(), secret)
                .map_err(|e| ConnectionError::Unauthenticated {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
            Ok((reader, writer, welcome))
        };
        let (reader, writer, welcome) =
            tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| ConnectionError::Timeout {
                    addr: addr.to_string(),
                    after: timeout,
                })??;

        let (calls, queue) = mpsc::channel(1024);
        let pending = Arc::new(Pending::default());
        let closed = Arc::new(Closed::default());
        tokio::spawn(write_loop(
            writer,
            queue,
            pending.clone(),
            closed.clone(),
            addr.to_string(),
        ));
        tokio::spawn(read_loop(
            reader,
            pending.clone(),
            closed.clone(),
            addr.to_string(),
        ));
        Ok(Connection {
            addr: addr.to_string(),
            welcome,
            calls,
            pending,
            room: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            next_id: AtomicU64::new(1),
            closed,
            timeout,
        })
    }

    /// The server's welcome.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The address connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the connection has broken (calls would fail).
    pub fn is_closed(&self) -> bool {
        self.closed.is_closed()
    }

    /// Sends a request and waits for its response, at most the timeout
    /// given at connect.
    pub async fn call(&self, body: Request) -> Result<Response, ConnectionError> {
        self.call_within(body, self.timeout).await
    }

    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn call_within(
        &self,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, ConnectionError> {
        let lost = || ConnectionError::Lost {
            addr: self.addr.clone(),
            reason: "connection closed".into(),
        };
        let timed_out = || ConnectionError::Timeout {
            addr: self.addr.clone(),
            after: timeout,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        // Room and queue space are there at once unless thousands of calls
        // wait: only then does a timer of its own bound the wait. Once
        // registered, the call is timed out by the reader's sweep.
        let _room = match self.room.try_acquire() {
            Ok(room) => room,
            Err(TryAcquireError::Closed) => return Err(lost()),
            Err(TryAcquireError::NoPermits) => {
                tokio::time::timeout_at(deadline, self.room.acquire())
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|_| lost())?
            }
        };
        let answer = self.pending.register(id, deadline, timeout);
        // Checked once registered: a connection that closes from now on
        // fails the call.
        let sent = if self.is_closed() {
            Err(lost())
        } else {
            match self.calls.try_send((id, body)) {
                Ok(()) => Ok(()),
                Err(TrySendError::Closed(_)) => Err(lost()),
                Err(TrySendError::Full(call)) => {
                    match tokio::time::timeout_at(deadline, self.calls.send(call)).await {
                        Ok(sent) => sent.map_err(|_| lost()),
                        Err(_) => Err(timed_out()),
                    }
                }
            }
        };
        if let Err(e) = sent {
            self.pending.forget(id);
            return Err(e);
        }
        answer.await.map_err(|_| lost())?
    }

    /// Closes the connection; calls in flight fail.
    pub fn close(&self) {
        self.closed.close();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.closed.close();
    }
}

/// The next frame of a handshake; a refusal or a close is an error.
async fn handshake_frame(reader: &mut Reader, addr: &str) -> Result<ServerFrame, ConnectionError> {
    let lost = |reason: String| ConnectionError::Lost {
        addr: addr.to_string(),
        reason,
    };
    match reader.next().await {
        Some(Ok(ServerFrame::Refused(r))) => Err(ConnectionError::Refused {
            addr: addr.to_string(),
            reason: r.reason,
            retry: r.retry,
        }),
        Some(Ok(frame)) => Ok(frame),
        Some(Err(e)) => Err(lost(e.to_string())),
        None => Err(lost("closed during the handshake".into())),
    }
}

type Writer = FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec<ServerFrame, ClientFrame>>;
type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec<ServerFrame, ClientFrame>>;

async fn write_loop(
    mut writer: Writer,
    mut queue: mpsc::Receiver<(u64, Request)>,
    pending: Arc<Pending>,
    closed: Arc<Closed>,
    addr: String,
) {
    // One wait for closing, not one per burst (each takes a lock).
    let cancelled = closed.token.cancelled();
    tokio::pin!(cancelled);
    let result: Result<(), WireError> = async {
        loop {
            let (id, body) = tokio::select! {
                next = queue.recv() => match next { Some(call) => call, None => return Ok(()) },
                () = &mut cancelled => return Ok(()),
            };
            writer.feed(ClientFrame::Request { id, body }).await?;
            // Let the callers already runnable on this thread queue their
            // requests too, then send everything queued in one flush: a
            // worker's quorum reads to one peer share a write (server CPU
            // per operation of a 90% read load down 10-15%).
            tokio::task::yield_now().await;
            while let Ok((id, body)) = queue.try_recv() {
                writer.feed(ClientFrame::Request { id, body }).await?;
            }
            writer.flush().await?;
        }
    }
    .await;
    let reason = result.err().map_or("closed".into(), |e| e.to_string());
    pending.fail_all(&addr, &reason);
    closed.close();
}

/// Reads the answers and passes each to its call; times out the calls
/// that wait too long (see `pending`).
async fn read_loop(mut reader: Reader, pending: Arc<Pending>, closed: Arc<Closed>, addr: String) {
    // One wait for closing, not one per frame (each takes a lock).
    let cancelled = closed.token.cancelled();
    tokio::pin!(cancelled);
    let rearm = pending.rearm.notified();
    tokio::pin!(rearm);
    // Armed only while calls wait; reset, not made anew, when it moves.
    let sweep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sweep);
    let mut armed = false;
    let reason = loop {
        let frame = tokio::select! {
            frame = reader.next() => frame,
            () = &mut cancelled => break "closed".to_string(),
            () = &mut rearm => {
                rearm.set(pending.rearm.notified());
                armed = arm(sweep.as_mut(), pending.next_sweep());
                continue;
            }
            () = &mut sweep, if armed => {
                armed = arm(sweep.as_mut(), pending.sweep(Instant::now(), &addr));
                continue;
            }
        };
        match frame {
            Some(Ok(ServerFrame::Response { id, body })) => pending.answer(id, body),
            Some(Ok(ServerFrame::Refused(r))) => break format!("refused: {}", r.reason),
            Some(Ok(other)) => break format!("unexpected frame {other:?}"),
            Some(Err(e)) => break e.to_string(),
            None => break "closed by the server".to_string(),
        }
    };
    closed.close();
    pending.fail_all(&addr, &reason);
}

/// Sets the sweep for `at`, if any; whether it is armed.
fn arm(sweep: std::pin::Pin<&mut tokio::time::Sleep>, at: Option<Instant>) -> bool {
    match at {
        Some(at) => {
            if sweep.deadline() != at {
                sweep.reset(at);
            }
            true
        }
        None => false,
    }
}

/// Connections by worker id, each to the address the worker had when it
/// was opened; opened on first use, replaced when broken or when the
/// worker moves. Keyed by id rather than by address, a call finds its
/// connection without formatting an address (every request of a client,
/// and every replication batch and quorum read of a worker, does this).
#[derive(Debug)]
pub struct Pool {
    credentials: Credentials,
    timeout: Duration,
    connections: Mutex<HashMap<String, Pooled>>,
}

/// A pooled connection, and where it goes.
#[derive(Debug)]
struct Pooled {
    host: String,
    wire_port: u16,
    conn: Arc<Connection>,
}

impl Pooled {
    /// Whether this is a live connection to where `member` is now.
    fn serves(&self, member: &Member) -> bool {
        !self.conn.is_closed() && self.wire_port == member.wire_port && self.host == member.host
    }
}

impl Pool {
    /// A pool that connects with `credentials` and waits at most `timeout`.
    pub fn new(credentials: Credentials, timeout: Duration) -> Pool {
        Pool {
            credentials,
            timeout,
            connections: Mutex::default(),
        }
    }

    /// A live connection to `member`, connecting if needed. The node that
    /// answers must be that member: an address can pass to another worker
    /// (a pod IP reused, a container reattached), and a copy it acknowledged
    /// would be counted for the wrong owner.
    pub async fn get(&self, member: &Member) -> Result<Arc<Connection>, ConnectionError> {
        let cached = self
            .lock()
            .get(&member.id)
            .filter(|pooled| pooled.serves(member))
            .map(|pooled| pooled.conn.clone());
        let conn = match cached {
            Some(conn) => conn,
            None => {
                let fresh = Arc::new(
                    Connection::connect(&member.wire_addr(), &self.credentials, self.timeout)
                        .await?,
                );
                let mut connections = self.lock();
                // Another caller may have connected meanwhile: keep one.
                match connections.get(&member.id) {
                    Some(existing) if existing.serves(member) => existing.conn.clone(),
                    _ => {
                        let pooled = Pooled {
                            host: member.host.clone(),
                            wire_port: member.wire_port,
                            conn: fresh.clone(),
                        };
                        connections.insert(member.id.clone(), pooled);
                        fresh
                    }
                }
            }
        };
        if conn.welcome().node != member.id {
            let found = conn.welcome().node.clone();
            self.forget(&member.id);
            return Err(ConnectionError::WrongNode {
                addr: conn.addr().to_string(),
                expected: member.id.clone(),
                found,
            });
        }
        Ok(conn)
    }

    /// Sends `body` to `member` on a pooled connection.
    pub async fn call(&self, member: &Member, body: Request) -> Result<Response, ConnectionError> {
        let conn = self.get(member).await?;
        let result = conn.call(body).await;
        if let Err(ConnectionError::Timeout { .. }) = result {
            // A peer that does not answer in time may be wedged: start afresh
            // next time rather than queue behind it.
            conn.close();
        }
        result
    }

    /// Closes and forgets the connection to worker `id`, if any.
    pub fn forget(&self, id: &str) {
        if let Some(pooled) = self.lock().remove(id) {
            pooled.conn.close();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pooled>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_wire::message::Consistency;
    use tokio::net::TcpListener;

    /// A connection to a server that answers the reads of key "answer"
    /// and leaves every other request unanswered.
    async fn connected_to_a_choosy_server() -> Connection {
        let addr = choosy_server().await;
        let credentials = Credentials::new("kv", "test");
        Connection::connect(&addr, &credentials, Duration::from_secs(5))
            .await
            .unwrap()
    }

    /// A server that welcomes one connection and answers the reads of key
    /// "answer", leaving every other request unanswered.
    async fn choosy_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, write) = stream.into_split();
            let mut reader =
                FramedRead::new(read, FrameCodec::<ClientFrame, ServerFrame>::default());
            let mut writer =
                FramedWrite::new(write, FrameCodec::<ClientFrame, ServerFrame>::default());
            while let Some(Ok(frame)) = reader.next().await {
                let answer = match frame {
                    ClientFrame::Hello(hello) => ServerFrame::Welcome(hello.welcome("w1", 1, None)),
                    ClientFrame::Request {
                        id,
                        body: Request::Get { key, .. },
                    } if key == "answer" => ServerFrame::Response {
                        id,
                        body: Response::Value(None),
                    },
                    _ => continue,
                };
                writer.send(answer).await.unwrap();
            }
        });
        addr
    }

    fn get(key: &str) -> Request {
        Request::Get {
            key: key.into(),
            consistency: Consistency::Local,
        }
    }

    /// A call's outcome and how long it took; a call that never ends fails
    /// the test instead of hanging it.
    async fn timed(
        conn: &Connection,
        key: &str,
        timeout: Duration,
    ) -> (Result<Response, ConnectionError>, Duration) {
        let start = Instant::now();
        let call = conn.call_within(get(key), timeout);
        let outcome = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("the call ended");
        (outcome, start.elapsed())
    }

    #[tokio::test]
    async fn unanswered_calls_time_out_and_answered_ones_do_not() {
        let conn = connected_to_a_choosy_server().await;
        let (answered, _) = timed(&conn, "answer", Duration::from_millis(300)).await;
        assert!(
            matches!(answered, Ok(Response::Value(None))),
            "{answered:?}"
        );
        // From idle: the first call arms the sweep.
        let (silent, took) = timed(&conn, "silent", Duration::from_millis(300)).await;
        assert!(
            matches!(silent, Err(ConnectionError::Timeout { after, .. }) if after == Duration::from_millis(300)),
            "{silent:?}"
        );
        assert!(
            took >= Duration::from_millis(300),
            "timed out early: {took:?}"
        );
        // Idle again, and again.
        let (answered, _) = timed(&conn, "answer", Duration::from_millis(300)).await;
        assert!(answered.is_ok(), "{answered:?}");
        let (silent, _) = timed(&conn, "silent", Duration::from_millis(100)).await;
        assert!(
            matches!(silent, Err(ConnectionError::Timeout { .. })),
            "{silent:?}"
        );
    }

    #[tokio::test]
    async fn a_short_timeout_is_not_held_up_by_a_long_one_before_it() {
        let conn = connected_to_a_choosy_server().await;
        let long = conn.call_within(get("silent"), Duration::from_secs(20));
        let short = timed(&conn, "silent", Duration::from_millis(100));
        tokio::pin!(long);
        // The long call is registered (and the sweep armed for it) first.
        assert!(futures::FutureExt::now_or_never(long.as_mut()).is_none());
        let (short, took) = short.await;
        assert!(
            matches!(short, Err(ConnectionError::Timeout { .. })),
            "{short:?}"
        );
        assert!(
            took < Duration::from_secs(20),
            "waited for the long call: {took:?}"
        );
        assert!(futures::FutureExt::now_or_never(long.as_mut()).is_none());
    }
}
