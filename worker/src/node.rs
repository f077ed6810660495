//! The worker's operations: routing, the write path at W=2, reads (local
//! and quorum), and applying what peers send.

use crate::metrics::Metrics;
use crate::quorum::{Asked, Quorum, ReadQuorum, WriteQuorum};
use crate::replication::{ReplicaAck, Replicator};
use crate::store::{Applied, Store, StoreError, Stored};
use crate::topology::{Topologies, View};
use crate::transport::{Transport, Wall};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use kv_client::timers::Timers;
use kv_wire::message::{Consistency, Failure, FailureKind};
use kv_wire::{
    Clock, Entry, Member, Owners, Request, Response, Version, READ_QUORUM, WRITE_QUORUM,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{oneshot, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a write is reissued with a newer version when a replica holds
/// a newer one (a concurrent writer, or a lagging clock) before giving up.
const MAX_WRITE_ATTEMPTS: usize = 4;
/// How often a routed write follows a "not the owner" answer.
const MAX_ROUTE_ATTEMPTS: usize = 3;
/// How long a quorum read waits on the R owners it asked before asking
/// the rest too: a slow (paused, overloaded) owner costs at most this.
const READ_HEDGE: Duration = Duration::from_millis(50);
/// Keys this worker coordinates at once — writes it is the primary of
/// (single or batched, from the wire or HTTP) and quorum reads; the rest
/// wait their turn, idle, in arrival order. Enough to keep replication
/// pipelined (a batch's round trip is a few milliseconds); few enough that
/// the work queued ahead of a peer's replication batch stays well inside
/// the write timeout on a slow (durable, large) store. Without a bound, a
/// bulk load with half a million keys in flight flooded each worker's
/// runtime with writes whose replication batches then waited behind them,
/// past the write timeout: on a durable cluster, 2.8 million of 3 million
/// keys failed with "write quorum not reached". What a coordinator waits
/// on takes no turn (a peer's replication batch, a local read for a
/// quorum), and a write forwarded to its primary takes its turn there, so
/// no worker holding turns waits on one waiting for them.
pub const MAX_COORDINATING: usize = 4096;

/// One request counted in a gauge for as long as this lives.
struct Waiting<'g>(&'g prometheus_client::metrics::gauge::Gauge);

impl<'g> Waiting<'g> {
    fn on(gauge: &'g prometheus_client::metrics::gauge::Gauge) -> Waiting<'g> {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Limits and timeouts of the data path.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest value accepted.
    pub max_value: usize,
    /// How long a write may wait for its quorum.
    pub write_timeout: Duration,
    /// How long a quorum read may wait for answers.
    pub read_timeout: Duration,
}

/// A worker's own copy of a key, for a client reading R owners itself.
#[derive(Debug)]
pub struct OwnCopy {
    /// The copy (`None`: absent), tombstones included.
    pub copy: Option<Stored>,
    /// Whether this worker is the key's primary (the read counts as a
    /// client operation once, there).
    pub primary: bool,
}

/// A write that reached its quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The version the primary gave it.
    pub version: Version,
    /// Copies holding it when answered.
    pub acks: u8,
}

/// Why an operation failed. Each says what to do.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The request breaks the contract.
    #[error("{0}")]
    BadRequest(String),
    /// The value is over the limit.
    #[error("value is {len} bytes; the limit is {max} bytes")]
    TooLarge {
        /// The value's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Fewer than W copies confirmed in time: the outcome is unknown.
    #[error("write quorum not reached: {acks} of {needed}")]
    WriteQuorum {
        /// Copies that confirmed.
        acks: usize,
        /// Copies needed.
        needed: usize,
    },
    /// Fewer than R owners answered in time.
    #[error("read quorum not reached: {answered} of {needed} owners answered")]
    ReadQuorum {
        /// Owners that answered.
        answered: usize,
        /// Owners needed.
        needed: usize,
    },
    /// This worker is not the key's primary at its epoch.
    #[error(
        "this worker is not the key's primary at epoch {epoch}; refresh the topology and retry"
    )]
    NotOwner {
        /// The worker's epoch.
        epoch: u64,
    },
    /// No topology or no live worker.
    #[error("no live worker owns the key yet: the worker has no topology (is the controller up?); retry shortly")]
    Unavailable,
    /// No live owner holds the key, and every worker that owned it before
    /// is DOWN: its copies may be there alone.
    #[error("the key's owners ({}) are all down and no live worker holds it: its copies may come back with them; retry later", .0.join(", "))]
    OwnersDown(Vec<String>),
    /// This worker could not store the copy (its data dir failed).
    #[error("this worker cannot store writes: {0}; the write's outcome is unknown, retry")]
    Storage(String),
    /// The key's primary answered with a failure: passed on as it said
    /// it (a quorum failure there reads as SPEC words it, whichever
    /// worker the client wrote through).
    #[error("{0}")]
    Primary(String),
    /// The primary could not be asked.
    #[error(
        "cannot reach the key's primary {primary}: {reason}; the write's outcome is unknown, retry"
    )]
    Unreachable {
        /// The primary's id.
        primary: String,
        /// What failed.
        reason: String,
    },
}

