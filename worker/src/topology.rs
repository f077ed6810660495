//! The topology as this worker knows it: the current view (what it routes
//! and owns by) and the settled view (where the last completed rebalance
//! left the data, asked too by quorum reads while a rebalance runs).

use kv_wire::{Member, Ring, Topology, REPLICATION_FACTOR};
use std::sync::Arc;
use tokio::sync::watch;

/// A topology with its ring.
#[derive(Debug, Default)]
pub struct View {
    /// The live workers at an epoch, sorted by id.
    pub topology: Topology,
    /// Their ring.
    pub ring: Ring,
}

impl View {
    /// A view of `topology` (members sorted by id here, whatever the sender did).
    pub fn new(mut topology: Topology) -> View {
        for list in [&mut topology.members, &mut topology.leaving] {
            list.sort_by(|a, b| a.id.cmp(&b.id));
            list.dedup_by(|a, b| a.id == b.id);
        }
        let ring = topology.ring();
        View { topology, ring }
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.topology.epoch
    }

    /// The member with this id.
    pub fn member(&self, id: &str) -> Option<&Member> {
        let members = &self.topology.members;
        members
            .binary_search_by(|m| m.id.as_str().cmp(id))
            .ok()
            .map(|i| &members[i])
    }

    /// The key's owners, primary first (fewer than 3 in a small cluster).
    pub fn owners(&self, key: &str) -> Vec<&Member> {
        self.ring
            .owners(key.as_bytes(), REPLICATION_FACTOR)
            .into_iter()
            .filter_map(|id| self.member(id))
            .collect()
    }

    /// Whether `member` is in this view with the same incarnation.
    pub fn has(&self, member: &Member) -> bool {
        self.member(&member.id)
            .is_some_and(|m| m.generation == member.generation)
    }

    /// Whether `member` is in this view or leaving it.
    pub fn names(&self, member: &Member) -> bool {
        self.has(member) || self.topology.leaving.contains(member)
    }
}

/// The current and settled views.
#[derive(Debug)]
pub struct Topologies {
    current: watch::Sender<Arc<View>>,
    settled: watch::Sender<Arc<View>>,
}

impl Topologies {
    /// No topology yet (epoch 0, no members).
    pub fn new() -> Topologies {
        Topologies {
            current: watch::Sender::new(Arc::default()),
            settled: watch::Sender::new(Arc::default()),
        }
    }

    /// The view to route by.
    pub fn current(&self) -> Arc<View> {
        self.current.borrow().clone()
    }

    /// Follows changes of the current view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.current.subscribe()
    }

    /// Takes `topology` if it is newer than the current one; returns the
    /// epoch held afterwards.
    pub fn offer(&self, topology: Topology) -> u64 {
        let mut held = 0;
        self.current.send_if_modified(|current| {
            held = current.epoch();
            if topology.epoch > held {
                held = topology.epoch;
                *current = Arc::new(View::new(topology));
                true
            } else {
                false
            }
        });
        held
    }

    /// Where the data was when the last rebalance completed.
    pub fn settled(&self) -> Arc<View> {
        self.settled.borrow().clone()
    }

    /// Follows completed rebalances.
    pub fn subscribe_settled(&self) -> watch::Receiver<Arc<View>> {
        self.settled.subscribe()
    }

    /// Records a completed rebalance.
    pub fn settle(&self, view: Arc<View>) {
        self.settled.send_replace(view);
    }
}

impl Default for Topologies {
    fn default() -> Self {
        Topologies::new()
    }
}
