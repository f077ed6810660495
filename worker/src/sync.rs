//! What rebalancing and anti-entropy decide, apart from doing it: pure
//! functions of the current view, digests and key lists, so the rules are
//! tested on their own and the executor (`rebalance.rs`) only does I/O.
//!
//! The rules need no memory of earlier topologies, so no sequence of
//! changes or interruptions can leave them planning from a wrong past:
//!
//! - **Owners pull.** For every arc of the ring a worker owns, it compares
//!   its digest with each co-owner's and fetches what it lacks: all of the
//!   arc when it holds nothing there, otherwise the keys whose versions
//!   differ. It asks the arc's first co-owner (in ring order) first and the
//!   others after, so a worker that gained an arc receives it once, from
//!   one holder. A digest tells how many copies a peer holds, not how new
//!   they are: one holding fewer (a worker back on an old data dir) may
//!   still hold the newest version of some, so an arc that differs is
//!   always compared key by key, whichever side holds more.
//! - **Leavers are asked too.** A worker leaving the cluster (on SIGTERM)
//!   is out of the ring but listed in the topology while it hands over;
//!   owners compare every arc with it last, and read its list whenever it
//!   differs (a leaver pulls nothing itself). So a key only leavers hold —
//!   two workers scaled down at once — reaches its owners before they
//!   count as ready.
//! - **Non-owners hand off.** A key held by a worker that does not own it
//!   is offered (key and version) to its owners, in rounds, while they
//!   pull; sent to an owner still lacking it once that owner stopped
//!   taking keys itself ([`OfferRounds`]: no owner had it to pull); and
//!   dropped only once every owner confirmed holding it.
//!
//! Together: after any changes, once everyone has run these to the end,
//! every key held anywhere is on all its current owners at its newest
//! version (the property test below drives random rings, interruptions
//! and removals to check exactly that).

use crate::topology::View;
use kv_wire::{Digest, HashRange, Member, Version};
use std::collections::BTreeMap;
use std::time::Duration;

/// Pauses between a handoff's first offer rounds: owners are pulling
/// meanwhile. Later rounds come [`OFFER_PAUSE_LATER`] apart.
const OFFER_PAUSES: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
/// The pause between rounds once [`OFFER_PAUSES`] are over.
const OFFER_PAUSE_LATER: Duration = Duration::from_secs(2);
/// From this round on, values an owner lacks are sent to it even while it
/// keeps confirming keys (writes can confirm a few a round at an owner
/// that pulls nothing): 20 s after the first pauses.
const PUSH_ANYWAY_FROM: usize = OFFER_PAUSES.len() + 10;

/// What to fetch from a peer whose digest of an arc differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// Nothing: the digests are equal, or the peer holds nothing there.
    Nothing,
    /// The whole arc: nothing is held here.
    All,
    /// Compare key lists and fetch the keys missing or older here.
    Diff,
}

/// Who the peer holding an arc is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A co-owner: it pulls what it lacks itself.
    CoOwner,
    /// A worker leaving the cluster: it pulls nothing.
    Leaver,
}

/// What to do about an arc given this worker's digest and its holder's.
pub fn decide(mine: Digest, theirs: Digest) -> Pull {
    if mine == theirs || theirs.count == 0 {
        Pull::Nothing
    } else if mine.count == 0 {
        Pull::All
    } else {
        Pull::Diff
    }
}

/// What a periodic round makes of an arc whose digests differed, after
/// another look a moment later ([`second_look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Equal now: the difference was copies in flight.
    Settled,
    /// A digest moved in between: the arc is being written, and its
    /// difference most likely in flight too. Listing its keys now would
    /// cost a round under a heavy load seconds of both workers' time (a
    /// bulk load ran at half speed through each round), mostly to find
    /// copies already on their way; a later round looks again.
    Busy,
    /// The same difference at rest on both sides: compare key by key now.
    Differs,
}

/// An arc's digests (mine, theirs) at one look, and at the next — `None`
/// when they were equal then.
pub fn second_look(before: (Digest, Digest), again: Option<(Digest, Digest)>) -> Look {
    match again {
        None => Look::Settled,
        Some(again) if again == before => Look::Differs,
        Some(_) => Look::Busy,
    }
}

