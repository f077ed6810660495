//! A topology with its ring: who owns a key, and who is in or leaving the
//! ring. One definition for everyone who routes by the controller's
//! topology: workers (from the topology the bus pushes), clients (from
//! `/nodes`, [`crate::nodes::Nodes::topology`]) and the simulator.

use crate::{Member, Ring, Topology, REPLICATION_FACTOR};
use std::sync::OnceLock;

/// A key's owners, primary first: at most [`REPLICATION_FACTOR`], kept
/// inline (every read and write lists them: no allocation for it).
pub type Owners<'v> = smallvec::SmallVec<[&'v Member; REPLICATION_FACTOR]>;

/// A topology with its ring.
#[derive(Debug, Default)]
pub struct View {
    /// The live workers at an epoch, sorted by id.
    pub topology: Topology,
    /// Their ring.
    pub ring: Ring,
    /// The ring over every worker that may hold copies: members, leavers
    /// and the DOWN ones (built when a read first needs it).
    everyone: OnceLock<Ring>,
}

impl View {
    /// A view of `topology` (members sorted by id here, whatever the sender did).
    pub fn new(mut topology: Topology) -> View {
        for list in [&mut topology.members, &mut topology.leaving] {
            list.sort_by(|a, b| a.id.cmp(&b.id));
            list.dedup_by(|a, b| a.id == b.id);
        }
        let ring = topology.ring();
        View {
            topology,
            ring,
            everyone: OnceLock::new(),
        }
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
    pub fn owners(&self, key: &str) -> Owners<'_> {
        let hash = Ring::key_hash(key.as_bytes());
        self.ring
            .owner_indices(hash, REPLICATION_FACTOR)
            .iter()
            .filter_map(|&i| self.ring_member(i))
            .collect()
    }

    /// The key's primary: the first of [`View::owners`], found without
    /// listing them (a write is routed by its primary alone).
    pub fn primary(&self, key: &str) -> Option<&Member> {
        let hash = Ring::key_hash(key.as_bytes());
        match self.ring_member(self.ring.primary_index(hash)?) {
            Some(member) => Some(member),
            // A ring naming a worker that is not a member (put together by
            // hand): the first owner that is one.
            None => self.owners(key).first().copied(),
        }
    }

    /// The member at index `i` of the ring's nodes.
    fn ring_member(&self, i: u32) -> Option<&Member> {
        let id = self.ring.nodes().get(i as usize)?;
        // The ring is built from the members, both sorted by id: a node's
        // index is its member's (checked, not assumed: a view put together
        // by hand may differ). Every request routes here; a search of the
        // members by id was 2% of a client's CPU.
        match self.topology.members.get(i as usize) {
            Some(m) if m.id == *id => Some(m),
            _ => self.member(id),
        }
    }

    /// Whether `member` is in this view with the same incarnation.
    pub fn has(&self, member: &Member) -> bool {
        self.member(&member.id)
            .is_some_and(|m| m.generation == member.generation)
    }

    /// The workers that would own `key` if every worker the topology names
    /// were live, when all of them are DOWN (gone silent, not forgotten).
    /// The copies of a key none of the live owners holds may then be on
    /// those workers alone: the key is unavailable until they return (or
    /// the controller forgets them), not absent. `None` otherwise.
    ///
    /// Owners that replaced one another one by one (one DOWN, its keys
    /// copied to a new owner, then the next) did hold the key, so this is
    /// asked only of keys no live owner holds; a key never written whose
    /// owners all went down reads as unavailable too, as it would in any
    /// store whose replicas of a range are all down.
    pub fn owners_down(&self, key: &str) -> Option<Vec<&str>> {
        let down = &self.topology.down;
        if down.is_empty() {
            return None;
        }
        let owners = self.everyone().owners(key.as_bytes(), REPLICATION_FACTOR);
        owners.iter().all(|id| self.is_down(id)).then_some(owners)
    }

    /// The share of the circle (0 to 1) where [`View::owners_down`] names
    /// the owners: where keys no live worker holds are unavailable.
    pub fn share_owners_down(&self) -> f64 {
        if self.topology.down.is_empty() {
            return 0.0;
        }
        self.everyone().share_owned_only_by(|id| self.is_down(id))
    }

    /// The ring over every worker the topology names, DOWN ones included.
    fn everyone(&self) -> &Ring {
        self.everyone
            .get_or_init(|| Ring::new(self.topology.named_ids()))
    }

