//! The rules of quorums, apart from the calls: for a write, when the
//! replicas' acknowledgements make it acknowledged ([`WriteQuorum`]); for
//! a read, which owners to ask first, whom to ask when one fails or is
//! slow, which copy wins, and when the read is done ([`ReadQuorum`]).
//! `Node` does the asking and the waiting; the tests below feed answers
//! in any order.
//!
//! A write is acknowledged once the primary and its *first* replica hold
//! it (or, when the first replica fails outright, the second): so every
//! acknowledged write is on the primary and the first replica whenever
//! that replica answers, which is what rebalancing counts on when the
//! primary dies. A replica holding a newer version makes the primary
//! reissue the write above it.
//!
//! R owners are asked: this worker first when it is one (its copy costs no
//! call), then the others in ring order — the first replica holds every
//! acknowledged write, as the primary does. The remaining owner is asked
//! only when one of those fails, or all at once when they are slow (the
//! hedge). While a rebalance runs, the owners of the settled view that the
//! current one leaves out may hold the newest copy: they are always asked,
//! and waited for, but do not count towards R.

use crate::replication::ReplicaAck;
use crate::store::Stored;
use kv_wire::{Member, Version};
use std::collections::VecDeque;

/// How a write's replication ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quorum {
    /// Copies (the primary's included) that hold the write.
    Reached(usize),
    /// A replica holds a newer version.
    Stale(Version),
    /// No replica that could make the quorum holds it.
    Failed,
}

/// One write's acknowledgements from its replicas (first replica first).
#[derive(Debug)]
pub struct WriteQuorum {
    acks: Vec<Option<ReplicaAck>>,
}

impl WriteQuorum {
    /// A write replicated to `replicas` replicas (one or two).
    pub fn new(replicas: usize) -> WriteQuorum {
        WriteQuorum {
            acks: vec![None; replicas],
        }
    }

    /// Replica `i` (0: the first) answered; the outcome once it is known.
    pub fn answer(&mut self, i: usize, ack: ReplicaAck) -> Option<Quorum> {
        if let Some(slot) = self.acks.get_mut(i) {
            *slot = Some(ack);
        }
        self.outcome()
    }

    /// The outcome, if the answers so far decide it.
    pub fn outcome(&self) -> Option<Quorum> {
        let held_too = |i: usize| matches!(self.acks.get(i), Some(Some(ReplicaAck::Applied)));
        match self.acks.first()? {
            None => None,
            Some(ReplicaAck::Applied) => Some(Quorum::Reached(2 + usize::from(held_too(1)))),
            Some(ReplicaAck::Stale(held)) => Some(Quorum::Stale(*held)),
            Some(ReplicaAck::Failed(_)) => match self.acks.get(1) {
                None => Some(Quorum::Failed),
                Some(None) => None,
                Some(Some(ReplicaAck::Applied)) => Some(Quorum::Reached(2)),
                Some(Some(ReplicaAck::Stale(held))) => Some(Quorum::Stale(*held)),
                Some(Some(ReplicaAck::Failed(_))) => Some(Quorum::Failed),
            },
        }
    }
}

/// Whom a read asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// A current owner: counts towards R.
    Owner,
    /// An owner of the settled view, not of the current one.
    Previous,
}

/// One quorum read's bookkeeping.
#[derive(Debug)]
pub struct ReadQuorum<'m> {
    needed: usize,
    owners: usize,
    spare: VecDeque<&'m Member>,
    answered: usize,
    failed: usize,
    previous_left: usize,
    newest: Option<Stored>,
}