/// The arcs one peer is asked about, in one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerArcs<'v> {
    /// The peer.
    pub peer: &'v Member,
    /// Whether it owns the arcs or is leaving.
    pub holder: Holder,
    /// Indices into [`Comparisons::arcs`].
    pub arcs: Vec<usize>,
}

/// Every comparison a worker makes for a view, in three phases: each
/// arc's first co-owner, then the other co-owners, then the leavers.
#[derive(Debug, Default)]
pub struct Comparisons<'v> {
    /// The arcs this worker owns, with the number of comparisons each
    /// needs before it counts as verified.
    pub arcs: Vec<(HashRange, usize)>,
    /// The phases in order, each keyed by peer id.
    pub phases: [BTreeMap<&'v str, PeerArcs<'v>>; 3],
}

impl<'v> Comparisons<'v> {
    /// The comparisons `me` makes in `view`.
    pub fn new(me: &str, view: &'v View) -> Comparisons<'v> {
        let mut plan = Comparisons::default();
        let leavers: Vec<&Member> = view
            .topology
            .leaving
            .iter()
            .filter(|m| m.id != me)
            .collect();
        for (range, owners) in view.ring.arcs() {
            if !owners.contains(&me) {
                continue;
            }
            let index = plan.arcs.len();
            let others: Vec<&Member> = owners
                .iter()
                .filter(|id| **id != me)
                .filter_map(|id| view.member(id))
                .collect();
            plan.arcs.push((range, others.len() + leavers.len()));
            let holders = others
                .into_iter()
                .enumerate()
                .map(|(i, peer)| (usize::from(i > 0), peer, Holder::CoOwner))
                .chain(leavers.iter().map(|peer| (2, *peer, Holder::Leaver)));
            for (phase, peer, holder) in holders {
                plan.phases[phase]
                    .entry(peer.id.as_str())
                    .or_insert_with(|| PeerArcs {
                        peer,
                        holder,
                        arcs: Vec::new(),
                    })
                    .arcs
                    .push(index);
            }
        }
        plan
    }
}

/// Keys this worker holds but does not own, on their way to their owners.
/// A key is dropped here only once every owner confirmed it.
///
/// A leaver hands off every key it holds, so this is as large as its
/// store: keys are kept in groups that share their owners (a ring arc),
/// each key with a byte of confirmations, rather than in a map by key
/// with a list of owner names each (that took three quarters of a leaving
/// worker's CPU).
#[derive(Debug, Default)]
pub struct Handoff {
    /// Each group's owners: at most 8 (a ring arc has
    /// [`kv_wire::REPLICATION_FACTOR`]), so a key's confirmations fit a byte.
    groups: Vec<Vec<String>>,
    /// The keys, group by group, sorted within a group: the offers go
    /// out in the same order on every run, whatever order the store
    /// scanned them in (the simulator replays a seed exactly).
    keys: Vec<Pending>,
    /// Keys some owner has not confirmed.
    unconfirmed: usize,
}

/// The confirmations of a key once all `owners` confirmed it.
fn everyone(owners: &[String]) -> u8 {
    (1u16 << owners.len()).wrapping_sub(1) as u8
}

/// A key on its way.
#[derive(Debug)]
struct Pending {
    key: String,
    /// The version held here.
    version: Version,
    group: u32,
    /// Bit `i`: the group's owner `i` confirmed it.
    confirmed: u8,
}

impl Handoff {
    /// Tracks `keys` (with the versions held here), all owned by `owners`.
    pub fn add(&mut self, owners: Vec<String>, mut keys: Vec<(String, Version)>) {
        debug_assert!(owners.len() <= 8, "a group has at most 8 owners");
        keys.sort_unstable();
        let group = self.groups.len() as u32;
        if !owners.is_empty() {
            self.unconfirmed += keys.len();
        }
        self.keys
            .extend(keys.into_iter().map(|(key, version)| Pending {
                key,
                version,
                group,
                confirmed: 0,
            }));
        self.groups.push(owners);
    }

