//! The registry of workers and the topology epochs. Pure: no sockets, no
//! clock — callers pass `now`.
//!
//! Every change of the live set (a worker joins, leaves, goes DOWN, comes
//! back, or registers a new incarnation) marks the membership dirty;
//! [`Membership::publish`] then bumps the epoch once and yields the topology
//! to push. Batching like this gives one epoch per burst of changes, and
//! lets a restarted controller hold publications until its grace period
//! ends — all but those that only add workers, so a fresh cluster is usable
//! as soon as its first worker registered.

use crate::detector::{Detector, Observation, Reason, Status, Transition};
use kv_wire::heartbeat::Heartbeat;
use kv_wire::register::LeaveRequest;
use kv_wire::{Member, Topology};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

/// Most workers one controller tracks, so registration spam cannot grow
/// memory without bound.
pub const MAX_WORKERS: usize = 65_536;
/// Longest worker id or host name (a DNS name's limit).
pub const MAX_NAME_LEN: usize = 253;
/// Highest epoch or generation a worker may present (2^53, the largest
/// integer every JSON reader holds exactly): far above what a cluster
/// reaches, and far enough below `u64::MAX` that counting on from it never
/// overflows.
pub const MAX_COUNTER: u64 = 1 << 53;

/// A worker's registration, as received.
pub use kv_wire::register::RegisterRequest as Registration;

/// What a registration was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// Small number to put in heartbeats.
    pub member: u32,
    /// The incarnation this registration starts.
    pub generation: u64,
    /// The controller's epoch after it.
    pub epoch: u64,
}

/// Why a registration was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegisterError {
    /// A field is missing, empty, too long or zero.
    #[error("{0}")]
    Invalid(String),
    /// [`MAX_WORKERS`] distinct ids are registered already.
    #[error("the controller already tracks {MAX_WORKERS} workers; reuse worker ids")]
    Full,
}

/// Why a leave was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaveError {
    /// No worker with this id is registered.
    #[error("no worker {0:?} is registered")]
    Unknown(String),
    /// The leave names another incarnation than the registered one: an old
    /// pod's, or a replay. It changes nothing.
    #[error("worker {id:?} is at generation {current}, not {given}: a leave of another incarnation changes nothing")]
    Stale {
        /// The worker id.
        id: String,
        /// The generation in the leave.
        given: u64,
        /// The registered one.
        current: u64,
    },
}

/// A registered worker.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Id, host and ports as registered.
    pub member: Member,
    /// Its heartbeat number.
    pub number: u32,
    /// Wall-clock time of its last heartbeat (or registration).
    pub last_heartbeat: SystemTime,
    /// Registered with an empty store, and in no topology published since:
    /// the next one that has it names it as fresh.
    pub fresh: bool,
}

/// A worker as `/nodes` shows it.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    /// The worker.
    pub worker: &'a Worker,
    /// Its status.
    pub status: Status,
    /// Time since it was last heard from.
    pub silent_for: Duration,
    /// Why it is DOWN, if it is.
    pub reason: Option<Reason>,
}

/// What a heartbeat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatOutcome {
    /// What the detector made of it.
    pub observation: Observation,
    /// The worker reported an epoch older than the published one: it missed
    /// a push.
    pub lagging: bool,
}

/// A status change, named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedTransition {
    /// The worker's id.
    pub id: String,
    /// The change.
    pub transition: Transition,
}

/// Workers, their liveness, and the epoch.
#[derive(Debug)]
pub struct Membership {
    workers: BTreeMap<String, Worker>,
    ids: HashMap<u32, String>,
    detector: Detector,
    epoch: u64,
    /// The epoch of the last published topology (0: none yet).
    published: u64,
    /// The ids in the ring of the last published topology.
    published_ids: BTreeSet<String>,
    dirty: bool,
    grace_until: Instant,
    /// A worker registered saying it had seen an epoch, or heartbeated
    /// under a number this controller never gave: the cluster ran before
    /// this controller started, so its grace holds every change.
    restarted: bool,
    /// Before this, not even additions are published: every worker of a
    /// cluster that ran before heartbeats at least once in half of
    /// `down_after` (or it would be SUSPECT), so by then a restarted
    /// controller has heard of one and knows it is not a fresh cluster.
    fresh_after: Instant,
    /// How long DOWN workers stay listed (`None`: for ever).
    forget_after: Option<Duration>,
    /// Workers that the last topologies of returning workers named and
    /// that have not registered with this controller, with when it first
    /// heard of them. The cluster had them and they are silent: they are
    /// DOWN, as the controller before this one would have said, until
    /// they register or are forgotten.
    absent: BTreeMap<String, Instant>,
}

impl Membership {
    /// An empty membership at start-up, publishing only additions before
    /// `now + grace`, marking workers DOWN after `down_after` of silence.
    pub fn new(down_after: Duration, grace: Duration, now: Instant) -> Membership {
        let grace_until = now + grace;
        Membership {
            workers: BTreeMap::new(),
            ids: HashMap::new(),
            detector: Detector::new(down_after, grace_until),
            epoch: 0,
            published: 0,
            published_ids: BTreeSet::new(),
            dirty: false,
            grace_until,
            restarted: false,
            fresh_after: now + down_after / 2,
            forget_after: None,
            absent: BTreeMap::new(),
        }
    }

