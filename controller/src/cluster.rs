//! `GET /cluster` and `GET /cluster/key`: the whole cluster in one answer,
//! for the dashboard (`/ui`) and `kvctl status`.
//!
//! The controller knows membership and the ring; what each worker holds,
//! its epochs and its rebalances it asks the worker itself
//! (`Request::Stats` over the wire), all workers at once, each within
//! [`PER_WORKER`] so a slow one is shown as such instead of stalling the
//! page. One gathering is kept for `--cluster-refresh` (1 s): any number
//! of viewers cost one gathering a second. Putting the answer together is a pure
//! function ([`render`]) of what was gathered.

use crate::detector::{Status, Why};
use crate::membership::NodeView;
use crate::state::Shared;
use kv_client::{Credentials, Pool};
use kv_wire::stats::WorkerStats;
use kv_wire::{Member, Request, Response, Ring};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long one worker may take to answer before it is shown as slow.
pub const PER_WORKER: Duration = Duration::from_millis(500);
/// Controller events remembered (status changes, registrations, epochs).
const EVENTS_KEPT: usize = 200;
/// Events in an answer, newest first.
const EVENTS_SHOWN: usize = 60;
/// Segments of the ring's picture.
pub const RING_SEGMENTS: usize = 360;

/// Something that happened, as the event log shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum What {
    /// A worker registered.
    Registered {
        /// Its id.
        worker: String,
        /// Its generation.
        generation: u64,
    },
    /// A worker's status changed.
    Status {
        /// Its id.
        worker: String,
        /// Status before.
        from: Status,
        /// Status after.
        to: Status,
        /// Why.
        why: String,
    },
    /// A topology was published.
    Epoch {
        /// Its epoch.
        epoch: u64,
        /// Workers in its ring.
        live: usize,
        /// Workers leaving.
        leaving: usize,
    },
    /// A worker's rebalance ended (from the worker's own report).
    Rebalance {
        /// The worker.
        worker: String,
        /// The epoch it worked towards.
        epoch: u64,
        /// Copies it moved.
        keys: u64,
        /// Their bytes.
        bytes: u64,
        /// How long it took.
        took_ms: u64,
        /// Whether everything was verified and handed off.
        complete: bool,
        /// What started it.
        why: String,
    },
}

/// An event and when it happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub what: What,
}

/// The controller's recent events, bounded.
#[derive(Debug, Default)]
pub struct Events {
    log: Mutex<VecDeque<Event>>,
}

impl Events {
    /// Records `what` as happening now.
    pub fn push(&self, what: What) {
        let at_ms = kv_wire::version::unix_ms(SystemTime::now());
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() == EVENTS_KEPT {
            log.pop_front();
        }
        log.push_back(Event { at_ms, what });
    }

    /// A status change, as an event.
    pub fn status(&self, worker: &str, from: Status, to: Status, why: Why) {
        self.push(What::Status {
            worker: worker.to_string(),
            from,
            to,
            why: why.to_string(),
        });
    }

    fn snapshot(&self) -> Vec<Event> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect()
    }
}

/// What one worker said when asked, or why it said nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Its stats.
    Stats(WorkerStats),
    /// No answer within [`PER_WORKER`].
    Slow,
    /// The call failed.
    Failed(String),
    /// Not asked: it is DOWN.
    NotAsked,
}

impl Answer {
    /// The answer as `/cluster` names it.
    fn label(&self) -> &'static str {
        match self {
            Answer::Stats(_) => "ok",
            Answer::Slow => "slow",
            Answer::Failed(_) => "failed",
            Answer::NotAsked => "not asked",
        }
    }

    /// Why there is no answer, for the page.
    fn error(&self) -> Option<String> {
        match self {
            Answer::Slow => Some(format!("no answer within {} ms", PER_WORKER.as_millis())),
            Answer::Failed(e) => Some(e.clone()),
            Answer::Stats(_) | Answer::NotAsked => None,
        }
    }
}

