//! A worker's standing with the controller, as a pure state machine.
//!
//! It decides what the worker says to the controller and when: the
//! registration (and a new one after the controller restarted, or this
//! worker's address moved, or the controller forgot it), every heartbeat,
//! which acks count, when silence means the controller should be looked up
//! afresh, and when to say that the worker leaves. It reads no clock and
//! no socket: the heartbeat thread and the registration task (and the
//! simulator, `kv-sim`) feed it what happened and carry out what it says,
//! so its rules are tested on a fake clock, as the controller's detector is.
//!
//! With a cluster secret, an ack counts only if its tag is right and it
//! answers a heartbeat sent since the last ack counted: a forged or
//! replayed ack cannot make the worker register again.

use kv_wire::heartbeat::{Heartbeat, HeartbeatAck};
use kv_wire::register::{LeaveRequest, RegisterReply, RegisterRequest, MAX_PEERS_BYTES};
use kv_wire::{ClusterSecret, Topology};
use std::time::{Duration, Instant};

/// Intervals without an ack before the controller is looked up afresh.
pub const SILENT_INTERVALS: u32 = 3;

/// The shortest heartbeat interval followed, whatever the controller says.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The current registration and the host it advertised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The controller's answer.
    pub reply: RegisterReply,
    /// The host this worker registered as.
    pub host: String,
}

/// What a received ack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Counted: the controller hears this worker.
    Counted,
    /// Counted, and it comes from another controller incarnation: the
    /// controller restarted and forgot this worker, which must register
    /// again (the registration task is to be woken).
    Restarted,
    /// Not counted: it does not parse or its tag is wrong.
    Wrong,
    /// Not counted: well sealed, but it answers no heartbeat sent since the
    /// last ack counted (a replay, or an ack overtaken by a later one).
    Replayed,
    /// Not counted: this worker is not registered yet.
    Unregistered,
}

/// A worker's standing with the controller.
#[derive(Debug)]
pub struct Presence {
    /// What this worker registers as; `epoch`, `generation` and (when the
    /// host is learned from the route) `host` are filled in per attempt.
    me: RegisterRequest,
    current: Option<Current>,
    /// A new registration is wanted and no attempt has begun since.
    reregister: bool,
    /// An attempt to register is under way.
    registering: bool,
    /// The last heartbeat's sequence number: one sequence for the whole
    /// process, across registrations, so the controller's replay check
    /// holds across them.
    seq: u64,
    /// The highest heartbeat an authenticated ack answered.
    acked_seq: u64,
    last_ack: Instant,
    leaving: bool,
    /// The generation whose leave the controller took.
    told_leave: Option<u64>,
}

impl Presence {
    /// A worker that has not registered yet, registering as `me`.
    pub fn new(me: RegisterRequest, now: Instant) -> Presence {
        Presence {
            me,
            current: None,
            reregister: false,
            registering: false,
            seq: 0,
            acked_seq: 0,
            last_ack: now,
            leaving: false,
            told_leave: None,
        }
    }

    /// The registration in force, if any.
    pub fn current(&self) -> Option<&Current> {
        self.current.as_ref()
    }