    /// Forgets DOWN workers `after` this long (zero: never).
    pub fn forgetting_after(mut self, after: Duration) -> Membership {
        self.forget_after = (!after.is_zero()).then_some(after);
        self
    }

    /// The current epoch (the last published one, or the highest heard).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Registers (or re-registers) a worker.
    ///
    /// An unknown id keeps the generation it presents, so a controller
    /// restart changes nobody's incarnation; a known id starts a new one (a
    /// restarted pod, or a worker that lost us).
    pub fn register(
        &mut self,
        reg: Registration,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Registered, RegisterError> {
        validate(&reg)?;
        if let Some(seen) = reg.epoch {
            self.heard_epoch(seen);
            self.restarted = true;
            self.heard_of(&reg, now);
        }
        self.absent.remove(&reg.id);
        let (number, generation) = match self.workers.get(&reg.id) {
            Some(known) => (
                known.number,
                known.member.generation.max(reg.generation.unwrap_or(0)) + 1,
            ),
            None if self.workers.len() >= MAX_WORKERS => return Err(RegisterError::Full),
            None => (self.number_for(&reg.id), reg.generation.unwrap_or(0).max(1)),
        };
        let member = Member {
            id: reg.id.clone(),
            host: reg.host,
            port: reg.port,
            wire_port: reg.wire_port,
            generation,
        };
        self.ids.insert(number, reg.id.clone());
        self.workers.insert(
            reg.id,
            Worker {
                member,
                number,
                last_heartbeat: wall,
                fresh: reg.empty,
            },
        );
        self.detector.track(number, generation, now);
        self.dirty = true;
        Ok(Registered {
            member: number,
            generation,
            epoch: self.epoch,
        })
    }

    /// A returning worker names the other workers its last topology had.
    /// Those not registered are absent, if this controller is still in its
    /// grace period: learning the cluster. After it, the controller has
    /// seen the cluster for itself, and a worker back from a long
    /// partition would name workers forgotten since.
    fn heard_of(&mut self, reg: &Registration, now: Instant) {
        if now >= self.grace_until {
            return;
        }
        for peer in &reg.peers {
            let known = self.workers.contains_key(peer) || self.absent.contains_key(peer);
            if !known && *peer != reg.id && self.workers.len() + self.absent.len() < MAX_WORKERS {
                self.absent.insert(peer.clone(), now);
            }
        }
    }

    /// A worker holds a topology of epoch `seen`. Numbering continues above
    /// the highest heard, from registrations and heartbeats alike, so that
    /// a restarted controller never publishes an epoch a worker already
    /// holds with another ring (it would keep its own: epochs only move
    /// up). One above what this controller published is such a topology,
    /// of the controller before it: publish again, above it.
    fn heard_epoch(&mut self, seen: u64) {
        if seen > MAX_COUNTER {
            return;
        }
        if self.published > 0 && seen > self.published {
            self.dirty = true;
        }
        self.epoch = self.epoch.max(seen);
    }

    /// The heartbeat number for a worker new to this controller: the first
    /// free one from a hash of its id. Numbers must not depend on the order
    /// workers register in: after a controller restart, a worker that has
    /// not heard of it yet still heartbeats under the number the old
    /// controller gave it, and had the new one given that number to
    /// another worker (of the same generation: generations survive a
    /// controller restart), the stale heartbeats would count as that
    /// worker's, and its own, with lower sequence numbers, as replays.
    /// Derived from the id, a number is the same under every controller
    /// but when two ids' hashes meet (for 1,000 workers, one chance in
    /// 8,600).
    fn number_for(&self, id: &str) -> u32 {
        let mut number = xxhash_rust::xxh3::xxh3_64(id.as_bytes()) as u32;
        while self.ids.contains_key(&number) {
            number = number.wrapping_add(1);
        }
        number
    }

    /// Feeds a heartbeat received at `now`.
    pub fn heartbeat(
        &mut self,
        hb: &Heartbeat,
        now: Instant,
        wall: SystemTime,
    ) -> HeartbeatOutcome {
        let observation = self.detector.observe(hb.member, hb.generation, hb.seq, now);
        self.heard_epoch(hb.epoch_seen);
        match observation {
            Observation::Alive | Observation::Recovered(_) => {
                if let Some(worker) = self
                    .ids
                    .get(&hb.member)
                    .and_then(|id| self.workers.get_mut(id))
                {
                    worker.last_heartbeat = wall;
                }
            }
            Observation::UnknownMember => self.restarted = true,
            Observation::StaleGeneration | Observation::Replayed => {}
        }
        if let Observation::Recovered(t) = observation {
            self.dirty |= t.from == Status::Down;
        }
        let counted = matches!(observation, Observation::Alive | Observation::Recovered(_));
        HeartbeatOutcome {
            observation,
            lagging: counted && self.published > 0 && hb.epoch_seen < self.published,
        }
    }

    /// The status changes silence has caused by `now`.
    pub fn evaluate(&mut self, now: Instant) -> Vec<NamedTransition> {
        let changes = self.detector.evaluate(now);
        self.dirty |= changes.iter().any(|t| t.to == Status::Down);
        changes
            .into_iter()
            .filter_map(|transition| self.named(transition))
            .collect()
    }

    fn named(&self, transition: Transition) -> Option<NamedTransition> {
        let id = self.ids.get(&transition.member)?.clone();
        Some(NamedTransition { id, transition })
    }

    /// A worker leaves (`done: false`: it starts handing its keys over,
    /// out of the ring) or has left (`done: true`: DOWN). Returns the
    /// change, if any: saying it twice changes nothing the second time.
    pub fn leave(
        &mut self,
        leave: &LeaveRequest,
        now: Instant,
    ) -> Result<Option<NamedTransition>, LeaveError> {
        let worker = self
            .workers
            .get(&leave.id)
            .ok_or_else(|| LeaveError::Unknown(leave.id.clone()))?;
        if worker.member.generation != leave.generation {
            return Err(LeaveError::Stale {
                id: leave.id.clone(),
                given: leave.generation,
                current: worker.member.generation,
            });
        }
        let number = worker.number;
        let transition = if leave.done {
            self.detector.left(number, now)
        } else {
            self.detector.leave(number, now)
        };
        // Out of the ring, or off the list of leavers: a new topology.
        self.dirty |= transition.is_some();
        Ok(transition.and_then(|t| self.named(t)))
    }

    /// Forgets the workers DOWN for `--forget-after` by `now`; returns
    /// their ids. Forgetting one that went silent takes it off the
    /// topology's `down`: a new topology, so that reads stop waiting for
    /// its copies.
    pub fn forget(&mut self, now: Instant) -> Vec<String> {
        let Some(before) = self.forget_after.and_then(|after| now.checked_sub(after)) else {
            return Vec::new();
        };
        let mut forgotten = Vec::new();
        for (number, reason) in self.detector.forget_down_since(before) {
            if let Some(id) = self.ids.remove(&number) {
                self.workers.remove(&id);
                forgotten.push(id);
                self.dirty |= reason == Reason::Silent;
            }
        }
        // Absent ones are forgotten as long after this controller heard of
        // them: when they went silent is not known here.
        let len = forgotten.len();
        self.absent.retain(|id, heard| {
            let keep = *heard > before;
            if !keep {
                forgotten.push(id.clone());
            }
            keep
        });
        self.dirty |= forgotten.len() > len;
        forgotten
    }

    /// If the topology changed (the live set, the leavers, the DOWN list):
    /// bumps the epoch and returns the topology to publish. During the
    /// grace period only a topology that adds workers to a fresh cluster
    /// is published, and only once the cluster's workers (if it had any)
    /// would have spoken: one that drops a worker could be a restarted
    /// controller that has not heard from it yet, and one of a worker that
    /// lost its copies alone would make it the only owner of every key.
    pub fn publish(&mut self, now: Instant) -> Option<Topology> {
        if !self.dirty {
            return None;
        }
        let topology = self.topology();
        if now < self.grace_until {
            let adds_only = topology.leaving.is_empty()
                && self
                    .published_ids
                    .iter()
                    .all(|id| topology.member(id).is_some());
            if self.restarted || !adds_only || now < self.fresh_after {
                return None;
            }
        }
        self.dirty = false;
        self.epoch += 1;
        self.published = self.epoch;
        self.published_ids = topology.members.iter().map(|m| m.id.clone()).collect();
        let mut fresh = Vec::new();
        for member in &topology.members {
            if let Some(worker) = self.workers.get_mut(&member.id) {
                if std::mem::take(&mut worker.fresh) {
                    fresh.push(member.id.clone());
                }
            }
        }
        Some(Topology {
            epoch: self.epoch,
            fresh,
            ..topology
        })
    }

    /// The live workers (UP and SUSPECT) at the current epoch, the
    /// LEAVING ones, and the ones DOWN because they went silent (absent
    /// ones included), sorted by id.
    pub fn topology(&self) -> Topology {
        let with = |wanted: fn(Status) -> bool| {
            self.workers
                .values()
                .filter(|w| wanted(self.status(w)))
                .map(|w| w.member.clone())
                .collect()
        };
        Topology {
            epoch: self.epoch,
            members: with(Status::is_live),
            leaving: with(|s| s == Status::Leaving),
            down: self.down(),
            fresh: Vec::new(),
        }
    }

    /// The ids of the workers DOWN for silence and the absent ones.
    fn down(&self) -> Vec<String> {
        let silent = (self.workers.values())
            .filter(|w| self.detector.reason(w.number) == Some(Reason::Silent))
            .map(|w| &w.member.id);
        let mut down: Vec<String> = silent.chain(self.absent.keys()).cloned().collect();
        down.sort_unstable();
        down
    }

    /// The id of the worker with this heartbeat number.
    pub fn id_of(&self, member: u32) -> Option<&str> {
        self.ids.get(&member).map(String::as_str)
    }

    /// Every registered worker, sorted by id.
    pub fn nodes(&self, now: Instant) -> Vec<NodeView<'_>> {
        self.workers
            .values()
            .map(|worker| NodeView {
                worker,
                status: self.status(worker),
                silent_for: self
                    .detector
                    .last_heard(worker.number)
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                reason: self.detector.reason(worker.number),
            })
            .collect()
    }

