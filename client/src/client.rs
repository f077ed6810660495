//! A ring-aware client: each write goes straight to the key's primary,
//! each read to its primary and first replica (see [`crate::read`]).
//!
//! The client learns the live workers from the controller's `/nodes` and
//! builds the same ring the workers use. A worker that is not the key's
//! primary any more answers "not owner" with its epoch; a worker that does
//! not answer may be dead. Either way the client refreshes the topology and
//! retries, for up to [`RETRY_WINDOW`] — long enough for the controller to
//! notice a dead worker and publish the topology without it. So does a
//! client that knows no live worker (a controller just restarted, workers
//! on their way).
//!
//! Make one client and share it (an `Arc<Client>`) among all the tasks
//! that talk to the cluster: it keeps one pipelined connection to each
//! worker, and requests in flight at once share its writes, and the
//! workers' answers theirs. 50 tasks sharing one client did 1.6x the PUTs
//! of 50 tasks with a client each, at 0.7x the servers' CPU per PUT
//! (`bench/compare-redis` on 2 cores).

use crate::connection::{ConnectionError, Credentials, Pool};
use crate::http::{HttpClient, HttpError};
use crate::timers::Timers;
use bytes::Bytes;
use futures::future::join_all;
use kv_wire::message::{Consistency, Failure, FailureKind};
use kv_wire::nodes::{Mapping, Nodes};
use kv_wire::{Entry, Member, Request, Response, Version, View};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long a request keeps retrying through topology changes.
pub const RETRY_WINDOW: Duration = Duration::from_secs(5);
/// Pause before retrying after a failure that a topology change may fix.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long one wire call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read waits for the owners it asked before an owner
/// coordinates it instead (as a worker's quorum read asks a third owner).
pub const READ_HEDGE: Duration = Duration::from_millis(50);
/// How often at most a client whose reads owners coordinated fetches the
/// topology again, in case it is behind.
const BEHIND_CHECK: Duration = Duration::from_secs(1);
/// Items per `PutMany` frame.
pub const PUT_MANY_CHUNK: usize = 512;

/// Why a client call failed.
#[derive(Debug, Error, Clone)]
pub enum ClientError {
    /// The controller could not be asked.
    #[error("controller: {0}")]
    Controller(#[from] HttpError),
    /// No live worker was known for the whole retry window.
    #[error("no live worker: is the cluster up? (the controller lists none)")]
    NoWorkers,
    /// A worker refused the request for good (bad key, value too large...).
    #[error("{0}")]
    Refused(Failure),
    /// A worker refused this client for good (another cluster, no or
    /// another cluster secret).
    #[error("{0}")]
    Connection(#[from] ConnectionError),
    /// The request kept failing for [`RETRY_WINDOW`]; the last reason.
    #[error("gave up after retrying: {0}")]
    GaveUp(String),
}

/// A client of one kv cluster.
#[derive(Debug)]
pub struct Client {
    controller: String,
    http: HttpClient,
    pool: Pool,
    view: RwLock<Arc<View>>,
    timers: Timers,
    /// When reads last made the client check its topology.
    behind_check: Mutex<Option<Instant>>,
}

impl Client {
    /// A client of the cluster whose controller is at `controller`
    /// (`http://host:port`), connecting to workers with `credentials`.
    /// Fetches the topology once.
    pub async fn connect(
        controller: &str,
        credentials: Credentials,
    ) -> Result<Client, ClientError> {
        let client = Client {
            controller: controller.trim_end_matches('/').to_string(),
            http: HttpClient::new(),
            pool: Pool::new(credentials, CALL_TIMEOUT),
            view: RwLock::default(),
            timers: Timers::new(),
            behind_check: Mutex::default(),
        };
        client.refresh().await?;
        Ok(client)
    }

    /// The controller's `/nodes`.
    pub async fn nodes(&self) -> Result<Nodes, ClientError> {
        Ok(self
            .http
            .get_json(&format!("{}/nodes", self.controller))
            .await?)
    }

    /// The controller's `/mapping?key=`.
    pub async fn mapping(&self, key: &str) -> Result<Mapping, ClientError> {
        let query = serde_urlencoded::to_string([("key", key)])
            .map_err(|e| ClientError::GaveUp(e.to_string()))?;
        let url = format!("{}/mapping?{query}", self.controller);
        Ok(self.http.get_json(&url).await?)
    }

    /// Fetches the topology from the controller again.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let nodes = self.nodes().await?;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(View::new(nodes.topology()));
        Ok(())
    }

    fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key's owners as the client sees them, primary first.
    pub fn owners(&self, key: &str) -> Vec<Member> {
        self.view().owners(key).into_iter().cloned().collect()
    }

    /// The key's primary as the client sees it.
    pub fn primary(&self, key: &str) -> Option<Member> {
        self.view().primary(key).cloned()
    }

    /// The topology epoch the client routes by.
    pub fn epoch(&self) -> u64 {
        self.view().epoch()
    }

    /// Writes `key` at W=2; returns its version.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<Version, ClientError> {
        self.write(key, || Request::Put {
            key: key.to_string(),
            value: value.clone(),
        })
        .await
    }