    /// Per owner, the keys it has not confirmed (see [`Handoff::key`]).
    pub fn waiting(&self) -> BTreeMap<String, Vec<usize>> {
        let mut per_owner: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, pending) in self.keys.iter().enumerate() {
            for (bit, owner) in self.groups[pending.group as usize].iter().enumerate() {
                if pending.confirmed & (1 << bit) == 0 {
                    per_owner.entry(owner.clone()).or_default().push(i);
                }
            }
        }
        per_owner
    }

    /// Key `i` and the version held here.
    pub fn key(&self, i: usize) -> (&str, Version) {
        let pending = &self.keys[i];
        (&pending.key, pending.version)
    }

    /// `owner` holds these keys at the tracked version or newer.
    pub fn confirm(&mut self, owner: &str, keys: impl IntoIterator<Item = usize>) {
        for i in keys {
            let Some(pending) = self.keys.get_mut(i) else {
                continue;
            };
            let owners = &self.groups[pending.group as usize];
            let Some(bit) = owners.iter().position(|o| o == owner) else {
                continue;
            };
            let was = pending.confirmed;
            pending.confirmed |= 1 << bit;
            let all = everyone(owners);
            if was != all && pending.confirmed == all {
                self.unconfirmed -= 1;
            }
        }
    }

    /// Keys every owner confirmed (safe to drop), with their versions.
    pub fn confirmed(&self) -> impl Iterator<Item = (&str, Version)> {
        self.keys
            .iter()
            .filter(|p| p.confirmed == everyone(&self.groups[p.group as usize]))
            .map(|p| (p.key.as_str(), p.version))
    }

    /// Keys some owner has not confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// When a handoff's offer rounds send values themselves, and when they
/// end. An offer only confirms what an owner holds; owners pull what they
/// lack meanwhile (their own sync), from whichever holder comes first.
/// Sending values as well would move the same copies twice, so values go
/// to an owner only once the first pauses are over and it confirmed
/// nothing in the round before: it has stopped taking them itself (its
/// sync is over, or cannot reach the other holders). Before, the values
/// went after a fixed schedule, and a round that offered a leaver's keys
/// one batch at a time took 12 s under writes at 1M keys, so the schedule
/// never came first; offered at once, rounds take a few seconds and a
/// fixed schedule would send what the owners are still pulling.
#[derive(Debug, Default)]
pub struct OfferRounds {
    /// The round about to run (0: the first).
    round: usize,
    /// Keys each owner confirmed in the round before.
    confirmed: BTreeMap<String, usize>,
}

impl OfferRounds {
    /// Whether this round sends `owner` the values it lacks.
    pub fn push_to(&self, owner: &str) -> bool {
        self.round >= PUSH_ANYWAY_FROM
            || (self.round >= OFFER_PAUSES.len()
                && self.confirmed.get(owner).copied().unwrap_or(0) == 0)
    }