    fn is_down(&self, id: &str) -> bool {
        self.topology.down.iter().any(|d| d == id)
    }

    /// Whether `member` is in this view or leaving it.
    pub fn names(&self, member: &Member) -> bool {
        self.has(member) || self.topology.leaving.contains(member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            host: format!("{id}.local"),
            port: 1,
            wire_port: 2,
            generation: 1,
        }
    }

    /// The owners the ring names, looked up among the members by id.
    fn by_id<'v>(view: &'v View, key: &str) -> Vec<&'v Member> {
        view.ring
            .owners(key.as_bytes(), REPLICATION_FACTOR)
            .into_iter()
            .filter_map(|id| view.topology.members.iter().find(|m| m.id == id))
            .collect()
    }

    #[test]
    fn owners_are_the_members_the_ring_names() {
        // Given out of order, and with a duplicate.
        let ids = ["w5", "w2", "w10", "w1", "w2", "w3"];
        let view = View::new(Topology {
            epoch: 1,
            members: ids.iter().map(|id| member(id)).collect(),
            leaving: Vec::new(),
            down: Vec::new(),
            fresh: Vec::new(),
        });
        // A ring put together by hand over other workers: their indices are
        // not the members'.
        let mut odd = View::new(view.topology.clone());
        odd.ring = Ring::new(["w10", "w3", "w9"]);
        for i in 0..2_000 {
            let key = format!("key:{i}");
            let owners = view.owners(&key);
            assert_eq!(owners.len(), 3);
            assert_eq!(owners[..], by_id(&view, &key), "{key}");
            assert_eq!(odd.owners(&key)[..], by_id(&odd, &key), "{key}");
            assert_eq!(view.primary(&key), owners.first().copied(), "{key}");
            assert_eq!(odd.primary(&key), by_id(&odd, &key).first().copied());
        }
    }

    #[test]
    fn the_primary_is_the_first_owner_whatever_the_size() {
        for n in 0..5 {
            let view = View::new(Topology {
                epoch: 1,
                members: (0..n).map(|i| member(&format!("w{i}"))).collect(),
                leaving: Vec::new(),
                down: Vec::new(),
                fresh: Vec::new(),
            });
            for i in 0..500 {
                let key = format!("key:{i}");
                assert_eq!(view.primary(&key), view.owners(&key).first().copied());
                assert_eq!(
                    view.ring.primary(key.as_bytes()),
                    view.ring.owners(key.as_bytes(), 1).first().copied()
                );
            }
        }
    }

    /// Keys whose owners among every worker named (live, leaving, DOWN)
    /// are all DOWN are named with those owners; no other key is.
    #[test]
    fn owners_down_names_the_keys_whose_owners_are_all_down() {
        let view = |members: &[&str], leaving: &[&str], down: &[&str]| {
            View::new(Topology {
                epoch: 1,
                members: members.iter().map(|id| member(id)).collect(),
                leaving: leaving.iter().map(|id| member(id)).collect(),
                down: down.iter().map(|id| id.to_string()).collect(),
                fresh: Vec::new(),
            })
        };
        let everyone = Ring::new(["w1", "w2", "w3", "w4", "w5"]);
        let (one_alive, none_down) = (
            view(&["w1", "w5"], &[], &["w2", "w3", "w4"]),
            view(&["w1", "w2", "w3", "w4", "w5"], &[], &[]),
        );
        // A leaver hands its copies over: not down.
        let leaving = view(&["w1", "w5"], &["w2"], &["w3", "w4"]);
        let mut named = 0;
        for i in 0..2_000 {
            let key = format!("key:{i}");
            let owners = everyone.owners(key.as_bytes(), REPLICATION_FACTOR);
            let all_down = owners.iter().all(|id| ["w2", "w3", "w4"].contains(id));
            assert_eq!(
                one_alive.owners_down(&key),
                all_down.then(|| owners.clone()),
                "{key}"
            );
            named += usize::from(all_down);
            assert_eq!(none_down.owners_down(&key), None);
            assert_eq!(leaving.owners_down(&key), None);
        }
        // One arc in ten of a 5-worker ring has its 3 owners among 3 given workers.
        assert!((100..300).contains(&named), "{named} of 2,000");
        let share = one_alive.share_owners_down();
        assert!(
            (share - named as f64 / 2_000.0).abs() < 0.03,
            "{share} against {named} of 2,000"
        );
        assert_eq!(
            (none_down.share_owners_down(), leaving.share_owners_down()),
            (0.0, 0.0)
        );
    }
}
