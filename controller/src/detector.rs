//! The failure detector: a pure state machine over heartbeat arrivals.
//!
//! It never reads a clock or a socket: callers feed it heartbeats with
//! [`Detector::observe`] and ask [`Detector::evaluate`] what changed at `now`,
//! so every timing rule is tested instantly on a fake clock.
//!
//! A worker is UP while heard from recently, SUSPECT after half of
//! `down_after` of silence (shown, but still owning keys) and DOWN after all
//! of it. Any heartbeat of its current generation brings it back UP. A
//! heartbeat from an older generation (a replaced pod's last words) is
//! ignored. After a (re)start the detector declares nobody DOWN until its
//! grace period ends, giving workers time to register again.
//!
//! A worker that announces it leaves is LEAVING (out of the ring, still
//! heard from while it hands its keys over) until it says it is done or
//! goes silent; either way it ends DOWN, and a heartbeat never brings a
//! worker that left back into the ring — only a new registration does.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

pub use kv_wire::nodes::Reason;
pub use kv_wire::register::Status;

/// Why a worker changed status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A heartbeat arrived.
    Heartbeat,
    /// No heartbeat for this long.
    Silent(Duration),
    /// The worker said it leaves.
    Leave,
    /// The worker said it is done leaving.
    Left,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Heartbeat => f.write_str("heartbeat received"),
            Why::Silent(d) => write!(f, "no heartbeat for {} ms", d.as_millis()),
            Why::Leave => f.write_str("it is leaving"),
            Why::Left => f.write_str("it left"),
        }
    }
}

/// A change of one worker's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The worker's member number.
    pub member: u32,
    /// Status before.
    pub from: Status,
    /// Status after.
    pub to: Status,
    /// What caused it.
    pub why: Why,
}

/// What a heartbeat told the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Counted; the worker was already UP.
    Alive,
    /// Counted, and the worker came back UP.
    Recovered(Transition),
    /// From an older generation than the registered one: ignored.
    StaleGeneration,
    /// From a member number nobody registered: ignored.
    UnknownMember,
    /// A sequence number at or below one already counted: a replay (or a
    /// datagram overtaken by a later one). Ignored, so a recorded heartbeat
    /// cannot keep a dead worker alive.
    Replayed,
}

#[derive(Debug, Clone, Copy)]
struct Track {
    generation: u64,
    /// The highest sequence number counted for this generation.
    seq: u64,
    last_heard: Instant,
    status: Status,
    /// It announced that it leaves.
    leaving: bool,
    /// It said it is done leaving: DOWN for good (this generation).
    left: bool,
    /// When it was last found DOWN.
    down_since: Option<Instant>,
}

/// Timing rules and per-member liveness.
#[derive(Debug)]
pub struct Detector {
    suspect_after: Duration,
    down_after: Duration,
    grace_until: Instant,
    members: BTreeMap<u32, Track>,
}

impl Detector {
    /// A detector that marks a worker DOWN after `down_after` of silence
    /// (SUSPECT from half of it), and nobody DOWN before `grace_until`.
    pub fn new(down_after: Duration, grace_until: Instant) -> Detector {
        Detector {
            suspect_after: down_after / 2,
            down_after,
            grace_until,
            members: BTreeMap::new(),
        }
    }

    /// Starts tracking a (re)registered worker: UP, heard from at `now`.
    /// A new generation replaces the old one's track.
    pub fn track(&mut self, member: u32, generation: u64, now: Instant) {
        self.members.insert(
            member,
            Track {
                generation,
                seq: 0,
                last_heard: now,
                status: Status::Up,
                leaving: false,
                left: false,
                down_since: None,
            },
        );
    }

    /// A member announces that it leaves: LEAVING from now on, for this
    /// generation. `None` if it is not tracked or already DOWN, or was
    /// LEAVING already.
    pub fn leave(&mut self, member: u32, now: Instant) -> Option<Transition> {
        let track = self.members.get_mut(&member)?;
        track.leaving = true;
        if matches!(track.status, Status::Leaving | Status::Down) {
            return None;
        }
        track.last_heard = track.last_heard.max(now);
        Some(track.change(member, Status::Leaving, Why::Leave, now))
    }