impl OpError {
    fn storage(e: StoreError) -> OpError {
        OpError::Storage(e.to_string())
    }

    /// The error as a wire failure.
    pub fn to_failure(&self) -> Failure {
        let kind = match self {
            OpError::BadRequest(_) | OpError::TooLarge { .. } => FailureKind::BadRequest,
            OpError::WriteQuorum { .. }
            | OpError::ReadQuorum { .. }
            | OpError::Storage(_)
            | OpError::Primary(_)
            | OpError::Unreachable { .. } => FailureKind::Quorum,
            OpError::NotOwner { epoch } => FailureKind::NotOwner { epoch: *epoch },
            OpError::Unavailable | OpError::OwnersDown(_) => FailureKind::Unavailable,
        };
        Failure::new(kind, self.to_string())
    }

    fn from_failure(f: Failure) -> OpError {
        match f.kind {
            FailureKind::NotOwner { epoch } => OpError::NotOwner { epoch },
            FailureKind::Unavailable => OpError::Unavailable,
            FailureKind::BadRequest => OpError::BadRequest(f.message),
            FailureKind::Quorum | FailureKind::Busy => OpError::Primary(f.message),
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            OpError::BadRequest(_) => "bad_request",
            OpError::TooLarge { .. } => "too_large",
            OpError::WriteQuorum { .. } | OpError::ReadQuorum { .. } | OpError::Primary(_) => {
                "quorum"
            }
            OpError::NotOwner { .. } => "not_owner",
            OpError::Unavailable => "unavailable",
            OpError::OwnersDown(_) => "owners_down",
            OpError::Unreachable { .. } => "unreachable",
            OpError::Storage(_) => "storage",
        }
    }
}

/// A worker's data plane.
pub struct Node {
    /// This worker's id.
    pub id: String,
    /// Its copies.
    pub store: Arc<dyn Store>,
    /// Its hybrid logical clock.
    pub clock: Clock,
    /// What it knows of the cluster.
    pub topologies: Arc<Topologies>,
    /// How it reaches its peers.
    pub transport: Arc<dyn Transport>,
    /// The wall clock versions are stamped from.
    pub wall: Wall,
    /// Replication links.
    pub replicator: Replicator,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Cancelled once this worker leaves: its copies no longer count.
    pub leaving: CancellationToken,
    /// Where its rebalancing stands.
    pub progress: crate::progress::Progress,
    /// Turns to coordinate keys ([`MAX_COORDINATING`]).
    turns: Semaphore,
    /// The waits nearly every request arms and nearly always cancels (a
    /// read's hedge, a write's deadline), on coarse timers.
    timers: Timers,
}

impl Node {
    /// A worker's data plane over `transport`, with nothing known of the
    /// cluster yet; its replication links stop at `shutdown`, and it stops
    /// counting its own copies once `leaving` is cancelled.
    pub fn new(
        id: String,
        store: Arc<dyn Store>,
        transport: Arc<dyn Transport>,
        wall: Wall,
        limits: Limits,
        leaving: CancellationToken,
        shutdown: CancellationToken,
    ) -> Node {
        let metrics = Arc::new(Metrics::new());
        let topologies = Arc::new(Topologies::new());
        Node {
            clock: Clock::new(&id),
            id,
            store,
            replicator: Replicator::new(
                transport.clone(),
                topologies.clone(),
                metrics.clone(),
                shutdown,
            ),
            transport,
            wall,
            topologies,
            metrics,
            limits,
            leaving,
            progress: crate::progress::Progress::default(),
            turns: Semaphore::new(MAX_COORDINATING),
            timers: Timers::new(),
        }
    }