    /// The round ran, `confirmed` keys by each owner it reached (offers
    /// held, values sent and stored); `unconfirmed` keys are left. The
    /// pause before the next round, or `None`: the handoff ends, with
    /// every key confirmed, or after a round that sent values to every
    /// owner it reached and in which none confirmed anything (what is left
    /// waits for a later sync).
    pub fn next(
        &mut self,
        confirmed: BTreeMap<String, usize>,
        unconfirmed: usize,
    ) -> Option<Duration> {
        let pushed_all = confirmed.keys().all(|owner| self.push_to(owner));
        let progressed = confirmed.values().any(|n| *n > 0);
        let ran = self.round;
        self.round += 1;
        self.confirmed = confirmed;
        if unconfirmed == 0 || (pushed_all && !progressed) {
            return None;
        }
        Some(OFFER_PAUSES.get(ran).copied().unwrap_or(OFFER_PAUSE_LATER))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_wire::{Ring, Topology};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Per owner, keys confirmed in a round.
    fn by_owner(counts: &[(&str, usize)]) -> BTreeMap<String, usize> {
        counts.iter().map(|(o, n)| (o.to_string(), *n)).collect()
    }

    #[test]
    fn offer_rounds_send_values_to_an_owner_only_once_it_stopped_taking_keys() {
        let mut rounds = OfferRounds::default();
        // The first rounds only offer, whatever the owners confirm.
        for (round, pause) in OFFER_PAUSES.iter().enumerate() {
            assert!(
                !rounds.push_to("a") && !rounds.push_to("b"),
                "round {round}"
            );
            let confirmed = by_owner(&[("a", round % 2), ("b", 0)]);
            assert_eq!(rounds.next(confirmed, 10), Some(*pause));
        }
        // "a" confirmed keys in the round before: it is still pulling.
        assert!(!rounds.push_to("a"));
        assert!(rounds.push_to("b"));
        // "b" took its values; "a" confirmed more.
        assert_eq!(
            rounds.next(by_owner(&[("a", 3), ("b", 5)]), 4),
            Some(OFFER_PAUSE_LATER)
        );
        assert!(!rounds.push_to("a") && !rounds.push_to("b"));
        // Neither confirmed anything, but neither was sent values: one
        // more round, which sends them.
        assert_eq!(
            rounds.next(by_owner(&[("a", 0), ("b", 0)]), 4),
            Some(OFFER_PAUSE_LATER)
        );
        assert!(rounds.push_to("a") && rounds.push_to("b"));
        // Sent, and still nothing confirmed (neither took them): it ends.
        assert_eq!(rounds.next(by_owner(&[("a", 0), ("b", 0)]), 4), None);
    }

    #[test]
    fn offer_rounds_end_once_every_key_is_confirmed() {
        let mut rounds = OfferRounds::default();
        assert_eq!(rounds.next(by_owner(&[("a", 10)]), 0), None);
        // No owner to offer to (none reachable in the view): nothing to wait for.
        assert_eq!(OfferRounds::default().next(BTreeMap::new(), 3), None);
    }

    #[test]
    fn an_owner_confirming_a_few_keys_a_round_is_sent_its_values_in_the_end() {
        // Writes can confirm keys at an owner that pulls nothing.
        let mut rounds = OfferRounds::default();
        let first_push = (0..100).find(|_| {
            let push = rounds.push_to("a");
            assert!(rounds.next(by_owner(&[("a", 1)]), 100).is_some());
            push
        });
        assert_eq!(first_push, Some(PUSH_ANYWAY_FROM));
    }

    #[test]
    fn a_second_look_pulls_only_differences_at_rest() {
        let d = |count, xor| Digest { count, xor };
        let first = (d(10, 1), d(11, 2));
        assert_eq!(second_look(first, None), Look::Settled);
        assert_eq!(second_look(first, Some(first)), Look::Differs);
        // Written here, there, or both, in between.
        assert_eq!(second_look(first, Some((d(11, 3), d(11, 2)))), Look::Busy);
        assert_eq!(second_look(first, Some((d(10, 1), d(12, 4)))), Look::Busy);
        assert_eq!(second_look(first, Some((d(12, 5), d(13, 6)))), Look::Busy);
    }

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            host: "h".into(),
            port: 1,
            wire_port: 2,
            generation: 1,
        }
    }

    /// Small rings (64 vnodes) keep the property test fast; the rules do
    /// not depend on the vnode count.
    fn view(epoch: u64, ids: &[&str]) -> View {
        view_leaving(epoch, ids, &[])
    }

    fn view_leaving(epoch: u64, ids: &[&str], leaving: &[&str]) -> View {
        let topology = Topology {
            epoch,
            members: ids.iter().map(|id| member(id)).collect(),
            leaving: leaving.iter().map(|id| member(id)).collect(),
            down: Vec::new(),
            fresh: Vec::new(),
        };
        let mut v = View::new(topology);
        v.ring = Ring::with_vnodes(ids.iter().copied(), 64);
        v
    }

    #[test]
    fn decisions() {
        let d = |count, xor| Digest { count, xor };
        assert_eq!(decide(d(3, 1), d(3, 1)), Pull::Nothing);
        assert_eq!(decide(d(0, 0), d(3, 1)), Pull::All);
        assert_eq!(
            decide(d(3, 1), d(2, 5)),
            Pull::Diff,
            "fewer copies there may still be newer ones"
        );
        assert_eq!(
            decide(d(3, 1), d(3, 2)),
            Pull::Diff,
            "same count, other versions"
        );
        assert_eq!(decide(d(3, 1), d(4, 2)), Pull::Diff);
        assert_eq!(decide(d(3, 1), d(0, 0)), Pull::Nothing, "nothing there");
    }