impl<'m> ReadQuorum<'m> {
    /// A read by worker `me` of a key that `owners` own (primary first),
    /// needing `needed` of them, while `previous` may still hold newer
    /// copies; with the asks to make first.
    pub fn new(
        me: &str,
        owners: impl IntoIterator<Item = &'m Member>,
        previous: impl IntoIterator<Item = &'m Member>,
        needed: usize,
    ) -> (ReadQuorum<'m>, Vec<(Asked, &'m Member)>) {
        let mut order: Vec<&Member> = owners.into_iter().collect();
        let (owners, previous): (usize, Vec<&Member>) =
            (order.len(), previous.into_iter().collect());
        if let Some(mine) = order.iter().position(|m| m.id == me) {
            let mine = order.remove(mine);
            order.insert(0, mine);
        }
        let spare: VecDeque<&Member> = order.split_off(needed.min(order.len())).into();
        let first = order
            .into_iter()
            .map(|m| (Asked::Owner, m))
            .chain(previous.iter().map(|&m| (Asked::Previous, m)))
            .collect();
        let read = ReadQuorum {
            needed,
            owners,
            spare,
            answered: 0,
            failed: 0,
            previous_left: previous.len(),
            newest: None,
        };
        (read, first)
    }

    /// What one ask brought: a copy (or none held), or `None` when the
    /// ask failed. Returns the owner to ask instead of one that failed.
    pub fn answer(&mut self, asked: Asked, copy: Option<Option<Stored>>) -> Option<&'m Member> {
        if asked == Asked::Previous {
            self.previous_left = self.previous_left.saturating_sub(1);
        }
        match (asked, copy) {
            (_, Some(copy)) => {
                self.answered += usize::from(asked == Asked::Owner);
                if copy.as_ref().map(|c| c.version) > self.newest.as_ref().map(|c| c.version) {
                    self.newest = copy;
                }
                None
            }
            (Asked::Owner, None) => {
                self.failed += 1;
                self.spare.pop_front()
            }
            (Asked::Previous, None) => None,
        }
    }

    /// Whether owners are left that were not asked.
    pub fn has_spares(&self) -> bool {
        !self.spare.is_empty()
    }

    /// The asks were slow: every owner not asked yet, to ask now.
    pub fn hedge(&mut self) -> Vec<&'m Member> {
        self.spare.drain(..).collect()
    }

    /// Whether waiting longer can change the outcome: R owners and every
    /// previous owner answered, or too few owners are left to reach R.
    pub fn done(&self) -> bool {
        (self.answered >= self.needed && self.previous_left == 0)
            || self.owners - self.failed < self.needed
    }

    /// The newest copy, or — short of R owners — how many answered of how
    /// many were needed.
    pub fn finish(self) -> Result<Option<Stored>, (usize, usize)> {
        if self.answered >= self.needed {
            Ok(self.newest)
        } else {
            Err((self.answered, self.needed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kv_wire::Version;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            wire_port: 2,
            generation: 1,
        }
    }

    fn members(ids: &[&str]) -> Vec<Member> {
        ids.iter().map(|id| member(id)).collect()
    }

    fn copy(hlc: u64) -> Option<Stored> {
        Some(Stored {
            version: Version { hlc, node: 1 },
            value: Some(Bytes::from(format!("v{hlc}"))),
        })
    }

    fn failed() -> ReplicaAck {
        ReplicaAck::Failed("refused".into())
    }

    #[test]
    fn a_write_is_acknowledged_with_its_first_replica_or_the_second_when_the_first_fails() {
        let mut w = WriteQuorum::new(2);
        assert_eq!(
            w.answer(1, ReplicaAck::Applied),
            None,
            "the first replica is awaited"
        );
        assert_eq!(w.answer(0, ReplicaAck::Applied), Some(Quorum::Reached(3)));
        let mut w = WriteQuorum::new(2);
        assert_eq!(w.answer(0, ReplicaAck::Applied), Some(Quorum::Reached(2)));
        let mut w = WriteQuorum::new(2);
        assert_eq!(w.answer(0, failed()), None);
        assert_eq!(w.answer(1, ReplicaAck::Applied), Some(Quorum::Reached(2)));
        let mut w = WriteQuorum::new(2);
        assert_eq!(w.answer(1, failed()), None);
        assert_eq!(w.answer(0, failed()), Some(Quorum::Failed));
    }

    #[test]
    fn a_newer_version_on_a_replica_that_decides_makes_the_write_stale() {
        let held = Version { hlc: 9, node: 2 };
        let mut w = WriteQuorum::new(2);
        assert_eq!(
            w.answer(0, ReplicaAck::Stale(held)),
            Some(Quorum::Stale(held))
        );
        let mut w = WriteQuorum::new(2);
        w.answer(0, failed());
        assert_eq!(
            w.answer(1, ReplicaAck::Stale(held)),
            Some(Quorum::Stale(held))
        );
        // The second replica's answer does not decide while the first may.
        let mut w = WriteQuorum::new(2);
        assert_eq!(w.answer(1, ReplicaAck::Stale(held)), None);
    }

    #[test]
    fn with_one_replica_it_alone_decides() {
        let mut w = WriteQuorum::new(1);
        assert_eq!(w.outcome(), None);
        assert_eq!(w.answer(0, failed()), Some(Quorum::Failed));
        let mut w = WriteQuorum::new(1);
        assert_eq!(w.answer(0, ReplicaAck::Applied), Some(Quorum::Reached(2)));
        assert_eq!(
            w.answer(5, ReplicaAck::Applied),
            Some(Quorum::Reached(2)),
            "no such replica"
        );
    }

    fn ids<'a>(asks: &[(Asked, &'a Member)]) -> Vec<(Asked, &'a str)> {
        asks.iter().map(|(a, m)| (*a, m.id.as_str())).collect()
    }

    #[test]
    fn the_primary_asks_itself_and_the_first_replica_and_the_third_only_when_one_fails() {
        let owners = members(&["p", "r1", "r2"]);
        let (mut read, first) = ReadQuorum::new("p", &owners, &[], 2);
        assert_eq!(ids(&first), [(Asked::Owner, "p"), (Asked::Owner, "r1")]);
        assert_eq!(read.answer(Asked::Owner, Some(copy(5))), None);
        assert!(!read.done());
        let instead = read.answer(Asked::Owner, None).map(|m| m.id.clone());
        assert_eq!(instead.as_deref(), Some("r2"));
        assert!(!read.done());
        read.answer(Asked::Owner, Some(copy(7)));
        assert!(read.done());
        assert_eq!(read.finish(), Ok(copy(7)));
    }

    #[test]
    fn a_replica_asks_itself_first_and_a_non_owner_the_primary_and_first_replica() {
        let owners = members(&["p", "r1", "r2"]);
        let (_, first) = ReadQuorum::new("r2", &owners, &[], 2);
        assert_eq!(ids(&first), [(Asked::Owner, "r2"), (Asked::Owner, "p")]);
        let (_, first) = ReadQuorum::new("x", &owners, &[], 2);
        assert_eq!(ids(&first), [(Asked::Owner, "p"), (Asked::Owner, "r1")]);
    }

    #[test]
    fn the_hedge_asks_the_rest_once() {
        let owners = members(&["p", "r1", "r2"]);
        let (mut read, _) = ReadQuorum::new("p", &owners, &[], 2);
        assert!(read.has_spares());
        let hedged: Vec<&str> = read.hedge().iter().map(|m| m.id.as_str()).collect();
        assert_eq!(hedged, ["r2"]);
        assert!(!read.has_spares());
        assert!(read.hedge().is_empty());
        // Asked already: a failure then has nobody left to ask instead.
        assert_eq!(read.answer(Asked::Owner, None), None);
    }

    #[test]
    fn previous_owners_are_waited_for_and_their_newer_copy_wins_but_they_do_not_count() {
        let owners = members(&["p", "r1", "r2"]);
        let previous = members(&["old"]);
        let (mut read, first) = ReadQuorum::new("p", &owners, &previous, 2);
        assert_eq!(
            ids(&first),
            [
                (Asked::Owner, "p"),
                (Asked::Owner, "r1"),
                (Asked::Previous, "old")
            ]
        );
        read.answer(Asked::Owner, Some(copy(3)));
        read.answer(Asked::Owner, Some(None));
        assert!(!read.done(), "the previous owner has not answered");
        read.answer(Asked::Previous, Some(copy(9)));
        assert!(read.done());
        assert_eq!(read.finish(), Ok(copy(9)));
        // A previous owner alone is no quorum.
        let (mut read, _) = ReadQuorum::new("p", &owners, &previous, 2);
        read.answer(Asked::Previous, Some(copy(9)));
        read.answer(Asked::Owner, Some(copy(3)));
        assert_eq!(read.finish(), Err((1, 2)));
    }

    #[test]
    fn two_failed_owners_of_three_end_the_read_at_once() {
        let owners = members(&["p", "r1", "r2"]);
        let (mut read, _) = ReadQuorum::new("x", &owners, &[], 2);
        read.answer(Asked::Owner, None);
        assert!(!read.done());
        read.answer(Asked::Owner, None);
        assert!(read.done());
        assert_eq!(read.finish(), Err((0, 2)));
    }

    #[test]
    fn a_failed_previous_owner_is_not_waited_for() {
        let owners = members(&["p", "r1"]);
        let previous = members(&["old"]);
        let (mut read, _) = ReadQuorum::new("p", &owners, &previous, 2);
        read.answer(Asked::Owner, Some(copy(1)));
        read.answer(Asked::Previous, None);
        read.answer(Asked::Owner, Some(copy(2)));
        assert!(read.done());
        assert_eq!(read.finish(), Ok(copy(2)));
    }

    #[test]
    fn a_one_worker_ring_needs_its_one_owner() {
        let owners = members(&["solo"]);
        let (mut read, first) = ReadQuorum::new("solo", &owners, &[], 1);
        assert_eq!(ids(&first), [(Asked::Owner, "solo")]);
        assert!(!read.has_spares());
        read.answer(Asked::Owner, Some(None));
        assert!(read.done());
        assert_eq!(read.finish(), Ok(None));
    }
}