    /// A turn to coordinate `keys` keys (a batch larger than the whole
    /// budget takes all of it): at once when there is room, else after the
    /// requests ahead of it, counted meanwhile in
    /// `kv_worker_coordination_waiting`.
    async fn turn(&self, keys: usize) -> Result<SemaphorePermit<'_>, OpError> {
        let keys = keys.clamp(1, MAX_COORDINATING) as u32;
        if let Ok(turn) = self.turns.try_acquire_many(keys) {
            return Ok(turn);
        }
        // Counted down on drop, so a wait its caller gives up on (an HTTP
        // client that hangs up drops its handler mid-wait) leaves no count.
        let _waiting = Waiting::on(&self.metrics.coordination_waiting);
        let turn = self.turns.acquire_many(keys).await;
        // The semaphore is never closed.
        turn.map_err(|_| OpError::Unavailable)
    }

    /// The wall clock now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        (self.wall)()
    }

    /// Why this worker is not ready (as `/readyz` says), or `Ok` with the
    /// epoch it is ready at.
    pub fn readiness(&self) -> Result<u64, crate::lifecycle::NotReady> {
        if let Some(why) = self.store.failing() {
            return Err(crate::lifecycle::NotReady::Storage(why));
        }
        let current = self.topologies.current();
        let settled = self.topologies.settled();
        let leaving = self.leaving.is_cancelled();
        crate::lifecycle::readiness(&self.id, leaving, &current, &settled)
    }

    /// What the controller's `/cluster` shows of this worker.
    pub fn stats(&self) -> kv_wire::stats::WorkerStats {
        let (keys, bytes) = self.store.stats();
        let (keys, bytes) = (keys as u64, bytes as u64);
        let to_hand = self.metrics.handoff_pending.get().max(0) as u64;
        let (rebalance, recent) = self.progress.snapshot((keys, bytes), to_hand);
        kv_wire::stats::WorkerStats {
            keys,
            bytes,
            epoch: self.topologies.current().epoch(),
            settled_epoch: self.topologies.settled().epoch(),
            not_ready: self.readiness().err().map(|why| why.to_string()),
            ops: self.metrics.ops.get(),
            rebalance,
            recent,
        }
    }

    /// The current view, for a request. A worker that has just started
    /// has no topology until the controller pushes one (right after it
    /// registers, though a client may already see it UP): a request that
    /// arrives meanwhile waits for it, up to the write timeout, instead of
    /// being turned away with "no topology".
    async fn view(&self) -> Arc<View> {
        let view = self.topologies.current();
        if view.epoch() > 0 {
            return view;
        }
        let mut changes = self.topologies.subscribe();
        let first = changes.wait_for(|v| v.epoch() > 0);
        let _ = tokio::time::timeout(self.limits.write_timeout, first).await;
        self.topologies.current()
    }

    /// Checks a key and value against the contract.
    pub fn validate(&self, key: &str, value: Option<&Bytes>) -> Result<(), OpError> {
        kv_wire::validate_key(key).map_err(|e| OpError::BadRequest(format!("invalid key: {e}")))?;
        match value {
            Some(v) if v.len() > self.limits.max_value => Err(OpError::TooLarge {
                len: v.len(),
                max: self.limits.max_value,
            }),
            _ => Ok(()),
        }
    }

    /// Writes (or, with `None`, deletes) `key` at W=2, from any worker: the
    /// write goes to the key's primary, here or over the wire.
    pub async fn write(&self, key: String, value: Option<Bytes>) -> Result<Written, OpError> {
        self.validate(&key, value.as_ref())?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let view = self.view().await;
            let primary = view.primary(&key).cloned().ok_or(OpError::Unavailable)?;
            let result = if primary.id == self.id {
                self.coordinate(&key, value.clone()).await
            } else {
                self.forward(&primary, &key, value.clone()).await
            };
            match result {
                // The primary's view differs from ours: one of us is behind.
                // Wait (briefly) for ours to move, then route again.
                Err(OpError::NotOwner { epoch }) if attempt < MAX_ROUTE_ATTEMPTS => {
                    let mut changes = self.topologies.subscribe();
                    if view.epoch() >= epoch {
                        let _ = tokio::time::timeout(Duration::from_millis(250), changes.changed())
                            .await;
                    }
                }
                other => return other,
            }
        }
    }

    async fn forward(
        &self,
        primary: &Member,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<Written, OpError> {
        let request = match value {
            Some(value) => Request::Put {
                key: key.to_string(),
                value,
            },
            None => Request::Delete {
                key: key.to_string(),
            },
        };
        let timeout = self.limits.write_timeout + Duration::from_secs(1);
        match self.ask(primary, request, timeout).await? {
            Response::Written { version, acks } => Ok(Written { version, acks }),
            Response::Failed(f) => Err(OpError::from_failure(f)),
            other => Err(unexpected(primary, &other)),
        }
    }

    /// One request to a peer, its failures as [`OpError::Unreachable`].
    async fn ask(
        &self,
        peer: &Member,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, OpError> {
        let unreachable = |e: kv_client::ConnectionError| OpError::Unreachable {
            primary: peer.id.clone(),
            reason: e.to_string(),
        };
        self.transport
            .call(peer, request, Some(timeout))
            .await
            .map_err(unreachable)
    }

    /// The primary's write path: version, store locally, replicate to both
    /// replicas at once, answer when the first replica confirms (or the
    /// second, if the first fails outright); the other copy carries on in
    /// the background.
    ///
    /// Acknowledging on the first replica specifically (rather than on
    /// whichever answers first) means every acknowledged write is on the
    /// primary and the first replica, which is what rebalancing relies on
    /// when the primary dies.
    pub async fn coordinate(&self, key: &str, value: Option<Bytes>) -> Result<Written, OpError> {
        let _turn = self.turn(1).await?;
        self.coordinate_in_turn(key, value).await
    }

    /// [`Node::coordinate`], in a turn already held.
    async fn coordinate_in_turn(
        &self,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<Written, OpError> {
        self.validate(key, value.as_ref())?;
        let view = self.view().await;
        let replicas = self.replicas_if_primary(&view, key)?;
        let deadline = Instant::now() + self.limits.write_timeout;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let (version, acks) = self.issue(&view, key, &value, &replicas).await?;
            // The local copy counts once it is durable; its fsync (if any)
            // runs while the replicas answer.
            let local = self.store.persisted();
            match self.timers.timeout_at(deadline, quorum(acks)).await {
                Ok(Quorum::Reached(copies)) => {
                    local.wait().await.map_err(OpError::storage)?;
                    return Ok(Written {
                        version,
                        acks: copies as u8,
                    });
                }
                Ok(Quorum::Stale(held)) => self.clock.observe(held),
                Ok(Quorum::Failed) | Err(_) => break,
            }
        }
        Err(OpError::WriteQuorum {
            acks: 1,
            needed: WRITE_QUORUM,
        })
    }

    /// The key's replicas, if this worker is its primary with at least one
    /// replica to reach the write quorum with.
    fn replicas_if_primary<'v>(&self, view: &'v View, key: &str) -> Result<Owners<'v>, OpError> {
        let mut owners = view.owners(key);
        match owners.first() {
            None => Err(OpError::Unavailable),
            Some(primary) if primary.id != self.id => Err(OpError::NotOwner {
                epoch: view.epoch(),
            }),
            Some(_) if owners.len() < WRITE_QUORUM => Err(OpError::WriteQuorum {
                acks: 1,
                needed: WRITE_QUORUM,
            }),
            Some(_) => {
                owners.remove(0);
                Ok(owners)
            }
        }
    }

    /// Versions a write, stores it here and queues it for the replicas;
    /// returns the version and each replica's acknowledgement to come.
    async fn issue(
        &self,
        view: &Arc<View>,
        key: &str,
        value: &Option<Bytes>,
        replicas: &[&Member],
    ) -> Result<(Version, Vec<oneshot::Receiver<ReplicaAck>>), OpError> {
        let version = self
            .store_new(key, value, self.clock.tick(self.now_ms()))
            .map_err(OpError::storage)?;
        let entry = Entry {
            key: key.to_string(),
            version,
            value: value.clone(),
        };
        Ok((version, self.send_copies(view, entry, replicas).await))
    }

    /// Queues a copy stored here for the replicas (and, while the topology
    /// is moving, hints for owners of the settled view that `view` leaves
    /// out); returns each replica's acknowledgement to come.
    async fn send_copies(
        &self,
        view: &Arc<View>,
        entry: Entry,
        replicas: &[&Member],
    ) -> Vec<oneshot::Receiver<ReplicaAck>> {
        self.hint_settled(view, &entry, replicas);
        let mut acks = Vec::with_capacity(replicas.len());
        if let Some((last, others)) = replicas.split_last() {
            for replica in others {
                acks.push(self.replicator.send(replica, entry.clone()).await);
            }
            acks.push(self.replicator.send(last, entry).await);
        }
        acks
    }

    /// While the topology is moving, hints of a copy for the owners of the
    /// settled view that `view` (whose replicas are `replicas`) leaves out.
    fn hint_settled(&self, view: &Arc<View>, entry: &Entry, replicas: &[&Member]) {
        let settled = self.topologies.settled();
        if !Arc::ptr_eq(&settled, view) {
            for owner in settled.owners(&entry.key) {
                if owner.id != self.id && !replicas.iter().any(|r| r.id == owner.id) {
                    self.replicator.hint(owner, entry.clone());
                }
            }
        }
    }

    /// A version of this worker's clock above `held`.
    fn version_above(&self, held: Version) -> Version {
        self.clock.observe(held);
        self.clock.tick(self.now_ms())
    }

    /// Stores a write here at `version`, a fresh tick of the clock; if the
    /// copy held is newer, at a version above it instead. Returns the
    /// version stored. The clock observes every copy this worker receives,
    /// so a newer copy held is rare (two writes to a key racing, the later
    /// tick stored first); deciding it in the store's one lookup, rather
    /// than reading the held version before every write, saves a lookup
    /// per write (5% of a worker's bulk load).
    fn store_new(
        &self,
        key: &str,
        value: &Option<Bytes>,
        mut version: Version,
    ) -> Result<Version, StoreError> {
        loop {
            let copy = Stored {
                version,
                value: value.clone(),
            };
            match self.store.apply(key, copy)? {
                Applied::Older { held } => version = self.version_above(held),
                Applied::Stored | Applied::Held => return Ok(version),
            }
        }
    }

    /// Many writes for which this worker is primary, each at W=2 on its
    /// own: all are issued before any is awaited, so their copies share
    /// replication batches.
    pub async fn put_many(&self, items: Vec<(String, Bytes)>) -> Vec<Result<Version, Failure>> {
        let _turn = match self.turn(items.len()).await {
            Ok(turn) => turn,
            Err(e) => return items.iter().map(|_| Err(e.to_failure())).collect(),
        };
        let view = self.view().await;
        let deadline = Instant::now() + self.limits.write_timeout;
        let mut results: Vec<Option<Result<Version, Failure>>> = vec![None; items.len()];
        // Versioned and stored here as one write, then queued for the
        // replicas.
        let mut accepted = Vec::with_capacity(items.len());
        let mut copies = Vec::with_capacity(items.len());
        for (i, (key, value)) in items.iter().enumerate() {
            let value = Some(value.clone());
            match self
                .validate(key, value.as_ref())
                .and_then(|()| self.replicas_if_primary(&view, key))
            {
                Ok(replicas) => {
                    let version = self.clock.tick(self.now_ms());
                    copies.push((key.clone(), Stored { version, value }));
                    accepted.push((i, replicas));
                }
                Err(e) => results[i] = Some(Err(e.to_failure())),
            }
        }
        let stored = self.store.apply_many(&copies);
        // The writes stored here (their place in the batch, version and
        // quorum), and the copies for each replica.
        let mut issued: Vec<(usize, Version)> = Vec::with_capacity(accepted.len());
        let mut quorums = Vec::with_capacity(accepted.len());
        let mut shares = Shares::default();
        for (((i, replicas), (key, copy)), outcome) in accepted.into_iter().zip(copies).zip(stored)
        {
            // A newer copy held here: stored again, above it.
            let version = match outcome {
                Ok(Applied::Older { held }) => {
                    self.store_new(&key, &copy.value, self.version_above(held))
                }
                other => other.map(|_| copy.version),
            };
            let version = match version {
                Ok(version) => version,
                Err(e) => {
                    results[i] = Some(Err(OpError::storage(e).to_failure()));
                    continue;
                }
            };
            let entry = Entry {
                key,
                version,
                value: copy.value,
            };
            self.hint_settled(&view, &entry, &replicas);
            shares.add(issued.len(), entry, &replicas);
            issued.push((i, version));
            quorums.push(WriteQuorum::new(replicas.len()));
        }
        // One queueing per replica for the whole batch, not one per copy.
        let mut answers = Vec::new();
        for share in shares.0 {
            let sent = self.replicator.send_many(share.replica, share.entries);
            for (range, answer) in sent.await {
                answers.push((answer, share.places[range].to_vec()));
            }
        }
        // One wait (one fsync, with `--sync always`) for every local copy.
        let local = self.store.persisted();
        // Past the deadline, the writes not decided fail below.
        let _ = self
            .timers
            .timeout_at(deadline, batch_quorum(&mut quorums, answers))
            .await;
        for ((i, version), quorum) in issued.into_iter().zip(quorums) {
            results[i] = Some(match quorum.outcome() {
                Some(Quorum::Reached(_)) => Ok(version),
                // A newer version on a replica: reissue this one alone.
                Some(Quorum::Stale(held)) => {
                    self.clock.observe(held);
                    let (key, value) = &items[i];
                    self.coordinate_in_turn(key, Some(value.clone()))
                        .await
                        .map(|w| w.version)
                        .map_err(|e| e.to_failure())
                }
                Some(Quorum::Failed) | None => Err(OpError::WriteQuorum {
                    acks: 1,
                    needed: WRITE_QUORUM,
                }
                .to_failure()),
            });
        }
        let durable = local.wait().await.map_err(OpError::storage);
        results
            .into_iter()
            .map(|r| match (r, &durable) {
                (Some(Ok(_)), Err(e)) => Err(e.to_failure()),
                (Some(r), _) => r,
                (None, _) => Err(OpError::Unavailable.to_failure()),
            })
            .collect()
    }

    /// This worker's copy of `key`, tombstones included.
    pub fn get_local(&self, key: &str) -> Option<Stored> {
        self.store.get(key)
    }

    /// This worker's own copy of `key`, for a client that reads R owners
    /// itself by the topology of `epoch` ([`Consistency::Owner`]); `None`
    /// when it cannot vouch for it and the read must be coordinated instead
    /// ([`Node::get_quorum`]): the epoch is not its current one, its
    /// rebalance into it runs (it may lack copies it owns), it does not own
    /// the key, the key is invalid, or it holds no copy while every owner
    /// the topology names is DOWN (unavailable, not absent: `get_quorum`
    /// says so).
    pub fn own_copy(&self, key: &str, epoch: u64) -> Option<OwnCopy> {
        let current = self.topologies.current();
        if current.epoch() != epoch
            || self.topologies.settled().epoch() != epoch
            || self.validate(key, None).is_err()
        {
            return None;
        }
        let rank = current.owners(key).iter().position(|m| m.id == self.id)?;
        match self.store.get(key) {
            None if current.owners_down(key).is_some() => None,
            copy => Some(OwnCopy {
                copy,
                primary: rank == 0,
            }),
        }
    }

    /// The newest copy among R=2 of the key's owners — and, while a
    /// rebalance runs, its previous owners too. None found while the
    /// key's owners before were all DOWN is [`OpError::OwnersDown`]:
    /// unavailable, not absent.
    pub async fn get_quorum(&self, key: &str) -> Result<Option<Stored>, OpError> {
        self.validate(key, None)?;
        let _turn = self.turn(1).await?;
        let current = self.view().await;
        let settled = self.topologies.settled();
        let owners = current.owners(key);
        if owners.is_empty() {
            return Err(OpError::Unavailable);
        }
        let previous: Vec<&Member> = if settled.epoch() == current.epoch() {
            Vec::new()
        } else {
            settled
                .owners(key)
                .into_iter()
                .filter(|m| current.has(m) && !owners.iter().any(|o| o.id == m.id))
                .collect()
        };
        let needed = READ_QUORUM.min(owners.len());
        let (mut read, first) = ReadQuorum::new(&self.id, owners, previous, needed);
        // The read's deadline bounds every ask (each is given the time
        // left), so it needs no timer of its own; the hedge is one coarse
        // wait, made once for the read.
        let deadline = Instant::now() + self.limits.read_timeout;
        let mut asks: FuturesUnordered<_> = first
            .into_iter()
            .map(|(asked, m)| self.read_copy_of(asked, m, key, deadline))
            .collect();
        let hedge = self.timers.sleep(READ_HEDGE);
        tokio::pin!(hedge);
        while !read.done() {
            let next = tokio::select! {
                next = asks.next() => next,
                () = &mut hedge, if read.has_spares() => {
                    let rest = read.hedge();
                    asks.extend(rest.into_iter().map(|m| self.read_copy_of(Asked::Owner, m, key, deadline)));
                    continue;
                }
            };
            let Some((asked, copy)) = next else { break };
            let instead = read.answer(asked, copy.ok());
            asks.extend(instead.map(|m| self.read_copy_of(Asked::Owner, m, key, deadline)));
        }
        match read.finish() {
            Ok(None) => match current.owners_down(key) {
                Some(down) => Err(OpError::OwnersDown(
                    down.into_iter().map(String::from).collect(),
                )),
                None => Ok(None),
            },
            found => found.map_err(|(answered, needed)| OpError::ReadQuorum { answered, needed }),
        }
    }

    /// [`Node::read_copy`] by `deadline`, tagged with whom it asked.
    async fn read_copy_of(
        &self,
        asked: Asked,
        member: &Member,
        key: &str,
        deadline: Instant,
    ) -> (Asked, Result<Option<Stored>, OpError>) {
        let left = deadline.saturating_duration_since(Instant::now());
        (asked, self.read_copy(member, key, left).await)
    }

    async fn read_copy(
        &self,
        member: &Member,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<Stored>, OpError> {
        if member.id == self.id {
            return Ok(self.store.get(key));
        }
        let request = Request::Get {
            key: key.to_string(),
            consistency: Consistency::Local,
        };
        match self.ask(member, request, timeout).await? {
            Response::Value(entry) => Ok(entry.map(|e| Stored {
                version: e.version,
                value: e.value,
            })),
            other => Err(unexpected(member, &other)),
        }
    }

    /// Stores the copies a peer sent that are newer than held, as one
    /// write; `None` for an invalid key (not stored).
    fn apply_copies(&self, entries: Vec<Entry>) -> Vec<Option<Result<Applied, StoreError>>> {
        let mut valid = Vec::with_capacity(entries.len());
        let mut at = Vec::with_capacity(entries.len());
        let mut newest = Version::default();
        for entry in entries {
            let ok = kv_wire::validate_key(&entry.key).is_ok();
            at.push(ok);
            if ok {
                newest = newest.max(entry.version);
                let copy = Stored {
                    version: entry.version,
                    value: entry.value,
                };
                valid.push((entry.key, copy));
            }
        }
        // Once for the batch: the clock's one atomic, not one per copy.
        self.clock.observe(newest);
        let mut applied = self.store.apply_many(&valid).into_iter();
        at.into_iter()
            .map(|ok| if ok { applied.next() } else { None })
            .collect()
    }

    /// Stores the copies a peer sends; reports the ones older than held.
    /// A leaving worker refuses them: a copy on a worker about to exit must
    /// not count towards a write's quorum (the sender falls back on the
    /// key's other replica).
    /// The answer comes once the copies are durable: only then do they
    /// count towards a write's quorum. A copy that could not be stored
    /// fails the whole batch (the sender counts none of it).
    pub async fn replicate(&self, entries: Vec<Entry>) -> Response {
        if let Some(refusal) = self.refusal_while_leaving() {
            return refusal;
        }
        let mut applied = 0;
        let mut stale = Vec::new();
        for (i, outcome) in self.apply_copies(entries).into_iter().enumerate() {
            match outcome {
                Some(Ok(Applied::Stored)) => applied += 1,
                Some(Ok(Applied::Older { held })) => stale.push((i as u32, held)),
                Some(Ok(Applied::Held)) | None => {}
                Some(Err(e)) => return Response::Failed(OpError::storage(e).to_failure()),
            }
        }
        match self.store.persisted().wait().await {
            Ok(()) => Response::Replicated { applied, stale },
            Err(e) => Response::Failed(OpError::storage(e).to_failure()),
        }
    }

    /// Stores pulled copies that are newer than held; returns how many
    /// were, and their bytes of keys and values.
    pub fn absorb(&self, entries: Vec<Entry>) -> (usize, usize) {
        let sizes: Vec<usize> = entries.iter().map(Entry::size).collect();
        let outcomes = self.apply_copies(entries);
        sizes
            .into_iter()
            .zip(outcomes)
            .filter(|(_, outcome)| *outcome == Some(Ok(Applied::Stored)))
            .fold((0, 0), |(applied, bytes), (size, _)| {
                (applied + 1, bytes + size)
            })
    }

    /// The offered items this worker lacks (missing or older here); a
    /// leaving worker takes no offers (it would confirm keys it is about
    /// to take away).
    /// The answer confirms the rest, so it comes once they are durable.
    pub async fn offered(&self, items: &[(String, Version)]) -> Response {
        if let Some(refusal) = self.refusal_while_leaving() {
            return refusal;
        }
        let wanted = self.wanted(items);
        match self.store.persisted().wait().await {
            Ok(()) => Response::Wanted(wanted),
            Err(e) => Response::Failed(OpError::storage(e).to_failure()),
        }
    }

    fn refusal_while_leaving(&self) -> Option<Response> {
        self.leaving.is_cancelled().then(|| {
            Response::Failed(Failure::new(
                FailureKind::NotOwner {
                    epoch: self.topologies.current().epoch(),
                },
                format!("{} is leaving the cluster: it takes no copies", self.id),
            ))
        })
    }

    /// The offered items this worker lacks (missing or older here), by
    /// version alone: a durable store answers from memory, where reading
    /// each copy from the engine made a leaver's offers its slowest step.
    pub fn wanted(&self, items: &[(String, Version)]) -> Vec<u32> {
        items
            .iter()
            .enumerate()
            .filter(|(_, (key, version))| {
                self.store
                    .held_version(key)
                    .is_none_or(|held| held < *version)
            })
            .map(|(i, _)| i as u32)
            .collect()
    }
}