    #[test]
    fn each_owned_arc_is_compared_with_its_first_co_owner_first_and_the_rest_after() {
        let v = view(1, &["w1", "w2", "w3", "w4", "w5"]);
        let plan = Comparisons::new("w1", &v);
        let owned = v
            .ring
            .arcs()
            .iter()
            .filter(|(_, o)| o.contains(&"w1"))
            .count();
        assert_eq!(plan.arcs.len(), owned);
        let mut seen = vec![0usize; plan.arcs.len()];
        for (phase, peers) in plan.phases.iter().enumerate() {
            for (id, arcs) in peers {
                assert_ne!(*id, "w1");
                for &i in &arcs.arcs {
                    let owners = &v.ring.arcs()[..]
                        .iter()
                        .find(|(r, _)| *r == plan.arcs[i].0)
                        .unwrap()
                        .1
                        .clone();
                    let others: Vec<&&str> = owners.iter().filter(|o| **o != "w1").collect();
                    let position = others.iter().position(|o| **o == *id).unwrap();
                    assert_eq!(phase, usize::from(position > 0));
                    seen[i] += 1;
                }
            }
        }
        assert!(seen.iter().zip(&plan.arcs).all(|(s, (_, n))| s == n));
        assert!(plan.arcs.iter().all(|(_, n)| *n == 2));
        assert!(plan.phases[2].is_empty(), "nobody is leaving");
    }

    #[test]
    fn every_owned_arc_is_also_compared_with_each_leaver_last() {
        let v = view_leaving(1, &["w1", "w2", "w3", "w4"], &["w5", "w6"]);
        let plan = Comparisons::new("w1", &v);
        assert!(plan.arcs.iter().all(|(_, n)| *n == 4));
        let leavers: Vec<_> = plan.phases[2]
            .values()
            .map(|p| (p.peer.id.as_str(), p.holder, p.arcs.len()))
            .collect();
        let all = plan.arcs.len();
        assert_eq!(
            leavers,
            [("w5", Holder::Leaver, all), ("w6", Holder::Leaver, all)]
        );
        assert!(plan.phases[..2]
            .iter()
            .flat_map(|p| p.values())
            .all(|p| p.holder == Holder::CoOwner));
        // A leaver compares nothing: it owns no arc.
        let theirs = Comparisons::new("w5", &v);
        assert!(theirs.arcs.is_empty());
    }

    #[test]
    fn a_handoff_drops_a_key_only_when_every_owner_confirmed_it() {
        let v = |hlc| Version { hlc, node: 1 };
        let owners = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect();
        let mut h = Handoff::default();
        // Sorted within a group, whatever order the store gave.
        h.add(
            owners(&["a", "b"]),
            vec![("k".into(), v(5)), ("i".into(), v(4))],
        );
        h.add(owners(&["a"]), vec![("j".into(), v(6))]);
        assert_eq!((h.len(), h.unconfirmed()), (3, 3));
        assert_eq!(
            (h.key(0), h.key(1), h.key(2)),
            (("i", v(4)), ("k", v(5)), ("j", v(6)))
        );
        let waiting = h.waiting();
        assert_eq!(waiting["a"], [0, 1, 2]);
        assert_eq!(waiting["b"], [0, 1]);
        // One owner of two: not yet. An owner of another group: nothing.
        h.confirm("b", [1, 2]);
        assert_eq!((h.confirmed().count(), h.unconfirmed()), (0, 3));
        // Twice counts once.
        h.confirm("a", [1, 2, 2]);
        assert_eq!(
            h.confirmed().collect::<Vec<_>>(),
            [("k", v(5)), ("j", v(6))]
        );
        assert_eq!(h.unconfirmed(), 1);
        let waiting = h.waiting();
        assert_eq!(
            (waiting["a"].as_slice(), waiting["b"].as_slice()),
            (&[0][..], &[0][..])
        );
        h.confirm("a", [0]);
        h.confirm("b", [0]);
        assert_eq!((h.confirmed().count(), h.unconfirmed()), (3, 0));
        assert!(h.waiting().is_empty());
    }

