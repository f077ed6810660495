//! A worker's life: joining, serving, leaving.
//!
//! A worker is *ready* (`/readyz`) once it is in the current topology and
//! its last completed sync was towards that very topology: it compared
//! every arc it owns with each co-owner and each leaver and pulled what it
//! lacked, so it holds what the topology assigns it.
//!
//! On the first SIGTERM (or Ctrl-C) it *leaves*: the controller takes it
//! out of the ring, the worker keeps serving while rebalancing hands its
//! keys to their owners, and it stops once its sync towards a topology
//! without it completed (every key it held confirmed), once nobody is left
//! to take them, or when the drain timeout runs out. A second signal stops
//! it at once. The rules here are pure; `lib.rs` waits on them.

use crate::topology::View;
use kv_wire::{Member, Topology};
use std::collections::{HashMap, HashSet};
use std::fmt;
use tokio_util::sync::CancellationToken;

/// How a worker is told to go: `leave` hands its keys over first, `now`
/// stops everything at once.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    leave: CancellationToken,
    now: CancellationToken,
}

impl Stop {
    /// Not told anything yet.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Starts leaving.
    pub fn leave(&self) {
        self.leave.cancel();
    }

    /// Stops at once.
    pub fn now(&self) {
        self.now.cancel();
    }

    /// A signal arrived: the first starts leaving, the next stops at once.
    pub fn signal(&self) {
        if self.leave.is_cancelled() {
            self.now();
        } else {
            self.leave();
        }
    }

    /// Cancelled once the worker leaves.
    pub fn leaving(&self) -> &CancellationToken {
        &self.leave
    }

    /// Cancelled once the worker stops.
    pub fn stopping(&self) -> &CancellationToken {
        &self.now
    }
}

/// Turns SIGTERM and Ctrl-C into [`Stop::signal`], for as long as the
/// process runs.
pub async fn stop_on_signals(stop: Stop) {
    let mut signals = match kv_service::signals::Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for signals; the worker stops only when its process is killed");
            return;
        }
    };
    loop {
        signals.recv().await;
        stop.signal();
    }
}

/// Why a worker is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Not in the current topology yet.
    Joining {
        /// The epoch it holds.
        epoch: u64,
    },
    /// In it, but not yet holding all it is assigned.
    RebalancingIn {
        /// The current epoch.
        epoch: u64,
        /// The epoch its data last fully matched.
        settled: u64,
    },
    /// Leaving the cluster.
    Leaving,
    /// Its data dir fails writes (a full disk, say).
    Storage(String),
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::Joining { epoch: 0 } => {
                f.write_str("joining: no topology from the controller yet")
            }
            NotReady::Joining { epoch } => write!(
                f,
                "joining: not in the topology of epoch {epoch} yet"
            ),
            NotReady::RebalancingIn { epoch, settled } => write!(
                f,
                "rebalancing in: pulling its share of epoch {epoch} (its data matches epoch {settled})"
            ),
            NotReady::Leaving => f.write_str("leaving: handing its keys over to their owners"),
            NotReady::Storage(why) => write!(f, "storage failing: {why}"),
        }
    }
}

/// Whether `me` is ready, given whether it is leaving, the current view
/// and the view its last completed sync was towards. `Ok` carries the epoch.
pub fn readiness(me: &str, leaving: bool, current: &View, settled: &View) -> Result<u64, NotReady> {
    if leaving {
        Err(NotReady::Leaving)
    } else if current.member(me).is_none() {
        Err(NotReady::Joining {
            epoch: current.epoch(),
        })
    } else if settled.epoch() != current.epoch() {
        Err(NotReady::RebalancingIn {
            epoch: current.epoch(),
            settled: settled.epoch(),
        })
    } else {
        Ok(current.epoch())
    }
}

/// Whether a worker that holds its share of `settled` holds its share of
/// `next` with nothing to compare or pull: `next` is the very next epoch,
/// nobody starts or stops leaving, nobody drops out of the ring or comes
/// back in another incarnation, and the only workers added are fresh ones
/// (registered with an empty store, in a ring for the first time). An
/// added worker takes arcs from the others and gives them none, and holds
/// nothing they lack. With none added, this is a restarted controller's
/// next epoch. Not after a gap: the epochs missed may have left this
/// worker out (it was called DOWN while cut off) and routed writes past
/// it. Nor when a worker comes back with its copies: it may hold writes
/// that owners which could not reach it lack (simulator seed 9200429).
pub fn holds_share_at_once(settled: &Topology, next: &Topology) -> bool {
    if next.epoch != settled.epoch + 1 || settled.leaving != next.leaving {
        return false;
    }
    let before: HashMap<&str, &Member> = (settled.members.iter())
        .map(|m| (m.id.as_str(), m))
        .collect();
    let fresh: HashSet<&str> = next.fresh.iter().map(String::as_str).collect();
    let mut kept = 0;
    for m in &next.members {
        if before.get(m.id.as_str()) == Some(&m) {
            kept += 1;
        } else if !fresh.contains(m.id.as_str()) {
            return false;
        }
    }
    kept == settled.members.len()
}