    /// The generation of the registration in force.
    pub fn generation(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.reply.generation)
    }

    /// Whether the worker must register (again).
    pub fn wants_registration(&self) -> bool {
        self.current.is_none() || self.reregister
    }

    /// The request for one attempt to register: of the last topology seen,
    /// its epoch (a restarted controller numbers on above it) and the other
    /// workers it named (it lists those that never register as DOWN), and
    /// the generation held (it keeps it, so the restart moves no data).
    /// `host` replaces the advertised host when it is learned from the route;
    /// `empty` says the store holds no copy (the controller then names the
    /// worker fresh in its next topology).
    pub fn registration(
        &mut self,
        host: Option<String>,
        seen: &Topology,
        empty: bool,
    ) -> RegisterRequest {
        if let Some(host) = host {
            self.me.host = host;
        }
        self.me.epoch = (seen.epoch > 0).then_some(seen.epoch);
        let mut budget = MAX_PEERS_BYTES;
        self.me.peers = (seen.named_ids())
            .filter(|id| *id != self.me.id)
            .take_while(|id| {
                // An id in JSON costs its bytes, two quotes and a comma.
                budget = budget.saturating_sub(id.len() + 3);
                budget > 0
            })
            .map(str::to_owned)
            .collect();
        self.me.generation = self.generation();
        self.me.empty = empty;
        self.reregister = false;
        self.registering = true;
        self.me.clone()
    }

    /// The controller took a registration: heartbeats follow its answer,
    /// and a leaving worker says so again (this registration may be with a
    /// controller that never heard it).
    pub fn registered(&mut self, reply: RegisterReply, host: String, now: Instant) {
        self.current = Some(Current { reply, host });
        self.registering = false;
        self.told_leave = None;
        self.last_ack = now;
    }

    /// Asks for a new registration unless one is asked or under way.
    fn ask_to_register(&mut self) -> bool {
        if self.reregister || self.registering {
            return false;
        }
        self.reregister = true;
        true
    }

    /// How often to beat and where (the controller's heartbeat port), once
    /// registered.
    pub fn beat_settings(&self) -> Option<(Duration, u16)> {
        self.current.as_ref().map(|c| {
            let every = Duration::from_millis(c.reply.heartbeat_interval_ms).max(MIN_INTERVAL);
            (every, c.reply.heartbeat_port)
        })
    }

    /// The next heartbeat, once registered.
    pub fn heartbeat(&mut self, epoch_seen: u64) -> Option<Heartbeat> {
        let reply = &self.current.as_ref()?.reply;
        self.seq += 1;
        Some(Heartbeat {
            member: reply.member,
            generation: reply.generation,
            seq: self.seq,
            epoch_seen,
        })
    }

    /// A datagram from the controller's heartbeat port, at `now`.
    pub fn ack(&mut self, datagram: &[u8], secret: Option<&ClusterSecret>, now: Instant) -> Ack {
        let Some(reply) = self.current.as_ref().map(|c| &c.reply) else {
            return Ack::Unregistered;
        };
        let ack = match HeartbeatAck::open(datagram, secret, reply.member, reply.generation) {
            Ok((ack, None)) => ack,
            Ok((ack, Some(answered))) if answered > self.acked_seq && answered <= self.seq => {
                self.acked_seq = answered;
                ack
            }
            Ok(_) => return Ack::Replayed,
            Err(_) => return Ack::Wrong,
        };
        self.last_ack = now;
        if ack.incarnation != reply.incarnation && self.ask_to_register() {
            Ack::Restarted
        } else {
            Ack::Counted
        }
    }

    /// Whether, at `now`, the controller has been silent for
    /// [`SILENT_INTERVALS`] beats: its address may have moved, so it is
    /// to be resolved again on a fresh socket (leaving stale conntrack
    /// state behind). The silence counts afresh from here.
    pub fn silent(&mut self, now: Instant) -> bool {
        let Some((every, _)) = self.beat_settings() else {
            return false;
        };
        if now.saturating_duration_since(self.last_ack) > every * SILENT_INTERVALS {
            self.last_ack = now;
            true
        } else {
            false
        }
    }

    /// A fresh socket to the controller routes from `local`: when that is
    /// not the host this worker registered as (a container reattached to
    /// its network, say), it registers again so peers dial the new one.
    /// True when that asks for a registration (wake the registration task).
    pub fn route_from(&mut self, local: &str) -> bool {
        let moved = self.current.as_ref().is_some_and(|c| c.host != local);
        moved && self.ask_to_register()
    }

    /// The worker starts to leave (SIGTERM).
    pub fn leave(&mut self) {
        self.leaving = true;
    }

    /// Whether it leaves.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// The leave to tell the controller: while leaving, once per
    /// registration, after the registration is in force.
    pub fn leave_to_say(&self) -> Option<LeaveRequest> {
        let generation = self.generation()?;
        let due = self.leaving && !self.wants_registration() && self.told_leave != Some(generation);
        due.then(|| LeaveRequest {
            id: self.me.id.clone(),
            generation,
            done: false,
        })
    }

    /// The controller took the leave of `generation`.
    pub fn leave_taken(&mut self, generation: u64) {
        self.told_leave = Some(generation);
    }

    /// The controller does not know this incarnation (it restarted, or
    /// already counts it gone): register again, then say it again.
    pub fn unknown(&mut self) {
        self.reregister = true;
    }

    /// The notice that this worker left and exits, once registered.
    pub fn left(&self) -> Option<LeaveRequest> {
        Some(LeaveRequest {
            id: self.me.id.clone(),
            generation: self.generation()?,
            done: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_millis(200);

    fn me() -> RegisterRequest {
        RegisterRequest {
            id: "worker1".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            wire_port: 9090,
            epoch: None,
            generation: None,
            peers: Vec::new(),
            empty: false,
        }
    }

    /// A topology at `epoch` naming no workers.
    fn seen(epoch: u64) -> Topology {
        Topology {
            epoch,
            ..Topology::default()
        }
    }

    fn member(id: &str) -> kv_wire::Member {
        kv_wire::Member {
            id: id.into(),
            host: "10.0.0.2".into(),
            port: 8080,
            wire_port: 9090,
            generation: 1,
        }
    }

    fn reply(generation: u64, incarnation: u64) -> RegisterReply {
        RegisterReply {
            id: "worker1".into(),
            member: 7,
            generation,
            epoch: 3,
            heartbeat_port: 8001,
            heartbeat_interval_ms: EVERY.as_millis() as u64,
            incarnation,
        }
    }

    fn registered(t0: Instant) -> Presence {
        let mut p = Presence::new(me(), t0);
        assert!(p.wants_registration());
        assert_eq!(p.heartbeat(0), None, "no heartbeat before registering");
        let request = p.registration(None, &seen(0), false);
        assert_eq!((request.epoch, request.generation), (None, None));
        p.registered(reply(5, 100), request.host, t0);
        assert!(!p.wants_registration());
        p
    }

    fn ack(incarnation: u64) -> Vec<u8> {
        HeartbeatAck {
            epoch: 3,
            incarnation,
        }
        .encode()
    }

    fn sealed_ack(secret: &ClusterSecret, hb: &Heartbeat, incarnation: u64) -> Vec<u8> {
        HeartbeatAck {
            epoch: 3,
            incarnation,
        }
        .seal(hb, Some(secret))
    }

    use kv_wire::heartbeat::Datagram;

    #[test]
    fn heartbeats_name_the_registration_and_number_on_across_registrations() {
        let t0 = Instant::now();
        let mut p = registered(t0);
        assert_eq!(p.beat_settings(), Some((EVERY, 8001)));
        let first = p.heartbeat(4).unwrap();
        assert_eq!(
            (first.member, first.generation, first.seq, first.epoch_seen),
            (7, 5, 1, 4)
        );
        // A new registration keeps the generation, and says the epoch seen
        // and the other workers that topology named.
        p.unknown();
        let topology = Topology {
            epoch: 4,
            members: vec![member("worker1"), member("worker2")],
            leaving: vec![member("worker3")],
            down: vec!["worker4".into()],
            fresh: Vec::new(),
        };
        let again = p.registration(None, &topology, false);
        assert_eq!((again.epoch, again.generation), (Some(4), Some(5)));
        assert_eq!(again.peers, ["worker2", "worker3", "worker4"]);
        // Ten thousand workers with long names: as many as fit the budget.
        p.unknown();
        let many = Topology {
            epoch: 5,
            members: (0..10_000)
                .map(|i| member(&format!("kv-worker-{i:05}-{}", "x".repeat(40))))
                .collect(),
            ..Topology::default()
        };
        let capped = p.registration(None, &many, false);
        let bytes: usize = capped.peers.iter().map(|id| id.len() + 3).sum();
        assert!(
            bytes <= MAX_PEERS_BYTES && bytes + 60 > MAX_PEERS_BYTES,
            "{bytes}"
        );
        let body = serde_json::to_vec(&capped).unwrap();
        assert!(body.len() < 64 * 1024, "{}", body.len());
        p.registered(reply(5, 101), again.host, t0);
        assert_eq!(p.heartbeat(4).unwrap().seq, 2);
    }

    #[test]
    fn an_ack_from_a_new_controller_incarnation_asks_for_one_registration() {
        let t0 = Instant::now();
        let mut p = registered(t0);
        p.heartbeat(0);
        assert_eq!(p.ack(&ack(100), None, t0), Ack::Counted);
        assert!(!p.wants_registration());
        assert_eq!(p.ack(&ack(200), None, t0), Ack::Restarted);
        assert!(p.wants_registration());
        // More acks of the new controller ask nothing more...
        assert_eq!(p.ack(&ack(200), None, t0), Ack::Counted);
        // ...nor while the registration is under way.
        let request = p.registration(None, &seen(3), false);
        assert_eq!(p.ack(&ack(200), None, t0), Ack::Counted);
        assert!(!p.wants_registration());
        p.registered(reply(5, 200), request.host, t0);
        assert_eq!(p.ack(&ack(200), None, t0), Ack::Counted);
        assert!(!p.wants_registration());
        // A registration that reached the old controller just before it
        // went: the next ack asks again.
        assert_eq!(p.ack(&ack(300), None, t0), Ack::Restarted);
    }

    #[test]
    fn garbage_and_acks_before_registering_count_for_nothing() {
        let t0 = Instant::now();
        let mut p = Presence::new(me(), t0);
        assert_eq!(p.ack(&ack(1), None, t0), Ack::Unregistered);
        let mut p = registered(t0);
        assert_eq!(p.ack(b"not an ack", None, t0), Ack::Wrong);
        // Garbage does not reset the silence.
        assert!(p.silent(t0 + EVERY * 4));
    }

    #[test]
    fn with_a_secret_only_fresh_well_sealed_acks_count() {
        let secret = ClusterSecret::new("0123456789abcdef".as_bytes()).unwrap();
        let other = ClusterSecret::new("fedcba9876543210".as_bytes()).unwrap();
        let t0 = Instant::now();
        let mut p = registered(t0);
        let hb1 = p.heartbeat(0).unwrap();
        assert_eq!(p.ack(&ack(100), Some(&secret), t0), Ack::Wrong, "unsealed");
        assert_eq!(
            p.ack(&sealed_ack(&other, &hb1, 999), Some(&secret), t0),
            Ack::Wrong,
            "another secret"
        );
        let answer1 = sealed_ack(&secret, &hb1, 100);
        assert_eq!(p.ack(&answer1, Some(&secret), t0), Ack::Counted);
        assert_eq!(
            p.ack(&answer1, Some(&secret), t0),
            Ack::Replayed,
            "the same ack again"
        );
        // A recorded ack from another incarnation cannot make it register.
        let hb2 = p.heartbeat(0).unwrap();
        let hb3 = p.heartbeat(0).unwrap();
        assert_eq!(
            p.ack(&sealed_ack(&secret, &hb3, 100), Some(&secret), t0),
            Ack::Counted
        );
        assert_eq!(
            p.ack(&sealed_ack(&secret, &hb2, 200), Some(&secret), t0),
            Ack::Replayed,
            "overtaken by a later one"
        );
        assert!(!p.wants_registration());
        // An ack for a heartbeat not sent yet is not fresh either.
        let future = Heartbeat { seq: 10, ..hb3 };
        assert_eq!(
            p.ack(&sealed_ack(&secret, &future, 200), Some(&secret), t0),
            Ack::Replayed
        );
        let hb4 = p.heartbeat(0).unwrap();
        assert_eq!(
            p.ack(&sealed_ack(&secret, &hb4, 200), Some(&secret), t0),
            Ack::Restarted
        );
    }

    #[test]
    fn silence_for_three_intervals_means_look_the_controller_up_again() {
        let t0 = Instant::now();
        let mut p = Presence::new(me(), t0);
        assert!(
            !p.silent(t0 + EVERY * 100),
            "nothing to miss before registering"
        );
        let mut p = registered(t0);
        assert!(!p.silent(t0 + EVERY * 3));
        p.heartbeat(0);
        assert_eq!(p.ack(&ack(100), None, t0 + EVERY * 2), Ack::Counted);
        assert!(!p.silent(t0 + EVERY * 5));
        assert!(p.silent(t0 + EVERY * 5 + Duration::from_millis(1)));
        // Counted afresh from there.
        assert!(!p.silent(t0 + EVERY * 7));
        assert!(p.silent(t0 + EVERY * 9));
    }

    #[test]
    fn a_new_route_asks_for_a_registration_with_the_new_host() {
        let t0 = Instant::now();
        let mut p = Presence::new(me(), t0);
        assert!(
            !p.route_from("10.0.0.9"),
            "nothing to move before registering"
        );
        let mut p = registered(t0);
        assert!(!p.route_from("10.0.0.1"));
        assert!(p.route_from("10.0.0.9"));
        assert!(!p.route_from("10.0.0.9"), "asked once");
        let request = p.registration(Some("10.0.0.9".into()), &seen(3), false);
        assert_eq!(request.host, "10.0.0.9");
        p.registered(reply(5, 100), request.host, t0);
        assert!(!p.route_from("10.0.0.9"));
    }

    #[test]
    fn a_leaving_worker_says_so_once_per_registration() {
        let t0 = Instant::now();
        let mut p = Presence::new(me(), t0);
        p.leave();
        assert!(p.is_leaving());
        assert_eq!(p.leave_to_say(), None, "not registered yet");
        assert_eq!(p.left(), None);
        let request = p.registration(None, &seen(0), false);
        p.registered(reply(5, 100), request.host, t0);
        let leave = p.leave_to_say().unwrap();
        assert_eq!(
            (leave.id.as_str(), leave.generation, leave.done),
            ("worker1", 5, false)
        );
        p.leave_taken(5);
        assert_eq!(p.leave_to_say(), None);
        // The controller restarted: register again first, then say it again.
        p.heartbeat(0);
        assert_eq!(p.ack(&ack(200), None, t0), Ack::Restarted);
        assert_eq!(p.leave_to_say(), None);
        let request = p.registration(None, &seen(3), false);
        p.registered(reply(5, 200), request.host, t0);
        assert_eq!(p.leave_to_say().map(|l| l.generation), Some(5));
        // A controller that does not know this incarnation.
        p.unknown();
        assert_eq!(p.leave_to_say(), None);
        assert!(p.wants_registration());
        let request = p.registration(None, &seen(3), false);
        p.registered(reply(6, 200), request.host, t0);
        assert_eq!(p.leave_to_say().map(|l| l.generation), Some(6));
        assert_eq!(p.left().map(|l| (l.generation, l.done)), Some((6, true)));
    }

    #[test]
    fn a_worker_that_is_not_leaving_says_nothing() {
        let p = registered(Instant::now());
        assert_eq!(p.leave_to_say(), None);
        assert!(!p.is_leaving());
    }
}