    // ---- The property: a model cluster run by these rules -------------

    /// Copies by `(ring hash, key)`, so an arc is a range of the map.
    type Copies = BTreeMap<(u64, String), Version>;

    fn place(key: &str) -> (u64, String) {
        (Ring::key_hash(key.as_bytes()), key.to_string())
    }

    fn in_range(
        copies: &Copies,
        range: HashRange,
    ) -> impl Iterator<Item = (&(u64, String), &Version)> {
        copies
            .range((range.start, String::new())..)
            .take_while(move |((h, _), _)| *h <= range.end)
    }

    /// A model cluster: each worker's copies. Rebalancing runs the rules
    /// above with direct calls instead of a network.
    #[derive(Debug, Clone, Default)]
    struct Model {
        stores: BTreeMap<String, Copies>,
        /// The old rule, put back to show the property catches it:
        /// a worker plans from the view where its last *completed*
        /// rebalance left it (empty at first), and a key with no previous
        /// owner still live is only offered, never sent.
        old_rule: bool,
        settled: BTreeMap<String, Vec<String>>,
    }

    fn digest(copies: &Copies, range: HashRange) -> Digest {
        let mut d = Digest::default();
        for ((h, _), v) in in_range(copies, range) {
            d.add(*h, *v);
        }
        d
    }

    fn apply(store: &mut Copies, key: &str, version: Version) {
        let held = store.entry(place(key)).or_default();
        if *held < version {
            *held = version;
        }
    }

    impl Model {
        fn store(&mut self, id: &str) -> &mut Copies {
            self.stores.entry(id.to_string()).or_default()
        }

        /// One owner's pulls for `view`, stopping after `budget` steps
        /// (an interruption) — each step one arc with one peer.
        fn pull(&mut self, me: &str, v: &View, budget: &mut usize) {
            let plan = Comparisons::new(me, v);
            for phase in &plan.phases {
                for (peer, arcs) in phase {
                    for &i in &arcs.arcs {
                        if *budget == 0 {
                            return;
                        }
                        *budget -= 1;
                        let range = plan.arcs[i].0;
                        let empty = Copies::new();
                        let theirs_all = self.stores.get(*peer).unwrap_or(&empty);
                        let mine = digest(self.stores.get(me).unwrap_or(&empty), range);
                        let theirs = digest(theirs_all, range);
                        let wanted: Vec<(String, Version)> = match decide(mine, theirs) {
                            Pull::Nothing => Vec::new(),
                            Pull::All | Pull::Diff => in_range(theirs_all, range)
                                .map(|((_, k), v)| (k.clone(), *v))
                                .collect(),
                        };
                        let store = self.store(me);
                        for (k, v) in wanted {
                            apply(store, &k, v);
                        }
                    }
                }
            }
        }

        /// One worker's handoff of the keys it does not own in `view`.
        fn hand_off(&mut self, me: &str, v: &View, budget: &mut usize) {
            let mut by_owners: BTreeMap<Vec<String>, Vec<(String, Version)>> = BTreeMap::new();
            for ((_, key), version) in self.store(me).clone() {
                let owners: Vec<String> = v.owners(&key).iter().map(|m| m.id.clone()).collect();
                if !owners.iter().any(|o| o == me) {
                    by_owners.entry(owners).or_default().push((key, version));
                }
            }
            let mut handoff = Handoff::default();
            for (owners, keys) in by_owners {
                handoff.add(owners, keys);
            }
            for (owner, items) in handoff.waiting() {
                if *budget == 0 {
                    return;
                }
                *budget -= 1;
                // Offer, then send what is still lacking (the last round).
                let store = self.store(&owner);
                for &i in &items {
                    let (k, v) = handoff.key(i);
                    apply(store, k, v);
                }
                handoff.confirm(&owner, items);
            }
            let store = self.store(me);
            for (key, version) in handoff.confirmed() {
                if store.get(&place(key)) == Some(&version) {
                    store.remove(&place(key));
                }
            }
        }