    /// A member says it is done leaving: DOWN now, and for good.
    pub fn left(&mut self, member: u32, now: Instant) -> Option<Transition> {
        let track = self.members.get_mut(&member)?;
        track.leaving = true;
        track.left = true;
        (track.status != Status::Down).then(|| track.change(member, Status::Down, Why::Left, now))
    }

    /// Why a member is DOWN (`None` if it is not).
    pub fn reason(&self, member: u32) -> Option<Reason> {
        let track = self.members.get(&member)?;
        (track.status == Status::Down).then_some(if track.leaving {
            Reason::Left
        } else {
            Reason::Silent
        })
    }

    /// Since when a member is DOWN, if it is.
    pub fn down_since(&self, member: u32) -> Option<Instant> {
        self.members.get(&member).and_then(|t| t.down_since)
    }

    /// A member's current status, if tracked.
    pub fn status(&self, member: u32) -> Option<Status> {
        self.members.get(&member).map(|t| t.status)
    }

    /// When a member was last heard from, if tracked.
    pub fn last_heard(&self, member: u32) -> Option<Instant> {
        self.members.get(&member).map(|t| t.last_heard)
    }

    /// Feeds heartbeat `seq` of `member` at `generation`, received at `now`.
    pub fn observe(&mut self, member: u32, generation: u64, seq: u64, now: Instant) -> Observation {
        let Some(track) = self.members.get_mut(&member) else {
            return Observation::UnknownMember;
        };
        if generation != track.generation {
            // Older: a replaced pod. Newer than registered cannot come from a
            // worker that registered with us; ignore it too.
            return Observation::StaleGeneration;
        }
        if seq <= track.seq {
            return Observation::Replayed;
        }
        track.seq = seq;
        track.last_heard = track.last_heard.max(now);
        // A leaving worker heard again is still leaving; one that left
        // stays DOWN until it registers again.
        let heard = if track.leaving {
            Status::Leaving
        } else {
            Status::Up
        };
        if track.left || track.status == heard {
            return Observation::Alive;
        }
        Observation::Recovered(track.change(member, heard, Why::Heartbeat, now))
    }

    /// The status changes silence has caused by `now`, applied.
    pub fn evaluate(&mut self, now: Instant) -> Vec<Transition> {
        let in_grace = now < self.grace_until;
        let mut changes = Vec::new();
        for (&member, track) in &mut self.members {
            let silent = now.saturating_duration_since(track.last_heard);
            let due = if silent >= self.down_after && !in_grace {
                Status::Down
            } else if track.leaving {
                Status::Leaving
            } else if silent >= self.suspect_after {
                Status::Suspect
            } else {
                Status::Up
            };
            // Silence only ever worsens a status; heartbeats improve it.
            if due > track.status {
                changes.push(track.change(member, due, Why::Silent(silent), now));
            }
        }
        changes
    }

    /// Members DOWN since `before` or earlier, and why they went DOWN,
    /// no longer tracked: the controller forgets them.
    pub fn forget_down_since(&mut self, before: Instant) -> Vec<(u32, Reason)> {
        let gone: Vec<(u32, Reason)> = self
            .members
            .keys()
            .filter(|m| self.down_since(**m).is_some_and(|at| at <= before))
            .filter_map(|&m| Some((m, self.reason(m)?)))
            .collect();
        for (member, _) in &gone {
            self.members.remove(member);
        }
        gone
    }
}