    /// Deletes `key` at W=2 (a tombstone); returns its version.
    pub async fn delete(&self, key: &str) -> Result<Version, ClientError> {
        self.write(key, || Request::Delete {
            key: key.to_string(),
        })
        .await
    }

    async fn write(
        &self,
        key: &str,
        request: impl Fn() -> Request,
    ) -> Result<Version, ClientError> {
        let deadline = Instant::now() + RETRY_WINDOW;
        loop {
            let view = self.view();
            let Some(primary) = view.primary(key) else {
                self.retry_or_give_up(deadline, ClientError::NoWorkers)
                    .await?;
                continue;
            };
            let reason = match self.pool.call(primary, request()).await {
                Ok(Response::Written { version, .. }) => return Ok(version),
                Ok(Response::Failed(f)) if f.kind == FailureKind::BadRequest => {
                    return Err(ClientError::Refused(f))
                }
                Ok(Response::Failed(f)) => f.message,
                Ok(other) => format!("unexpected answer {other:?}"),
                Err(e) if e.is_final() => return Err(e.into()),
                Err(e) => e.to_string(),
            };
            self.retry_or_give_up(deadline, ClientError::GaveUp(reason))
                .await?;
        }
    }

    /// Reads `key` from a quorum of its owners: the newest value and its
    /// version, or `None` if absent or deleted.
    ///
    /// The client asks the key's first [`kv_wire::READ_QUORUM`] owners for their own
    /// copies itself (see [`crate::read`]), which spares the read a hop
    /// through a coordinator; an owner that cannot vouch for its copy (a
    /// rebalance runs, the client's topology is behind) coordinates the
    /// read instead. When that does not decide (an owner failed, or both
    /// did not answer within [`READ_HEDGE`]), an owner coordinates the
    /// read, as any worker can, and its hedge and fallbacks take over.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, ClientError> {
        if let Some(read) = self.read_owners(key).await {
            return read;
        }
        let deadline = Instant::now() + RETRY_WINDOW;
        loop {
            let view = self.view();
            let owners = view.owners(key);
            if owners.is_empty() {
                self.retry_or_give_up(deadline, ClientError::NoWorkers)
                    .await?;
                continue;
            }
            let mut reason = String::new();
            // Any owner coordinates a quorum read: try them in ring order.
            for owner in owners {
                let request = Request::Get {
                    key: key.to_string(),
                    consistency: Consistency::Quorum,
                };
                match self.pool.call(owner, request).await {
                    Ok(Response::Value(entry)) => return Ok(live(entry)),
                    Ok(Response::Failed(f)) if f.kind == FailureKind::BadRequest => {
                        return Err(ClientError::Refused(f))
                    }
                    Ok(Response::Failed(f)) => reason = f.message,
                    Ok(other) => reason = format!("unexpected answer {other:?}"),
                    Err(e) if e.is_final() => return Err(e.into()),
                    Err(e) => reason = e.to_string(),
                }
            }
            self.retry_or_give_up(deadline, ClientError::GaveUp(reason))
                .await?;
        }
    }

    /// The read of `key` from its first [`kv_wire::READ_QUORUM`] owners' own
    /// copies, by the client's view; `None` when it did not decide.
    async fn read_owners(
        &self,
        key: &str,
    ) -> Option<Result<Option<(Bytes, Version)>, ClientError>> {
        let view = self.view();
        let asks = crate::read::asks(&view, key)?;
        let asks = asks
            .into_iter()
            .map(|(owner, request)| self.pool.call(owner, request));
        let hedge = tokio::time::Instant::now() + READ_HEDGE;
        let answers = self.timers.timeout_at(hedge, join_all(asks)).await.ok()?;
        if answers.iter().any(|a| matches!(a, Ok(Response::Value(_)))) {
            self.refresh_when_behind().await;
        }
        crate::read::decide(answers).map(|read| read.map(live))
    }

    /// After an owner coordinated a read the client meant to make itself:
    /// an owner answers with its own copy only at its own epoch, so the
    /// client's topology may be behind (nothing else tells a client that
    /// only reads), and is fetched again, at most once per
    /// [`BEHIND_CHECK`] (a rebalance has owners coordinate for a while).
    async fn refresh_when_behind(&self) {
        let due = {
            let mut last = self.behind_check.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= BEHIND_CHECK);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            // A controller that cannot answer now: route by what we have.
            let _ = self.refresh().await;
        }
    }

    /// Writes many keys at W=2, each on its own: batched per primary and
    /// pipelined. Results come in the order of `items`.
    pub async fn put_many(&self, items: &[(String, Bytes)]) -> Vec<Result<Version, ClientError>> {
        let mut results: Vec<Option<Result<Version, ClientError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut todo: Vec<usize> = (0..items.len()).collect();
        let deadline = Instant::now() + RETRY_WINDOW;
        while !todo.is_empty() {
            let view = self.view();
            let mut by_primary: HashMap<&str, (&Member, Vec<usize>)> = HashMap::new();
            let mut unrouted = Vec::new();
            for i in todo.drain(..) {
                match view.primary(&items[i].0) {
                    Some(primary) => by_primary
                        .entry(&primary.id)
                        .or_insert_with(|| (primary, Vec::new()))
                        .1
                        .push(i),
                    None => unrouted.push(i),
                }
            }
            // The view has no live worker: nothing to call this round.
            let mut give_up = if unrouted.is_empty() {
                ClientError::GaveUp(String::new())
            } else {
                ClientError::NoWorkers
            };
            todo.extend(unrouted);
            let calls = by_primary.into_values().flat_map(|(member, indices)| {
                indices
                    .chunks(PUT_MANY_CHUNK)
                    .map(|chunk| {
                        let chunk = chunk.to_vec();
                        let batch: Vec<(String, Bytes)> =
                            chunk.iter().map(|&i| items[i].clone()).collect();
                        async move {
                            (
                                chunk,
                                self.pool
                                    .call(member, Request::PutMany { items: batch })
                                    .await,
                            )
                        }
                    })
                    .collect::<Vec<_>>()
            });
            for (chunk, answer) in join_all(calls).await {
                match answer {
                    Ok(Response::PutMany(outcomes)) if outcomes.len() == chunk.len() => {
                        for (i, outcome) in chunk.into_iter().zip(outcomes) {
                            match outcome {
                                Ok(version) => results[i] = Some(Ok(version)),
                                Err(f) if f.kind == FailureKind::BadRequest => {
                                    results[i] = Some(Err(ClientError::Refused(f)))
                                }
                                Err(f) => {
                                    give_up = ClientError::GaveUp(f.message);
                                    todo.push(i);
                                }
                            }
                        }
                    }
                    Err(e) if e.is_final() => {
                        for i in chunk {
                            results[i] = Some(Err(e.clone().into()));
                        }
                    }
                    other => {
                        give_up = ClientError::GaveUp(match other {
                            Err(e) => e.to_string(),
                            Ok(answer) => format!("unexpected answer {answer:?}"),
                        });
                        todo.extend(chunk);
                    }
                }
            }
            if !todo.is_empty() {
                if let Err(e) = self.retry_or_give_up(deadline, give_up).await {
                    for &i in &todo {
                        results[i] = Some(Err(e.clone()));
                    }
                    break;
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ClientError::GaveUp("not attempted".into()))))
            .collect()
    }

    /// After a failure: past the deadline, give up with `error`; else
    /// pause, refresh the topology (a worker may be gone, or the client
    /// behind) and go on. Also when the client knows no live worker: the
    /// controller may be restarting, or the workers on their way, and a
    /// view with none is refreshed only here (failing at once would leave
    /// the client without workers for good, and a caller's retry loop
    /// spinning without a pause).
    async fn retry_or_give_up(
        &self,
        deadline: Instant,
        error: ClientError,
    ) -> Result<(), ClientError> {
        if Instant::now() >= deadline {
            return Err(error);
        }
        tokio::time::sleep(RETRY_PAUSE).await;
        // A controller that cannot answer right now is no reason to stop:
        // route by the topology we have.
        let _ = self.refresh().await;
        Ok(())
    }
}

/// A copy's value and version; `None` for none or a tombstone.
fn live(copy: Option<Entry>) -> Option<(Bytes, Version)> {
    copy.and_then(|e| e.value.map(|v| (v, e.version)))
}