/// Everything [`render`] needs, gathered.
pub struct Gathered<'a> {
    /// Workers as `/nodes` shows them, sorted by id.
    pub nodes: &'a [NodeView<'a>],
    /// The answer of each, by id.
    pub answers: &'a HashMap<String, Answer>,
    /// Client operations per second of each worker since the previous
    /// gathering, by id.
    pub rates: &'a HashMap<String, f64>,
    /// The published epoch.
    pub epoch: u64,
    /// The published ring.
    pub ring: &'a Ring,
    /// Each ring worker's share as primary, in the ring's order.
    pub shares: &'a [f64],
    /// The workers DOWN for silence, and the share of the circle whose
    /// owners are all among them ([`crate::state::Published::unavailable`]).
    pub unavailable: (&'a [String], f64),
    /// Whether the cluster has a secret.
    pub secret: bool,
    /// The controller's events.
    pub events: Vec<Event>,
    /// How long the gathering took.
    pub took: Duration,
}

/// The `/cluster` JSON.
pub fn render(g: &Gathered<'_>) -> Value {
    let shares: HashMap<&str, f64> = g
        .ring
        .nodes()
        .iter()
        .map(String::as_str)
        .zip(g.shares.iter().copied())
        .collect();
    let counts: serde_json::Map<String, Value> =
        [Status::Up, Status::Suspect, Status::Leaving, Status::Down]
            .iter()
            .map(|s| {
                let n = g.nodes.iter().filter(|n| n.status == *s).count();
                (s.as_str().to_string(), n.into())
            })
            .collect();
    let mut rebalancing = (0usize, 0u64, 0u64, 0u64);
    let mut events = g.events.clone();
    let workers: Vec<Value> = g
        .nodes
        .iter()
        .map(|node| {
            let id = node.worker.member.id.as_str();
            let mut w = serde_json::to_value(crate::http::node_info(node)).unwrap_or_default();
            w["share"] = json!(shares.get(id).copied().unwrap_or(0.0));
            // A DOWN worker is not asked; an answer from a gathering that
            // began before it went DOWN is not shown as its state either.
            let answer = match node.status {
                Status::Down => &Answer::NotAsked,
                _ => g.answers.get(id).unwrap_or(&Answer::NotAsked),
            };
            w["answer"] = answer.label().into();
            if let Some(error) = answer.error() {
                w["error"] = error.into();
            }
            if let Answer::Stats(s) = answer {
                // Rebalancing: syncing now, or not yet settled on the
                // published epoch (its answer may predate it).
                if s.rebalance.is_some() || s.settled_epoch < g.epoch {
                    rebalancing.0 += 1;
                }
                if let Some(r) = &s.rebalance {
                    rebalancing.1 += r.keys_to_go;
                    rebalancing.2 += r.bytes_to_go;
                    rebalancing.3 += r.keys_moved;
                }
                for f in &s.recent {
                    events.push(Event {
                        at_ms: f.ended_ms,
                        what: What::Rebalance {
                            worker: id.to_string(),
                            epoch: f.epoch,
                            keys: f.keys,
                            bytes: f.bytes,
                            took_ms: f.took_ms,
                            complete: f.complete,
                            why: f.why.clone(),
                        },
                    });
                }
                w["keys"] = s.keys.into();
                w["bytes"] = s.bytes.into();
                w["applied_epoch"] = s.epoch.into();
                w["settled_epoch"] = s.settled_epoch.into();
                w["ready"] = s.not_ready.is_none().into();
                w["not_ready"] = json!(s.not_ready);
                w["ops_per_s"] = json!(g.rates.get(id).map(|r| (r * 10.0).round() / 10.0));
                w["rebalance"] = json!(s.rebalance);
            }
            w
        })
        .collect();
    // Newest first; ties keep the order they were recorded in.
    events.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
    events.truncate(EVENTS_SHOWN);
    let picture = g.ring.picture(RING_SEGMENTS);
    json!({
        "epoch": g.epoch,
        "secret": g.secret,
        "counts": counts,
        "settled": rebalancing.0 == 0,
        "rebalance": {
            "workers": rebalancing.0,
            "keys_to_go": rebalancing.1,
            "bytes_to_go": rebalancing.2,
            "keys_moved": rebalancing.3,
        },
        "workers": workers,
        "ring": { "workers": g.ring.nodes(), "segments": picture },
        "unavailable": { "down": g.unavailable.0, "share": g.unavailable.1 },
        "events": events,
        "gathered_at": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "took_ms": g.took.as_millis() as u64,
    })
}