impl Track {
    /// Moves to `to`, noting when it went DOWN.
    fn change(&mut self, member: u32, to: Status, why: Why, now: Instant) -> Transition {
        let from = std::mem::replace(&mut self.status, to);
        self.down_since = (to == Status::Down).then_some(now);
        Transition {
            member,
            from,
            to,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const INTERVAL: Duration = Duration::from_millis(200);
    const DOWN_AFTER: Duration = Duration::from_secs(1);

    fn detector(t0: Instant) -> Detector {
        let mut d = Detector::new(DOWN_AFTER, t0);
        d.track(1, 1, t0);
        d
    }

    /// Runs evaluate every millisecond from `from` to `to`, collecting changes.
    fn run(d: &mut Detector, from: Instant, to: Instant) -> Vec<(Duration, Transition)> {
        let mut out = Vec::new();
        let mut now = from;
        while now <= to {
            out.extend(d.evaluate(now).into_iter().map(|t| (now - from, t)));
            now += MS;
        }
        out
    }

    #[test]
    fn a_silent_worker_is_suspect_at_half_the_timeout_and_down_at_the_timeout() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let changes = run(&mut d, t0, t0 + 2 * DOWN_AFTER);
        let seen: Vec<_> = changes.iter().map(|(at, t)| (*at, t.from, t.to)).collect();
        assert_eq!(
            seen,
            [
                (500 * MS, Status::Up, Status::Suspect),
                (1000 * MS, Status::Suspect, Status::Down)
            ]
        );
        assert_eq!(changes[1].1.why, Why::Silent(DOWN_AFTER));
    }

    #[test]
    fn heartbeats_up_to_three_times_late_never_cause_a_down() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        // A fixed, seeded jitter pattern: gaps between 0.2x and 3x the interval.
        let gaps = [1.0, 3.0, 0.2, 2.9, 3.0, 1.5, 0.7, 3.0, 3.0, 2.2];
        let mut now = t0;
        for round in 0..50 {
            let gap = INTERVAL.mul_f64(gaps[round % gaps.len()]);
            for change in run(&mut d, now, now + gap) {
                assert_ne!(change.1.to, Status::Down, "round {round}: {change:?}");
            }
            now += gap;
            d.observe(1, 1, round as u64 + 1, now);
        }
    }