fn unexpected(peer: &Member, answer: &Response) -> OpError {
    OpError::Unreachable {
        primary: peer.id.clone(),
        reason: format!("unexpected answer {answer:?}"),
    }
}

/// Waits for the replicas' acknowledgements until [`WriteQuorum`] says
/// how the write ended.
async fn quorum(acks: Vec<oneshot::Receiver<ReplicaAck>>) -> Quorum {
    let mut write = WriteQuorum::new(acks.len());
    // Polled in place: one or two receivers need no `FuturesUnordered`,
    // whose allocations per write were 3% of a worker's bulk load.
    let mut waiting: Vec<Option<oneshot::Receiver<ReplicaAck>>> =
        acks.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        for (i, slot) in waiting.iter_mut().enumerate() {
            let Some(ack) = slot else { continue };
            let Poll::Ready(ack) = Pin::new(ack).poll(cx) else {
                continue;
            };
            // A receiver is polled no more once it has answered.
            *slot = None;
            let ack = ack.unwrap_or(ReplicaAck::Failed("link stopped".into()));
            if let Some(outcome) = write.answer(i, ack) {
                return Poll::Ready(outcome);
            }
        }
        match waiting.iter().all(Option::is_none) {
            true => Poll::Ready(Quorum::Failed),
            false => Poll::Pending,
        }
    })
    .await
}