    /// How many workers have each status.
    pub fn counts(&self) -> [(Status, usize); 4] {
        let mut counts = Status::ALL.map(|s| (s, 0));
        for worker in self.workers.values() {
            let status = self.status(worker);
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
                slot.1 += 1;
            }
        }
        counts
    }

    fn status(&self, worker: &Worker) -> Status {
        self.detector.status(worker.number).unwrap_or(Status::Down)
    }
}

fn validate(reg: &Registration) -> Result<(), RegisterError> {
    let name = |field: &str, value: &str| {
        if value.is_empty() {
            Err(RegisterError::Invalid(format!(
                "\"{field}\" must not be empty"
            )))
        } else if value.len() > MAX_NAME_LEN {
            Err(RegisterError::Invalid(format!(
                "\"{field}\" is longer than {MAX_NAME_LEN} bytes"
            )))
        } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Err(RegisterError::Invalid(format!(
                "\"{field}\" must not contain spaces or control characters"
            )))
        } else {
            Ok(())
        }
    };
    name("id", &reg.id)?;
    name("host", &reg.host)?;
    if reg.peers.len() > MAX_WORKERS {
        return Err(RegisterError::Invalid(format!(
            "\"peers\" names more than {MAX_WORKERS} workers"
        )));
    }
    for peer in &reg.peers {
        name("peers", peer)?;
    }
    for (field, counter) in [("epoch", reg.epoch), ("generation", reg.generation)] {
        if counter.is_some_and(|n| n > MAX_COUNTER) {
            return Err(RegisterError::Invalid(format!(
                "\"{field}\" must be at most 2^53 ({MAX_COUNTER})"
            )));
        }
    }
    for (field, port) in [("port", reg.port), ("wire_port", reg.wire_port)] {
        if port == 0 {
            return Err(RegisterError::Invalid(format!(
                "\"{field}\" must be a port from 1 to 65535"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN_AFTER: Duration = Duration::from_secs(1);
    const GRACE: Duration = Duration::from_secs(2);

    fn reg(id: &str) -> Registration {
        Registration {
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 8001,
            wire_port: 8002,
            epoch: None,
            generation: None,
            peers: Vec::new(),
            empty: false,
        }
    }

    fn hb(r: Registered) -> Heartbeat {
        Heartbeat {
            member: r.member,
            generation: r.generation,
            seq: 1,
            epoch_seen: r.epoch,
        }
    }

    /// A worker of a cluster that ran before this controller registers
    /// again, having seen `epoch`.
    fn returning(id: &str, epoch: u64) -> Registration {
        Registration {
            epoch: Some(epoch),
            generation: Some(1),
            ..reg(id)
        }
    }

    /// A heartbeat under a number the previous controller gave, from a
    /// worker that has seen `epoch_seen`.
    fn unknown_heartbeat(epoch_seen: u64) -> Heartbeat {
        Heartbeat {
            member: 12_345,
            generation: 1,
            seq: 99,
            epoch_seen,
        }
    }

    fn ids(t: &Topology) -> Vec<&str> {
        t.members.iter().map(|m| m.id.as_str()).collect()
    }

    /// A membership whose grace period is over, with these workers registered.
    fn running(t0: Instant, workers: &[&str]) -> (Membership, Vec<Registered>) {
        let mut m = Membership::new(DOWN_AFTER, Duration::ZERO, t0);
        let regs = workers
            .iter()
            .map(|w| m.register(reg(w), t0, SystemTime::now()).unwrap())
            .collect();
        (m, regs)
    }

    #[test]
    fn registrations_join_the_topology_in_one_epoch() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker2", "worker1"]);
        assert_ne!(regs[0].member, regs[1].member);
        let topology = m.publish(t0).unwrap();
        assert_eq!(
            (topology.epoch, ids(&topology)),
            (1, vec!["worker1", "worker2"])
        );
        assert_eq!(m.publish(t0), None, "nothing changed since");
    }

    #[test]
    fn a_worker_registered_empty_is_fresh_in_the_first_topology_that_has_it_only() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker1"]);
        assert_eq!(
            m.publish(t0).unwrap().fresh,
            [""; 0],
            "worker1 came with copies"
        );
        let empty = |id: &str| Registration {
            empty: true,
            ..reg(id)
        };
        let worker2 = m.register(empty("worker2"), t0, SystemTime::now()).unwrap();
        assert_eq!(m.publish(t0).unwrap().fresh, ["worker2"]);
        // Called DOWN and back: it may hold copies by now.
        let later = t0 + DOWN_AFTER;
        m.heartbeat(&hb(regs[0]), later, SystemTime::now());
        m.evaluate(later);
        assert_eq!(ids(&m.publish(later).unwrap()), ["worker1"]);
        m.heartbeat(&hb(worker2), later, SystemTime::now());
        let back = m.publish(later).unwrap();
        assert_eq!(ids(&back), ["worker1", "worker2"]);
        assert_eq!(back.fresh, [""; 0], "back from DOWN, not registered again");
        // Started again in memory: a new incarnation, empty again.
        m.register(empty("worker2"), later, SystemTime::now())
            .unwrap();
        assert_eq!(m.publish(later).unwrap().fresh, ["worker2"]);
    }

    #[test]
    fn a_worker_going_down_bumps_the_epoch_and_leaves_the_topology() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker1", "worker2"]);
        m.publish(t0);
        let later = t0 + DOWN_AFTER;
        m.heartbeat(&hb(regs[0]), later, SystemTime::now());
        let changes = m.evaluate(later);
        assert_eq!(
            changes
                .iter()
                .map(|c| (c.id.as_str(), c.transition.to))
                .collect::<Vec<_>>(),
            [("worker2", Status::Down)]
        );
        let topology = m.publish(later).unwrap();
        assert_eq!((topology.epoch, ids(&topology)), (2, vec!["worker1"]));
        // It comes back: a new epoch with it again.
        let outcome = m.heartbeat(&hb(regs[1]), later, SystemTime::now());
        assert!(matches!(outcome.observation, Observation::Recovered(_)));
        assert_eq!(ids(&m.publish(later).unwrap()), ["worker1", "worker2"]);
    }

    #[test]
    fn suspect_workers_stay_in_the_topology_without_a_new_epoch() {
        let t0 = Instant::now();
        let (mut m, _) = running(t0, &["worker1"]);
        m.publish(t0);
        let changes = m.evaluate(t0 + DOWN_AFTER / 2);
        assert_eq!(changes[0].transition.to, Status::Suspect);
        assert_eq!(m.publish(t0 + DOWN_AFTER / 2), None);
        assert_eq!(ids(&m.topology()), ["worker1"]);
    }

    #[test]
    fn a_re_registration_is_a_new_generation_and_old_heartbeats_are_ignored() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker1"]);
        m.publish(t0);
        let again = m.register(reg("worker1"), t0, SystemTime::now()).unwrap();
        assert_eq!(
            (again.member, again.generation),
            (regs[0].member, regs[0].generation + 1)
        );
        let outcome = m.heartbeat(&hb(regs[0]), t0, SystemTime::now());
        assert_eq!(outcome.observation, Observation::StaleGeneration);
        assert_eq!(
            m.publish(t0).unwrap().members[0].generation,
            again.generation
        );
    }

    #[test]
    fn a_restarted_controller_keeps_generations_continues_epochs_and_waits_out_its_grace() {
        let t0 = Instant::now();
        let mut m = Membership::new(DOWN_AFTER, GRACE, t0);
        let r = m
            .register(
                Registration {
                    epoch: Some(41),
                    generation: Some(7),
                    ..reg("worker1")
                },
                t0,
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!((r.generation, r.epoch), (7, 41));
        // Silent through the grace period: nobody DOWN, nothing published.
        assert!(m
            .evaluate(t0 + DOWN_AFTER)
            .iter()
            .all(|c| c.transition.to != Status::Down));
        assert_eq!(m.publish(t0 + GRACE / 2), None);
        m.heartbeat(&hb(r), t0 + GRACE, SystemTime::now());
        let topology = m.publish(t0 + GRACE).unwrap();
        assert_eq!((topology.epoch, topology.members[0].generation), (42, 7));
    }

    /// A restarted controller learns from the returning workers which
    /// workers the cluster had: those that never register with it are
    /// DOWN (their copies may be the only ones of some keys), as the
    /// controller before it would have said, until they register or are
    /// forgotten. Workers named after its grace period are not taken up.
    #[test]
    fn a_restarted_controller_lists_the_workers_the_returning_ones_name_as_down_until_forgotten() {
        let t0 = Instant::now();
        let forget_after = Duration::from_secs(60);
        let mut m = Membership::new(DOWN_AFTER, GRACE, t0).forgetting_after(forget_after);
        let naming = |id: &str, peers: &[&str]| Registration {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..returning(id, 7)
        };
        let wall = SystemTime::now();
        let r1 = (m.register(
            naming("worker1", &["worker2", "worker3", "worker4"]),
            t0,
            wall,
        ))
        .unwrap();
        let r2 = (m.register(
            naming("worker2", &["worker1", "worker3", "worker4"]),
            t0,
            wall,
        ))
        .unwrap();
        assert_eq!(m.publish(t0), None, "held through the grace period");
        let after = t0 + GRACE;
        for r in [r1, r2] {
            m.heartbeat(&hb(r), after, wall);
        }
        let topology = m.publish(after).unwrap();
        assert_eq!(
            (ids(&topology), &topology.down[..]),
            (
                vec!["worker1", "worker2"],
                &["worker3".to_string(), "worker4".to_string()][..]
            )
        );
        // Named after the grace period: not taken up.
        m.register(naming("worker5", &["worker6"]), after, wall)
            .unwrap();
        // worker3 comes back: live, no longer DOWN.
        m.register(returning("worker3", 7), after, wall).unwrap();
        let topology = m.publish(after).unwrap();
        assert_eq!(
            (ids(&topology), &topology.down[..]),
            (
                vec!["worker1", "worker2", "worker3", "worker5"],
                &["worker4".to_string()][..]
            )
        );
        // worker4 never does: forgotten, a new topology without it.
        assert!(m
            .forget(t0 + forget_after - Duration::from_millis(1))
            .is_empty());
        assert_eq!(m.forget(t0 + forget_after), ["worker4"]);
        let topology = m.publish(t0 + forget_after).unwrap();
        assert!(topology.down.is_empty(), "{topology:?}");
    }

    #[test]
    fn a_fresh_controller_publishes_additions_soon_and_holds_the_rest_for_its_grace() {
        let t0 = Instant::now();
        let mut m = Membership::new(DOWN_AFTER, GRACE, t0);
        let r1 = m.register(reg("worker1"), t0, SystemTime::now()).unwrap();
        assert_eq!(m.publish(t0), None);
        let soon = t0 + DOWN_AFTER / 2;
        assert_eq!(ids(&m.publish(soon).unwrap()), ["worker1"]);
        m.register(reg("worker2"), soon, SystemTime::now()).unwrap();
        assert_eq!(ids(&m.publish(soon).unwrap()), ["worker1", "worker2"]);
        // A leave drops a worker: held until the grace ends.
        let leave = LeaveRequest {
            id: "worker1".into(),
            generation: r1.generation,
            done: false,
        };
        m.leave(&leave, t0).unwrap();
        assert_eq!(m.publish(t0 + GRACE / 2), None);
        let topology = m.publish(t0 + GRACE).unwrap();
        assert_eq!((ids(&topology), topology.epoch), (vec!["worker2"], 3));
        assert_eq!(topology.leaving[0].id, "worker1");
    }

    /// Found by the simulator (`sim/`): the controller restarted while a
    /// worker that had lost its copies restarted too. That worker, having
    /// seen no topology, registered first and without an epoch, as in a
    /// new cluster, and the controller published a ring of it alone at
    /// once: it answered reads as the only owner of every key, from an
    /// empty store ("not found" for acknowledged writes) until the grace
    /// ended.
    #[test]
    fn a_restarted_controller_does_not_publish_a_fresh_worker_alone_before_the_others_speak() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new(DOWN_AFTER, GRACE, t0);
        m.register(reg("fresh"), t0, SystemTime::now()).unwrap();
        assert_eq!(
            m.publish(t0 + ms(10)),
            None,
            "published before the others could speak"
        );
        // A worker of the cluster heartbeats under the number the previous
        // controller gave it: the cluster ran before this controller.
        m.heartbeat(&unknown_heartbeat(4), t0 + ms(100), SystemTime::now());
        assert_eq!(m.publish(t0 + DOWN_AFTER), None, "published in the grace");
        m.register(returning("old", 4), t0 + ms(150), SystemTime::now())
            .unwrap();
        let topology = m.publish(t0 + GRACE).unwrap();
        assert_eq!((ids(&topology), topology.epoch), (vec!["fresh", "old"], 5));
    }

    /// A worker that alone heard the previous controller's last epochs
    /// says so in its heartbeats before it registers again: the restarted
    /// controller numbers above it, or that worker would keep its own ring
    /// under the epoch number of the new one.
    #[test]
    fn a_restarted_controller_numbers_above_the_epochs_heartbeats_show() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new(DOWN_AFTER, GRACE, t0);
        m.register(returning("old", 4), t0, SystemTime::now())
            .unwrap();
        let ahead = unknown_heartbeat(9);
        m.heartbeat(&ahead, t0 + ms(100), SystemTime::now());
        let topology = m.publish(t0 + GRACE).unwrap();
        assert_eq!((ids(&topology), topology.epoch), (vec!["old"], 10));
        // An epoch no worker can hold is not believed.
        let absurd = Heartbeat {
            epoch_seen: u64::MAX,
            ..ahead
        };
        m.heartbeat(&absurd, t0 + GRACE, SystemTime::now());
        assert_eq!(m.epoch(), 10);
    }

    #[test]
    fn a_heartbeat_showing_an_epoch_above_the_published_one_gets_a_newer_topology() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker1", "worker2"]);
        assert_eq!(m.publish(t0).map(|t| t.epoch), Some(1));
        m.heartbeat(&hb(regs[0]), t0, SystemTime::now());
        assert_eq!(m.publish(t0), None, "nothing changed");
        let ahead = Heartbeat {
            epoch_seen: 7,
            seq: 2,
            ..hb(regs[1])
        };
        m.heartbeat(&ahead, t0, SystemTime::now());
        let topology = m.publish(t0).expect("published above the epoch heard");
        assert_eq!(
            (ids(&topology), topology.epoch),
            (vec!["worker1", "worker2"], 8)
        );
    }

    /// Epochs and generations above 2^53 are refused (with the other
    /// invalid registrations, below); counting on from 2^53 never overflows.
    #[test]
    fn counting_on_from_the_highest_epoch_and_generation_never_overflows() {
        let t0 = Instant::now();
        let mut m = Membership::new(DOWN_AFTER, Duration::ZERO, t0);
        let highest = Registration {
            epoch: Some(MAX_COUNTER),
            generation: Some(MAX_COUNTER),
            ..reg("w")
        };
        m.register(highest.clone(), t0, SystemTime::now()).unwrap();
        let again = m.register(highest, t0, SystemTime::now()).unwrap();
        assert_eq!(again.generation, MAX_COUNTER + 1);
        assert_eq!(m.publish(t0).map(|t| t.epoch), Some(MAX_COUNTER + 1));
    }

    #[test]
    fn a_leave_takes_the_worker_out_of_the_ring_and_done_makes_it_down_for_a_reason() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker1", "worker2"]);
        m.publish(t0);
        let leave = |done| LeaveRequest {
            id: "worker1".into(),
            generation: regs[0].generation,
            done,
        };
        // Another incarnation's leave (an old pod's, a replay) and an
        // unknown worker's change nothing.
        let stale = LeaveRequest {
            generation: regs[0].generation + 1,
            ..leave(false)
        };
        assert!(matches!(m.leave(&stale, t0), Err(LeaveError::Stale { .. })));
        let unknown = LeaveRequest {
            id: "nobody".into(),
            ..leave(false)
        };
        assert_eq!(
            m.leave(&unknown, t0),
            Err(LeaveError::Unknown("nobody".into()))
        );
        assert_eq!(m.publish(t0), None);

        let change = m.leave(&leave(false), t0).unwrap().unwrap();
        assert_eq!(
            (change.id.as_str(), change.transition.to),
            ("worker1", Status::Leaving)
        );
        let topology = m.publish(t0).unwrap();
        assert_eq!(ids(&topology), ["worker2"]);
        assert_eq!(topology.leaving.len(), 1);
        assert_eq!(m.leave(&leave(false), t0).unwrap(), None, "said twice");
        assert_eq!(m.publish(t0), None);
        // Heartbeats keep it LEAVING, not UP.
        m.heartbeat(&hb(regs[0]), t0, SystemTime::now());
        assert_eq!(m.nodes(t0)[0].status, Status::Leaving);

        m.leave(&leave(true), t0).unwrap().unwrap();
        let node = &m.nodes(t0)[0];
        assert_eq!(
            (node.status, node.reason),
            (Status::Down, Some(Reason::Left))
        );
        let topology = m.publish(t0).unwrap();
        assert!(topology.leaving.is_empty(), "no longer a leaver to ask");
        assert_eq!(m.counts()[3], (Status::Down, 1));
    }

    /// The topology names the workers DOWN because they went silent (their
    /// copies may be the only ones of some keys), not those that left
    /// (they handed theirs over). Forgetting a silent one publishes a
    /// topology without it; forgetting one that left publishes nothing.
    #[test]
    fn the_topology_names_the_silent_down_workers_until_they_are_forgotten() {
        let t0 = Instant::now();
        let forget_after = Duration::from_secs(600);
        let (m, regs) = running(t0, &["worker1", "worker2", "worker3"]);
        let mut m = m.forgetting_after(forget_after);
        m.publish(t0).unwrap();
        for done in [false, true] {
            let leave = LeaveRequest {
                id: "worker1".into(),
                generation: regs[0].generation,
                done,
            };
            m.leave(&leave, t0).unwrap();
        }
        assert!(m.publish(t0).unwrap().down.is_empty(), "worker1 left");
        // worker2 falls silent; worker3 speaks on.
        let mut now = t0;
        let mut forgotten = Vec::new();
        while now < t0 + DOWN_AFTER + forget_after {
            now += Duration::from_millis(100);
            let seq = now.duration_since(t0).as_millis() as u64;
            m.heartbeat(&Heartbeat { seq, ..hb(regs[2]) }, now, SystemTime::now());
            m.evaluate(now);
            forgotten.extend(m.forget(now));
            let published = m.publish(now);
            if now == t0 + DOWN_AFTER {
                let topology = published.expect("worker2 DOWN: a new topology");
                assert_eq!(
                    (ids(&topology), &topology.down[..]),
                    (vec!["worker3"], &["worker2".to_string()][..])
                );
            } else if forgotten == ["worker1"] && now == t0 + forget_after {
                assert_eq!(published, None, "worker1 left: it was never in `down`");
            } else if forgotten.len() == 2 {
                let topology = published.expect("worker2 forgotten: a new topology");
                assert_eq!((ids(&topology), topology.down.len()), (vec!["worker3"], 0));
                return;
            } else {
                assert_eq!(published, None, "at {:?}", now - t0);
            }
        }
        panic!("worker2 was not forgotten: {forgotten:?}");
    }

    #[test]
    fn down_workers_are_forgotten_after_the_forget_time_and_may_register_again() {
        let t0 = Instant::now();
        let forget_after = Duration::from_secs(600);
        let mut m = Membership::new(DOWN_AFTER, Duration::ZERO, t0).forgetting_after(forget_after);
        for id in ["worker1", "worker2"] {
            m.register(reg(id), t0, SystemTime::now()).unwrap();
        }
        let r2 = m.register(reg("worker2"), t0, SystemTime::now()).unwrap();
        let mut now = t0;
        while now < t0 + forget_after + 2 * DOWN_AFTER {
            now += Duration::from_millis(100);
            m.heartbeat(
                &Heartbeat {
                    seq: now.duration_since(t0).as_millis() as u64,
                    ..hb(r2)
                },
                now,
                SystemTime::now(),
            );
            m.evaluate(now);
            let forgotten = m.forget(now);
            if !forgotten.is_empty() {
                assert_eq!(forgotten, ["worker1"]);
                assert!(now >= t0 + DOWN_AFTER + forget_after);
                break;
            }
        }
        assert_eq!(
            m.nodes(now)
                .iter()
                .map(|n| n.worker.member.id.as_str())
                .collect::<Vec<_>>(),
            ["worker2"]
        );
        // Zero means never.
        let mut never =
            Membership::new(DOWN_AFTER, Duration::ZERO, t0).forgetting_after(Duration::ZERO);
        never
            .register(reg("worker1"), t0, SystemTime::now())
            .unwrap();
        never.evaluate(t0 + DOWN_AFTER);
        assert!(never.forget(t0 + 100 * forget_after).is_empty());
        // Registered again, a forgotten worker is a new one (its number
        // comes from its id, as before).
        let again = m.register(reg("worker1"), now, SystemTime::now()).unwrap();
        assert_eq!(again.generation, 1);
    }

    /// Found by the simulator (`sim/`): after a controller restart, a
    /// worker that had not yet heard of it heartbeated under the number the
    /// old controller gave it, which the new one had given to another
    /// worker of the same generation: that worker's own heartbeats then
    /// looked like replays and it went DOWN though it never fell silent.
    #[test]
    fn a_heartbeat_for_an_earlier_controller_never_counts_for_another_worker() {
        let t0 = Instant::now();
        let (_, old) = running(t0, &["worker-a", "worker-b"]);
        let mut restarted = Membership::new(DOWN_AFTER, Duration::ZERO, t0);
        let b = restarted
            .register(
                Registration {
                    generation: Some(old[1].generation),
                    epoch: Some(1),
                    ..reg("worker-b")
                },
                t0,
                SystemTime::now(),
            )
            .unwrap();
        let stale = Heartbeat {
            seq: 1_000,
            ..hb(old[0])
        };
        restarted.heartbeat(&stale, t0, SystemTime::now());
        for seq in 1..=10 {
            let at = t0 + Duration::from_millis(200 * seq);
            let beat = Heartbeat { seq, ..hb(b) };
            restarted.heartbeat(&beat, at, SystemTime::now());
            restarted.evaluate(at);
        }
        let statuses: Vec<_> = restarted
            .nodes(t0 + Duration::from_secs(2))
            .iter()
            .map(|n| (n.worker.member.id.clone(), n.status))
            .collect();
        assert_eq!(statuses, [("worker-b".to_string(), Status::Up)]);
    }

    #[test]
    fn a_worker_behind_the_published_epoch_is_lagging() {
        let t0 = Instant::now();
        let (mut m, regs) = running(t0, &["worker1"]);
        m.publish(t0);
        assert!(m.heartbeat(&hb(regs[0]), t0, SystemTime::now()).lagging);
        let current = Heartbeat {
            epoch_seen: 1,
            seq: 2,
            ..hb(regs[0])
        };
        let outcome = m.heartbeat(&current, t0, SystemTime::now());
        assert_eq!(outcome.observation, Observation::Alive);
        assert!(!outcome.lagging);
    }

    #[test]
    fn invalid_registrations_are_refused_and_change_nothing() {
        let t0 = Instant::now();
        let (mut m, _) = running(t0, &[]);
        for (bad, says) in [
            (reg(""), "\"id\" must not be empty"),
            (
                Registration {
                    host: String::new(),
                    ..reg("w")
                },
                "\"host\" must not be empty",
            ),
            (
                Registration {
                    port: 0,
                    ..reg("w")
                },
                "\"port\" must be",
            ),
            (
                Registration {
                    wire_port: 0,
                    ..reg("w")
                },
                "\"wire_port\" must be",
            ),
            (reg(&"x".repeat(254)), "longer than 253"),
            (reg("a b"), "spaces"),
            (returning("w", u64::MAX), "\"epoch\" must be at most 2^53"),
            (
                Registration {
                    generation: Some(MAX_COUNTER + 1),
                    ..reg("w")
                },
                "\"generation\" must be at most 2^53",
            ),
            (
                Registration {
                    peers: vec!["w2".into(), "a b".into()],
                    ..returning("w", 1)
                },
                "\"peers\" must not contain spaces",
            ),
            (
                Registration {
                    peers: vec!["w2".into(); MAX_WORKERS + 1],
                    ..returning("w", 1)
                },
                "\"peers\" names more than 65536",
            ),
        ] {
            let err = m.register(bad, t0, SystemTime::now()).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
        assert!(m.nodes(t0).is_empty());
        assert_eq!((m.epoch(), m.publish(t0)), (0, None));
    }
}
