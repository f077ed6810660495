//! The simulated network: which worker processes run, which are paused,
//! which links are cut, how late (or whether) each message arrives. Peer
//! calls go through [`SimTransport`], the worker's
//! [`Transport`](kv_worker::transport::Transport) seam: the request is
//! answered by the target's real `wire_server::answer`, as a task of the
//! target's incarnation (a crash cancels it), and its answer travels back
//! over the same faulty network.
//!
//! Everything random is drawn from one seeded generator, in the order the
//! single-threaded runtime runs the tasks, so a seed replays exactly.

use kv_client::ConnectionError;
use kv_wire::{Member, Request, Response};
use kv_worker::node::Node;
use kv_worker::transport::{Call, Transport};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The controller's name as a network host.
pub const CONTROLLER: &str = "controller";
/// How long a peer call waits by default (the worker's `PEER_TIMEOUT`).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// What a lost TCP segment costs: its retransmission.
const RETRANSMIT: Duration = Duration::from_millis(200);
/// How often a message waiting on a paused process looks again.
const PAUSE_POLL: Duration = Duration::from_millis(5);
/// One message in this many is held up for 5-50 ms.
const SLOW_ONE_IN: u32 = 50;

/// One running incarnation of a worker.
#[derive(Clone)]
pub struct Proc {
    /// Its data plane.
    pub node: Arc<Node>,
    /// Cancelled when it crashes or stops: its tasks end, it sends nothing.
    pub alive: CancellationToken,
}

#[derive(Default)]
struct State {
    procs: BTreeMap<String, Proc>,
    paused: BTreeSet<String>,
    /// Cut links, directed: `(from, to)`, with how many faults cut each
    /// (overlapping faults compose: the link mends when the last ends).
    cut: BTreeMap<(String, String), u32>,
    /// Chance that a message is lost (datagrams) or retransmitted (calls).
    loss: f64,
}

/// The network, shared by every simulated host.
pub struct Net {
    state: Mutex<State>,
    rng: Mutex<fastrand::Rng>,
}