/// How a leaving worker's drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every key it held is confirmed by its owners.
    HandedOver,
    /// Nobody is left to take its keys (every other worker is leaving or
    /// down): waiting would only delay the exit.
    NowhereToGo,
}

/// Whether a leaving `me` is done: the controller published a topology
/// without it, and its sync towards that topology completed (or there is
/// no one to hand anything to). `None` while it must keep going.
pub fn drained(me: &str, current: &View, settled: &View) -> Option<Drained> {
    if current.epoch() == 0 || current.member(me).is_some() {
        None
    } else if current.topology.members.is_empty() {
        Some(Drained::NowhereToGo)
    } else if settled.epoch() == current.epoch() {
        Some(Drained::HandedOver)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(epoch: u64, ids: &[&str]) -> View {
        View::new(Topology {
            epoch,
            members: ids
                .iter()
                .map(|id| Member {
                    id: id.to_string(),
                    host: "h".into(),
                    port: 1,
                    wire_port: 2,
                    generation: 1,
                })
                .collect(),
            leaving: Vec::new(),
            down: Vec::new(),
            fresh: Vec::new(),
        })
    }

    #[test]
    fn ready_only_in_the_topology_with_its_sync_towards_it_complete() {
        let none = view(0, &[]);
        let e1 = view(1, &["w1", "w2"]);
        let e2 = view(2, &["w1", "w2", "w3"]);
        assert_eq!(
            readiness("w3", false, &none, &none),
            Err(NotReady::Joining { epoch: 0 })
        );
        assert_eq!(
            readiness("w3", false, &e1, &none),
            Err(NotReady::Joining { epoch: 1 })
        );
        assert_eq!(
            readiness("w3", false, &e2, &e1),
            Err(NotReady::RebalancingIn {
                epoch: 2,
                settled: 1
            })
        );
        assert_eq!(readiness("w3", false, &e2, &e2), Ok(2));
        assert_eq!(readiness("w3", true, &e2, &e2), Err(NotReady::Leaving));
        for (reason, says) in [
            (NotReady::Joining { epoch: 0 }, "joining: no topology"),
            (
                NotReady::Joining { epoch: 1 },
                "joining: not in the topology of epoch 1",
            ),
            (
                NotReady::RebalancingIn {
                    epoch: 2,
                    settled: 1,
                },
                "rebalancing in",
            ),
            (NotReady::Leaving, "leaving"),
        ] {
            assert!(reason.to_string().starts_with(says), "{reason}");
        }
    }

    #[test]
    fn a_leaver_is_drained_once_its_sync_without_it_completed_or_nobody_is_left() {
        let with = view(1, &["w1", "w2"]);
        let without = view(2, &["w2"]);
        let alone = view(3, &[]);
        assert_eq!(drained("w1", &with, &with), None, "still in the ring");
        assert_eq!(drained("w1", &without, &with), None, "handing over");
        assert_eq!(drained("w1", &without, &without), Some(Drained::HandedOver));
        assert_eq!(drained("w1", &alone, &with), Some(Drained::NowhereToGo));
        assert_eq!(
            drained("w1", &view(0, &[]), &view(0, &[])),
            None,
            "no topology yet"
        );
    }

    #[test]
    fn only_the_next_epoch_that_adds_nothing_but_fresh_workers_holds_the_share_at_once() {
        let topology = |epoch, ids: &[&str], fresh: &[&str]| Topology {
            fresh: fresh.iter().map(|id| id.to_string()).collect(),
            ..view(epoch, ids).topology.clone()
        };
        let settled = topology(4, &["w1", "w2", "w3"], &[]);
        let at_once = |next: &Topology| holds_share_at_once(&settled, next);
        assert!(
            at_once(&topology(5, &["w1", "w2", "w3"], &[])),
            "a controller restart"
        );
        assert!(
            at_once(&topology(5, &["w1", "w2", "w3", "w4"], &["w4"])),
            "w4 joins empty"
        );
        assert!(at_once(&topology(
            5,
            &["w1", "w2", "w3", "w4", "w5"],
            &["w4", "w5"]
        )));
        assert!(
            !at_once(&topology(6, &["w1", "w2", "w3", "w4"], &["w4"])),
            "after a gap"
        );
        assert!(
            !at_once(&topology(5, &["w1", "w2", "w3", "w4"], &[])),
            "w4 back with its copies"
        );
        assert!(
            !at_once(&topology(5, &["w1", "w2", "w4"], &["w4"])),
            "w3 dropped out"
        );
        let mut reborn = topology(5, &["w1", "w2", "w3"], &["w3"]);
        reborn.members[2].generation = 2;
        assert!(
            !at_once(&reborn),
            "w3 in a new incarnation: its old one is gone"
        );
        let mut leaving = topology(5, &["w1", "w2", "w4"], &["w4"]);
        leaving.leaving = settled.members[2..].to_vec();
        assert!(!at_once(&leaving), "w3 starts leaving");
    }

    #[test]
    fn the_first_signal_leaves_and_the_second_stops() {
        let stop = Stop::new();
        stop.signal();
        assert!(stop.leaving().is_cancelled() && !stop.stopping().is_cancelled());
        stop.signal();
        assert!(stop.stopping().is_cancelled());
    }
}