        /// The old planner's essentials, for the negative check.
        fn old_rebalance(&mut self, me: &str, v: &View, budget: &mut usize) {
            let from_ids = self.settled.get(me).cloned().unwrap_or_default();
            let from = view(0, &from_ids.iter().map(String::as_str).collect::<Vec<_>>());
            for ((_, key), version) in self.store(me).clone() {
                if *budget == 0 {
                    return;
                }
                *budget -= 1;
                let old: Vec<String> = from.owners(&key).iter().map(|m| m.id.clone()).collect();
                let designated = old.iter().find(|o| v.member(o).is_some());
                if designated.map(String::as_str) == Some(me) {
                    for owner in v.owners(&key) {
                        if !old.contains(&owner.id) {
                            let id = owner.id.clone();
                            apply(self.store(&id), &key, version);
                        }
                    }
                }
            }
            self.settled.insert(
                me.to_string(),
                v.topology.members.iter().map(|m| m.id.clone()).collect(),
            );
        }

        /// Every live worker rebalances towards `view`, each cut off after
        /// `budget` steps (`usize::MAX`: to the end).
        fn rebalance(&mut self, v: &View, budgets: &[usize]) {
            let ids: Vec<String> = v.topology.members.iter().map(|m| m.id.clone()).collect();
            for (i, me) in ids.iter().enumerate() {
                let mut budget = budgets.get(i).copied().unwrap_or(usize::MAX);
                if self.old_rule {
                    self.old_rebalance(me, v, &mut budget);
                } else {
                    self.pull(me, v, &mut budget);
                    self.hand_off(me, v, &mut budget);
                }
            }
        }

        /// Every key held by a live worker, at its newest version there.
        fn newest(&self, live: &BTreeSet<String>) -> Copies {
            let mut newest = Copies::new();
            for (id, store) in &self.stores {
                if live.contains(id) {
                    for ((_, k), v) in store {
                        apply(&mut newest, k, *v);
                    }
                }
            }
            newest
        }
    }

    #[test]
    fn a_co_owner_holding_fewer_copies_of_an_arc_may_hold_newer_ones() {
        // A worker back on an old data dir holds more copies of an arc
        // than a co-owner that kept up, but older ones. Counts say nothing
        // of newness: it must still compare.
        let v = view(1, &["a", "w"]);
        let arc_of = |key: &str| {
            let hash = Ring::key_hash(key.as_bytes());
            v.ring.arcs().iter().position(|(r, _)| r.contains(hash))
        };
        let (k1, k2) = (0..)
            .map(|i| (format!("k{i}"), format!("k{}", i + 1)))
            .find(|(a, b)| arc_of(a) == arc_of(b))
            .expect("two keys in one arc");
        let (old, new) = (Version { hlc: 1, node: 1 }, Version { hlc: 2, node: 1 });
        let mut m = Model::default();
        apply(m.store("a"), &k1, new);
        apply(m.store("w"), &k1, old);
        apply(m.store("w"), &k2, old);
        let mut unlimited = usize::MAX;
        m.pull("w", &v, &mut unlimited);
        assert_eq!(m.store("w").get(&place(&k1)), Some(&new));
    }