impl Net {
    /// A healthy network drawing from `seed`.
    pub fn new(seed: u64) -> Net {
        Net {
            state: Mutex::default(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The seeded generator every random choice of the run comes from.
    pub fn rng(&self) -> MutexGuard<'_, fastrand::Rng> {
        self.rng.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `id`'s running incarnation, if any.
    pub fn proc(&self, id: &str) -> Option<Proc> {
        self.state().procs.get(id).cloned()
    }

    /// Every running worker, by id.
    pub fn procs(&self) -> Vec<(String, Proc)> {
        self.state()
            .procs
            .iter()
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect()
    }

    /// `proc` runs as `id` from now on.
    pub fn start(&self, id: &str, proc: Proc) {
        self.state().procs.insert(id.to_string(), proc);
    }

    /// `id` stops (crashes, or exits): its tasks are cancelled.
    pub fn stop(&self, id: &str) -> bool {
        let mut state = self.state();
        state.paused.remove(id);
        match state.procs.remove(id) {
            Some(proc) => {
                proc.alive.cancel();
                true
            }
            None => false,
        }
    }

    /// Pauses or resumes `host`: a paused process sends and answers nothing.
    pub fn set_paused(&self, host: &str, paused: bool) {
        let mut state = self.state();
        if paused {
            state.paused.insert(host.to_string());
        } else {
            state.paused.remove(host);
        }
    }

    /// Whether `host` is paused.
    pub fn is_paused(&self, host: &str) -> bool {
        self.state().paused.contains(host)
    }

    /// Cuts the link from `from` to `to` (once more), or ends one cut.
    pub fn set_cut(&self, from: &str, to: &str, cut: bool) {
        let link = (from.to_string(), to.to_string());
        let mut state = self.state();
        let cuts = state.cut.entry(link.clone()).or_default();
        if cut {
            *cuts += 1;
        } else {
            *cuts = cuts.saturating_sub(1);
            if *cuts == 0 {
                state.cut.remove(&link);
            }
        }
    }

    /// Sets the chance of losing a message.
    pub fn set_loss(&self, loss: f64) {
        self.state().loss = loss;
    }

    /// Mends every link, ends every pause and every loss.
    pub fn heal(&self) {
        let mut state = self.state();
        state.cut.clear();
        state.paused.clear();
        state.loss = 0.0;
    }

    /// How long one message from `from` to `to` takes, or `None` when it
    /// is lost: a cut link loses everything, a lossy one datagrams only
    /// (a call's lost segment is retransmitted, late).
    pub fn transit(&self, from: &str, to: &str, datagram: bool) -> Option<Duration> {
        let loss = {
            let state = self.state();
            if state.cut.contains_key(&(from.to_string(), to.to_string())) {
                return None;
            }
            state.loss
        };
        let mut rng = self.rng();
        let mut delay = Duration::from_micros(rng.u64(100..1_500));
        // A few messages are held up (a busy host, a queue behind a burst):
        // later ones overtake them, and a sender that crashes meanwhile
        // has work in flight for longer than a round trip.
        if rng.u32(0..SLOW_ONE_IN) == 0 {
            delay += Duration::from_millis(rng.u64(5..50));
        }
        if loss > 0.0 && rng.f64() < loss {
            if datagram {
                return None;
            }
            delay += RETRANSMIT;
        }
        Some(delay)
    }

    /// Waits while `host` is paused.
    pub async fn while_paused(&self, host: &str) {
        while self.is_paused(host) {
            tokio::time::sleep(PAUSE_POLL).await;
        }
    }

    /// Carries one message: waits out its transit, then for its
    /// destination to run; `false` when it is lost on the way.
    pub async fn carry(&self, from: &str, to: &str, datagram: bool) -> bool {
        let Some(delay) = self.transit(from, to, datagram) else {
            return false;
        };
        tokio::time::sleep(delay).await;
        self.while_paused(to).await;
        true
    }
}

/// The transport of one worker incarnation over the simulated network.
pub struct SimTransport {
    /// The worker's id.
    pub from: String,
    /// Its incarnation's liveness: a crashed process sends nothing.
    pub alive: CancellationToken,
    /// The network.
    pub net: Arc<Net>,
}

impl Transport for SimTransport {
    fn call<'a>(
        &'a self,
        peer: &'a Member,
        request: Request,
        timeout: Option<Duration>,
    ) -> Call<'a> {
        let after = timeout.unwrap_or(PEER_TIMEOUT);
        let addr = peer.wire_addr();
        Box::pin(async move {
            let exchange = call(&self.net, &self.from, &self.alive, peer, request);
            match tokio::time::timeout(after, exchange).await {
                Ok(answer) => answer,
                Err(_) => Err(ConnectionError::Timeout { addr, after }),
            }
        })
    }
}

/// One request and its answer, from `from` to `peer`. A lost message
/// leaves the caller waiting (its timeout ends the wait).
pub async fn call(
    net: &Arc<Net>,
    from: &str,
    alive: &CancellationToken,
    peer: &Member,
    request: Request,
) -> Result<Response, ConnectionError> {
    let addr = peer.wire_addr();
    let lost = |reason: &str| ConnectionError::Lost {
        addr: addr.clone(),
        reason: reason.to_string(),
    };
    net.while_paused(from).await;
    if alive.is_cancelled() {
        return Err(lost("the caller stopped"));
    }
    if !net.carry(from, &peer.id, false).await {
        std::future::pending::<()>().await;
    }
    let Some(target) = net.proc(&peer.id) else {
        return Err(ConnectionError::Connect {
            addr,
            reason: "connection refused".into(),
        });
    };
    // The target answers in a task of its own, as its wire server does: a
    // caller that gives up does not stop the work, a crash does.
    let (node, dies) = (target.node.clone(), target.alive.clone());
    let handler = tokio::spawn(async move {
        tokio::select! {
            biased;
            () = dies.cancelled() => None,
            answer = kv_worker::wire_server::answer(&node, request) => Some(answer),
        }
    });
    let Ok(Some(answer)) = handler.await else {
        return Err(lost("connection reset"));
    };
    if !net.carry(&peer.id, from, false).await || alive.is_cancelled() {
        std::future::pending::<()>().await;
    }
    Ok(answer)
}