/// Asks workers for their stats, and keeps their answers for a while
/// (`--cluster-refresh`); membership and the ring are read fresh for every answer,
/// so a worker going DOWN shows at once.
pub struct Gatherer {
    pool: Pool,
    fresh_for: Duration,
    last: tokio::sync::Mutex<Option<Last>>,
}

/// One gathering.
#[derive(Clone)]
struct Last {
    at: Instant,
    took: Duration,
    answers: Arc<HashMap<String, Answer>>,
    rates: Arc<HashMap<String, f64>>,
    /// Each worker's operation count and when it was read.
    ops: Arc<HashMap<String, (Instant, u64)>>,
}

impl Gatherer {
    /// A gatherer speaking to workers as `credentials`, asking them again
    /// once what they said is older than `fresh_for`.
    pub fn new(credentials: Credentials, fresh_for: Duration) -> Gatherer {
        Gatherer {
            // The pool's own timeout is longer: [`PER_WORKER`] decides.
            pool: Pool::new(credentials, 2 * PER_WORKER),
            fresh_for,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The `/cluster` answer.
    pub async fn cluster(&self, shared: &Shared) -> Value {
        let last = self.gather(shared).await;
        let published = shared.published();
        // Rendered under the membership lock (the views borrow from it):
        // a few milliseconds for 1,000 workers, which heartbeats wait out.
        let m = shared.membership();
        let nodes = m.nodes(Instant::now());
        render(&Gathered {
            nodes: &nodes,
            answers: &last.answers,
            rates: &last.rates,
            epoch: published.topology.epoch,
            ring: published.ring(),
            shares: published.shares(),
            unavailable: (&published.topology.down, published.unavailable()),
            secret: shared.guard.secret().is_some(),
            events: shared.events.snapshot(),
            took: last.took,
        })
    }

    /// The last gathering if it is fresh, else a new one. Viewers arriving
    /// during a gathering wait for it and share it.
    async fn gather(&self, shared: &Shared) -> Last {
        let mut last = self.last.lock().await;
        if let Some(l) = last.as_ref().filter(|l| l.at.elapsed() < self.fresh_for) {
            return l.clone();
        }
        let started = Instant::now();
        let answers = self.ask_all(&members_to_ask(shared)).await;
        let now = Instant::now();
        let previous = last.take().map(|l| l.ops).unwrap_or_default();
        let mut ops = HashMap::new();
        let mut rates = HashMap::new();
        for (id, answer) in &answers {
            let Answer::Stats(s) = answer else { continue };
            ops.insert(id.clone(), (now, s.ops));
            if let Some((then, before)) = previous.get(id) {
                let secs = now.duration_since(*then).as_secs_f64();
                if secs > 0.0 && s.ops >= *before {
                    rates.insert(id.clone(), (s.ops - before) as f64 / secs);
                }
            }
        }
        let fresh = Last {
            at: now,
            took: started.elapsed(),
            answers: Arc::new(answers),
            rates: Arc::new(rates),
            ops: Arc::new(ops),
        };
        *last = Some(fresh.clone());
        fresh
    }

    /// One call to a worker within [`PER_WORKER`]; without an answer,
    /// [`Answer::Slow`] or [`Answer::Failed`].
    async fn ask(&self, member: &Member, request: Request) -> Result<Response, Answer> {
        match tokio::time::timeout(PER_WORKER, self.pool.call(member, request)).await {
            Err(_) => Err(Answer::Slow),
            Ok(Err(e)) => Err(Answer::Failed(e.to_string())),
            Ok(Ok(response)) => Ok(response),
        }
    }

    async fn ask_all(&self, members: &[Member]) -> HashMap<String, Answer> {
        let calls = members.iter().map(|m| async move {
            let answer = match self.ask(m, Request::Stats).await {
                Ok(Response::Stats(s)) => Answer::Stats(*s),
                Ok(other) => Answer::Failed(format!("unexpected answer {other:?}")),
                Err(no_answer) => no_answer,
            };
            (m.id.clone(), answer)
        });
        futures::future::join_all(calls).await.into_iter().collect()
    }

    /// Each owner of `key` (primary first) with its copy's version, asked
    /// of the owner itself.
    pub async fn lookup(&self, shared: &Shared, key: &str) -> Value {
        let published = shared.published();
        let owners: Vec<String> = published
            .ring()
            .owners(key.as_bytes(), kv_wire::REPLICATION_FACTOR)
            .into_iter()
            .map(str::to_string)
            .collect();
        let members: Vec<Option<Member>> = owners
            .iter()
            .map(|id| published.topology.member(id).cloned())
            .collect();
        let asks = members.iter().zip(&owners).map(|(member, id)| async move {
            let mut o = json!({ "id": id });
            let Some(member) = member else {
                o["error"] = "not in the published topology".into();
                return o;
            };
            let get = Request::Get {
                key: key.to_string(),
                consistency: kv_wire::message::Consistency::Local,
            };
            match self.ask(member, get).await {
                Ok(Response::Value(Some(entry))) => {
                    o["version"] = entry.version.to_string().into();
                    o["deleted"] = entry.value.is_none().into();
                    o["bytes"] = entry.value.map_or(0, |v| v.len()).into();
                }
                Ok(Response::Value(None)) => o["version"] = Value::Null,
                Ok(other) => o["error"] = format!("unexpected answer {other:?}").into(),
                Err(no_answer) => o["error"] = json!(no_answer.error()),
            }
            o
        });
        let owners: Vec<Value> = futures::future::join_all(asks).await;
        json!({ "key": key, "epoch": published.topology.epoch, "owners": owners })
    }
}

/// The workers worth asking: all but the DOWN ones.
fn members_to_ask(shared: &Shared) -> Vec<Member> {
    let m = shared.membership();
    m.nodes(Instant::now())
        .into_iter()
        .filter(|n| n.status != Status::Down)
        .map(|n| n.worker.member.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::Reason;
    use crate::membership::Worker;
    use kv_wire::stats::{Finished, Running};

    fn worker(id: &str) -> Worker {
        Worker {
            member: Member {
                id: id.into(),
                host: "10.0.0.1".into(),
                port: 8001,
                wire_port: 8002,
                generation: 1,
            },
            number: 0,
            last_heartbeat: SystemTime::now(),
            fresh: false,
        }
    }

    fn view<'a>(w: &'a Worker, status: Status) -> NodeView<'a> {
        NodeView {
            worker: w,
            status,
            silent_for: Duration::from_millis(100),
            reason: (status == Status::Down).then_some(Reason::Silent),
        }
    }

    #[test]
    fn the_answer_shows_each_worker_as_it_answered_and_merges_the_events() {
        let (a, b, c) = (worker("a"), worker("b"), worker("c"));
        let nodes = [
            view(&a, Status::Up),
            view(&b, Status::Up),
            view(&c, Status::Down),
        ];
        let ring = Ring::new(["a", "b"]);
        let shares = ring.primary_shares();
        let running = Running {
            epoch: 5,
            started_ms: 1,
            keys_to_go: 300,
            bytes_to_go: 30_000,
            keys_moved: 100,
            bytes_moved: 10_000,
        };
        let answers = HashMap::from([
            (
                "a".to_string(),
                Answer::Stats(WorkerStats {
                    keys: 10,
                    bytes: 1_000,
                    epoch: 5,
                    settled_epoch: 4,
                    not_ready: Some("rebalancing in".into()),
                    ops: 0,
                    rebalance: Some(running),
                    recent: vec![Finished {
                        epoch: 4,
                        ended_ms: 2_000,
                        took_ms: 12,
                        keys: 7,
                        bytes: 700,
                        complete: true,
                        why: "change".into(),
                    }],
                }),
            ),
            ("b".to_string(), Answer::Slow),
            // Asked while still SUSPECT, DOWN by the time of rendering.
            ("c".to_string(), Answer::Failed("connection refused".into())),
        ]);
        let rates = HashMap::from([("a".to_string(), 12.34)]);
        let events = vec![
            Event {
                at_ms: 1_000,
                what: What::Epoch {
                    epoch: 4,
                    live: 2,
                    leaving: 0,
                },
            },
            Event {
                at_ms: 3_000,
                what: What::Status {
                    worker: "c".into(),
                    from: Status::Suspect,
                    to: Status::Down,
                    why: "no heartbeat for 1000 ms".into(),
                },
            },
        ];
        let out = render(&Gathered {
            nodes: &nodes,
            answers: &answers,
            rates: &rates,
            epoch: 5,
            ring: &ring,
            shares: &shares,
            unavailable: (&["c".to_string()], 0.25),
            secret: true,
            events,
            took: Duration::from_millis(3),
        });
        assert_eq!(out["epoch"], 5);
        assert_eq!(out["secret"], true);
        assert_eq!(out["unavailable"], json!({"down": ["c"], "share": 0.25}));
        assert_eq!(
            out["counts"],
            json!({"UP": 2, "SUSPECT": 0, "LEAVING": 0, "DOWN": 1})
        );
        assert_eq!(out["settled"], false);
        assert_eq!(
            out["rebalance"],
            json!({"workers": 1, "keys_to_go": 300, "bytes_to_go": 30_000, "keys_moved": 100})
        );
        let w = &out["workers"];
        assert_eq!(w[0]["id"], "a");
        assert_eq!(w[0]["answer"], "ok");
        assert_eq!(
            (w[0]["keys"].clone(), w[0]["bytes"].clone()),
            (json!(10), json!(1_000))
        );
        assert_eq!(
            (w[0]["applied_epoch"].clone(), w[0]["settled_epoch"].clone()),
            (json!(5), json!(4))
        );
        assert_eq!(w[0]["ready"], false);
        assert_eq!(w[0]["ops_per_s"], 12.3);
        assert_eq!(w[0]["rebalance"]["keys_to_go"], 300);
        assert_eq!(w[1]["answer"], "slow");
        assert_eq!(w[1]["error"], "no answer within 500 ms");
        assert_eq!(w[1]["status"], "UP");
        assert_eq!(w[2]["answer"], "not asked");
        assert_eq!(
            (w[2]["status"].clone(), w[2]["reason"].clone()),
            (json!("DOWN"), json!("silent"))
        );
        assert_eq!(w[2]["share"], 0.0);
        let share = w[0]["share"].as_f64().unwrap_or(0.0) + w[1]["share"].as_f64().unwrap_or(0.0);
        assert!((share - 1.0).abs() < 1e-9, "{share}");
        assert_eq!(out["ring"]["workers"], json!(["a", "b"]));
        assert_eq!(
            out["ring"]["segments"].as_array().map(Vec::len),
            Some(RING_SEGMENTS)
        );
        // Newest first: the status change, the worker's rebalance, the epoch.
        let kinds: Vec<&str> = out["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["kind"].as_str())
            .collect();
        assert_eq!(kinds, ["status", "rebalance", "epoch"]);
        assert_eq!(out["events"][1]["worker"], "a");
        assert_eq!(out["events"][1]["keys"], 7);
    }

    #[test]
    fn a_cluster_whose_workers_all_settled_on_the_epoch_is_settled() {
        let a = worker("a");
        let nodes = [view(&a, Status::Up)];
        let ring = Ring::new(["a"]);
        let stats = |settled_epoch| {
            HashMap::from([(
                "a".to_string(),
                Answer::Stats(WorkerStats {
                    epoch: 3,
                    settled_epoch,
                    ..WorkerStats::default()
                }),
            )])
        };
        let settled = |answers: &HashMap<String, Answer>| {
            render(&Gathered {
                nodes: &nodes,
                answers,
                rates: &HashMap::new(),
                epoch: 3,
                ring: &ring,
                shares: &[1.0],
                unavailable: (&[], 0.0),
                secret: false,
                events: Vec::new(),
                took: Duration::ZERO,
            })["settled"]
                .clone()
        };
        assert_eq!(settled(&stats(3)), true);
        // An answer from before the epoch was published: not settled yet.
        assert_eq!(settled(&stats(2)), false);
    }

    #[test]
    fn events_are_bounded() {
        let events = Events::default();
        for epoch in 0..(EVENTS_KEPT as u64 + 50) {
            events.push(What::Epoch {
                epoch,
                live: 1,
                leaving: 0,
            });
        }
        let kept = events.snapshot();
        assert_eq!(kept.len(), EVENTS_KEPT);
        assert_eq!(
            kept.last().map(|e| e.what.clone()),
            Some(What::Epoch {
                epoch: EVENTS_KEPT as u64 + 49,
                live: 1,
                leaving: 0
            })
        );
    }
}