    #[test]
    fn a_heartbeat_brings_a_suspect_or_down_worker_back_up() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.evaluate(t0 + 600 * MS);
        assert_eq!(d.status(1), Some(Status::Suspect));
        let back = d.observe(1, 1, 1, t0 + 700 * MS);
        assert!(matches!(
            back,
            Observation::Recovered(Transition {
                from: Status::Suspect,
                to: Status::Up,
                ..
            })
        ));
        d.evaluate(t0 + 2000 * MS);
        assert_eq!(d.status(1), Some(Status::Down));
        let back = d.observe(1, 1, 2, t0 + 2100 * MS);
        assert!(matches!(
            back,
            Observation::Recovered(Transition {
                from: Status::Down,
                to: Status::Up,
                why: Why::Heartbeat,
                ..
            })
        ));
        assert_eq!(d.observe(1, 1, 3, t0 + 2200 * MS), Observation::Alive);
    }

    #[test]
    fn heartbeats_of_an_old_generation_keep_nobody_alive() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.track(1, 2, t0); // the pod was replaced: generation 2 registered
        for i in 1..=20 {
            assert_eq!(
                d.observe(1, 1, u64::from(i), t0 + i * 100 * MS),
                Observation::StaleGeneration
            );
        }
        d.evaluate(t0 + DOWN_AFTER);
        assert_eq!(d.status(1), Some(Status::Down));
        assert_eq!(d.observe(9, 1, 1, t0), Observation::UnknownMember);
    }

    #[test]
    fn nobody_is_declared_down_during_the_grace_period() {
        let t0 = Instant::now();
        let grace = 2 * DOWN_AFTER;
        let mut d = Detector::new(DOWN_AFTER, t0 + grace);
        d.track(1, 1, t0);
        let changes = run(&mut d, t0, t0 + grace + 10 * MS);
        let seen: Vec<_> = changes.iter().map(|(at, t)| (*at, t.to)).collect();
        assert_eq!(seen, [(500 * MS, Status::Suspect), (grace, Status::Down)]);
    }

    #[test]
    fn a_late_heartbeat_does_not_move_last_heard_backwards() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.observe(1, 1, 1, t0 + 500 * MS);
        d.observe(1, 1, 2, t0 + 100 * MS); // an earlier reading of the clock
        assert_eq!(d.last_heard(1), Some(t0 + 500 * MS));
    }

    #[test]
    fn a_leaving_worker_stays_out_of_the_ring_until_it_leaves_or_goes_silent() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let leave = d.leave(1, t0 + 100 * MS).unwrap();
        assert_eq!(
            (leave.from, leave.to, leave.why),
            (Status::Up, Status::Leaving, Why::Leave)
        );
        assert_eq!(d.leave(1, t0 + 150 * MS), None, "said twice, changed once");
        // Heard from, it stays LEAVING (never UP again, never SUSPECT).
        assert_eq!(d.observe(1, 1, 1, t0 + 700 * MS), Observation::Alive);
        assert!(run(&mut d, t0 + 700 * MS, t0 + 1600 * MS).is_empty());
        assert_eq!(d.status(1), Some(Status::Leaving));
        // Silent while leaving: DOWN, and it left.
        let changes = run(&mut d, t0 + 1601 * MS, t0 + 1800 * MS);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].1.from, changes[0].1.to),
            (Status::Leaving, Status::Down)
        );
        assert_eq!(d.reason(1), Some(Reason::Left));
        // A late heartbeat of the same generation: back to LEAVING, not UP.
        let back = d.observe(1, 1, 2, t0 + 1900 * MS);
        assert!(matches!(
            back,
            Observation::Recovered(Transition {
                to: Status::Leaving,
                ..
            })
        ));
        // Done: DOWN at once, and later heartbeats change nothing.
        let done = d.left(1, t0 + 2000 * MS).unwrap();
        assert_eq!((done.to, done.why), (Status::Down, Why::Left));
        assert_eq!(d.observe(1, 1, 3, t0 + 2100 * MS), Observation::Alive);
        assert_eq!(d.status(1), Some(Status::Down));
        assert_eq!(d.down_since(1), Some(t0 + 2000 * MS));
        // A new registration is a worker like any other.
        d.track(1, 2, t0 + 3000 * MS);
        assert_eq!(d.status(1), Some(Status::Up));
        assert_eq!(d.reason(1), None);
    }

    #[test]
    fn a_silent_worker_is_down_for_silence_and_forgotten_after_a_while() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.track(2, 1, t0);
        d.evaluate(t0 + DOWN_AFTER);
        assert_eq!(d.reason(1), Some(Reason::Silent));
        assert_eq!(d.forget_down_since(t0 + DOWN_AFTER - MS), Vec::new());
        d.observe(2, 1, 1, t0 + DOWN_AFTER + MS);
        assert_eq!(
            d.forget_down_since(t0 + DOWN_AFTER),
            vec![(1, Reason::Silent)]
        );
        assert_eq!(d.status(1), None);
        assert_eq!(d.status(2), Some(Status::Up), "the one heard from stays");
    }

    #[test]
    fn a_replayed_heartbeat_keeps_nobody_alive() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        assert_eq!(d.observe(1, 1, 7, t0 + 100 * MS), Observation::Alive);
        // The worker dies; a recording of its heartbeats is played back.
        for i in 2..=20u32 {
            assert_eq!(
                d.observe(1, 1, 7 - u64::from(i % 8), t0 + i * 100 * MS),
                Observation::Replayed
            );
        }
        d.evaluate(t0 + 100 * MS + DOWN_AFTER);
        assert_eq!(d.status(1), Some(Status::Down));
        // A new registration (generation) starts its own sequence.
        d.track(1, 2, t0 + 2000 * MS);
        assert_eq!(d.observe(1, 2, 1, t0 + 2100 * MS), Observation::Alive);
    }
}