/// Where a copy of a batch belongs: its write (the place among the
/// batch's writes) and its replica's rank among that write's replicas
/// (0: the first).
type Place = (usize, usize);

/// A batch of writes' copies for one replica, each with its place.
struct Share<'m> {
    replica: &'m Member,
    entries: Vec<Entry>,
    places: Vec<Place>,
}

/// A batch of writes' copies, per replica.
#[derive(Default)]
struct Shares<'m>(Vec<Share<'m>>);

impl<'m> Shares<'m> {
    /// Write `write`'s copy, `entry`, for each of its `replicas`.
    fn add(&mut self, write: usize, entry: Entry, replicas: &[&'m Member]) {
        let mut entry = Some(entry);
        for (rank, &replica) in replicas.iter().enumerate() {
            // The last replica takes the entry, the others a clone.
            let copy = match rank + 1 == replicas.len() {
                true => entry.take(),
                false => entry.clone(),
            };
            let Some(copy) = copy else { continue };
            // The replicas all come from one view: the same member is the
            // same reference (were it not, a replica would get two shares,
            // which is slower, not wrong).
            let at = match self.0.iter().position(|s| std::ptr::eq(s.replica, replica)) {
                Some(at) => at,
                None => {
                    self.0.push(Share {
                        replica,
                        entries: Vec::new(),
                        places: Vec::new(),
                    });
                    self.0.len() - 1
                }
            };
            self.0[at].entries.push(copy);
            self.0[at].places.push((write, rank));
        }
    }
}

/// [`quorum`] for a batch: feeds each answer (one per copy) to the
/// place it is for, until every write is decided or every answer
/// is in. An answer lost (a link stopped) fails its copies.
async fn batch_quorum(
    quorums: &mut [WriteQuorum],
    answers: Vec<(oneshot::Receiver<Vec<ReplicaAck>>, Vec<Place>)>,
) {
    let mut undecided = quorums.len();
    let mut waiting: Vec<_> = answers.into_iter().map(Some).collect();
    // Polled in place, as in `quorum`.
    std::future::poll_fn(|cx| {
        for slot in &mut waiting {
            let Some((answer, places)) = slot else {
                continue;
            };
            let Poll::Ready(acks) = Pin::new(answer).poll(cx) else {
                continue;
            };
            let mut acks = acks.unwrap_or_default().into_iter();
            for &(write, rank) in places.iter() {
                let ack = acks
                    .next()
                    .unwrap_or_else(|| ReplicaAck::Failed("link stopped".into()));
                let quorum = &mut quorums[write];
                let was = quorum.outcome().is_some();
                if quorum.answer(rank, ack).is_some() && !was {
                    undecided -= 1;
                }
            }
            *slot = None;
        }
        match undecided == 0 || waiting.iter().all(Option::is_none) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn acks(
        n: usize,
    ) -> (
        Vec<oneshot::Sender<ReplicaAck>>,
        Vec<oneshot::Receiver<ReplicaAck>>,
    ) {
        (0..n).map(|_| oneshot::channel()).unzip()
    }

    #[tokio::test]
    async fn a_write_waits_for_its_first_replica_and_falls_back_on_the_second() {
        // The second replica's answer alone decides nothing.
        let (mut tx, rx) = acks(2);
        let mut waiting = Box::pin(quorum(rx));
        tx.remove(1).send(ReplicaAck::Applied).unwrap();
        assert_eq!((&mut waiting).now_or_never(), None);
        tx.remove(0).send(ReplicaAck::Applied).unwrap();
        assert_eq!(waiting.await, Quorum::Reached(3));

        // The first replica's decides at once.
        let (mut tx, rx) = acks(2);
        tx.remove(0).send(ReplicaAck::Applied).unwrap();
        assert_eq!(quorum(rx).await, Quorum::Reached(2));

        // The first fails: the second decides.
        let (mut tx, rx) = acks(2);
        let mut waiting = Box::pin(quorum(rx));
        tx.remove(0)
            .send(ReplicaAck::Failed("down".into()))
            .unwrap();
        assert_eq!((&mut waiting).now_or_never(), None);
        tx.remove(0).send(ReplicaAck::Applied).unwrap();
        assert_eq!(waiting.await, Quorum::Reached(2));

        // Links that stop answer as failures.
        let (tx, rx) = acks(2);
        drop(tx);
        assert_eq!(quorum(rx).await, Quorum::Failed);
        assert_eq!(quorum(Vec::new()).await, Quorum::Failed);
    }
}