    /// A random history: a starting set of workers, keys written to their
    /// owners, then changes (a worker dies with its copies, or joins), each
    /// followed by a rebalance cut short at random points.
    fn run_history(
        old_rule: bool,
        initial: usize,
        first_cuts: &[usize],
        changes: &[(Change, usize, Vec<usize>)],
        keys: usize,
    ) -> Result<(), String> {
        let mut model = Model {
            old_rule,
            ..Model::default()
        };
        let mut live: BTreeSet<String> = (0..initial).map(|i| format!("w{i}")).collect();
        let mut next_id = initial;
        let mut epoch = 1;
        let ids = |live: &BTreeSet<String>| live.iter().cloned().collect::<Vec<_>>();
        let to_view = |epoch, live: &BTreeSet<String>| {
            let ids = ids(live);
            view(epoch, &ids.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let mut v = to_view(epoch, &live);
        // Writes reach all three owners (W=2 plus the async third copy),
        // but every third only the two that acknowledged it.
        for k in 0..keys {
            let key = format!("key:{k}");
            let version = Version {
                hlc: 1 + k as u64,
                node: 1,
            };
            let copies = if k % 3 == 0 { 2 } else { 3 };
            for owner in v.owners(&key).into_iter().take(copies) {
                apply(model.store(&owner.id), &key, version);
            }
        }
        // The first topology reaches workers that already hold data (the
        // cluster formed as they registered): the step that used to plan
        // from an empty ring.
        model.rebalance(&v, first_cuts);
        let before = model.newest(&live);
        for (kind, which, cuts) in changes {
            if *kind == Change::Join || live.len() <= 4 {
                live.insert(format!("w{next_id}"));
                next_id += 1;
            } else if let Change::Leave(n) = kind {
                // Leavers stay listed while owners pull from them (and
                // hand off nothing here: the owners alone must be enough),
                // then go with their copies.
                let leavers: Vec<String> = (0..*n)
                    .map(|j| ids(&live)[(which + j) % live.len()].clone())
                    .collect();
                for l in &leavers {
                    live.remove(l);
                }
                epoch += 1;
                let members = ids(&live);
                v = view_leaving(
                    epoch,
                    &members.iter().map(String::as_str).collect::<Vec<_>>(),
                    &leavers.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                model.rebalance(&v, cuts);
                model.rebalance(&v, &[]);
                model.rebalance(&v, &[]);
                for l in &leavers {
                    model.stores.remove(l);
                }
            } else {
                let victim = ids(&live)[which % live.len()].clone();
                // Never kill the last live holder of a key: a failure W=2
                // and three copies tolerate, not a second one mid-flight.
                let survivors: BTreeSet<String> =
                    live.iter().filter(|id| **id != victim).cloned().collect();
                if model.newest(&survivors).len() == model.newest(&live).len() {
                    live = survivors;
                    model.stores.remove(&victim);
                }
            }
            epoch += 1;
            v = to_view(epoch, &live);
            model.rebalance(&v, cuts);
        }
        // Quiet at last: everyone runs to the end (twice: a pull that found
        // a co-owner still filling is finished by the next round).
        model.rebalance(&v, &[]);
        model.rebalance(&v, &[]);
        let newest = model.newest(&live);
        if newest.len() != before.len() {
            return Err(format!("{} keys lost", before.len() - newest.len()));
        }
        for ((_, key), version) in &newest {
            for owner in v.owners(key) {
                let held = model.stores.get(&owner.id).and_then(|s| s.get(&place(key)));
                if held != Some(version) {
                    return Err(format!(
                        "{key} at {version:?} is {held:?} on its owner {}",
                        owner.id
                    ));
                }
            }
        }
        for (id, store) in &model.stores {
            for (_, key) in store.keys() {
                if !v.owners(key).iter().any(|m| &m.id == id) {
                    return Err(format!("{id} still holds {key}, which it does not own"));
                }
            }
        }
        Ok(())
    }

    /// A change of the cluster in a history.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Change {
        /// A worker joins.
        Join,
        /// A worker dies with its copies.
        Kill,
        /// This many workers leave at once (SIGTERM).
        Leave(usize),
    }

    type History = (usize, Vec<usize>, Vec<(Change, usize, Vec<usize>)>);

    fn history() -> impl Strategy<Value = History> {
        (
            3usize..7,
            proptest::collection::vec(0usize..400, 0..8),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just(Change::Join),
                        Just(Change::Kill),
                        Just(Change::Leave(1)),
                        Just(Change::Leave(2))
                    ],
                    any::<usize>(),
                    proptest::collection::vec(0usize..400, 0..8),
                ),
                1..6,
            ),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn every_key_ends_on_all_its_current_owners_whatever_the_changes_and_interruptions(
            (initial, first_cuts, changes) in history()
        ) {
            run_history(false, initial, &first_cuts, &changes, 300).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn the_property_catches_the_old_planner_that_started_from_an_empty_ring() {
        // A kill while the first rebalance runs (cut after a few keys).
        let (first_cuts, changes) = (vec![5; 5], vec![(Change::Kill, 1, vec![5; 5])]);
        let verdict = run_history(true, 5, &first_cuts, &changes, 300);
        assert!(verdict.is_err(), "the old rule lost nothing: {verdict:?}");
        run_history(false, 5, &first_cuts, &changes, 300).expect("the new rules");
    }
}
