//! A topology with its ring: who owns a key, and who is in or leaving the
//! ring. One definition for everyone who routes by the controller's
//! topology: workers (from the topology the bus pushes), clients (from
//! `/nodes`, [`crate::nodes::Nodes::topology`]) and the simulator.

use crate::{Member, Ring, Topology, REPLICATION_FACTOR};

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
