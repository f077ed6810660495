//! Where this worker's rebalancing stands, for `Request::Stats` (the
//! controller's `/cluster` and dashboard): the sync running now with its
//! copies still to move, and the last few that ended.
//!
//! Copies to move are estimated, since a sync learns what differs as it
//! goes: from the peers' digests, each arc to pull counts the copies the
//! peer holds beyond ours; keys to hand off (the worker's
//! `handoff_pending` gauge) count until their owners confirm them.

use crate::rebalance::{Report, Why};
use kv_wire::stats::{Finished, Running, RECENT_REBALANCES};
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// Copies still to pull, estimated.
    to_pull: u64,
    recent: VecDeque<Finished>,
}

/// The rebalance progress of one worker.
#[derive(Default)]
pub struct Progress {
    state: Mutex<State>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sync towards `epoch` begins (at `now_ms`).
    pub fn begin(&self, epoch: u64, now_ms: u64) {
        let mut s = self.lock();
        s.running = Some(Running {
            epoch,
            started_ms: now_ms,
            ..Running::default()
        });
        s.to_pull = 0;
    }

    /// A comparison found `copies` to pull (an estimate).
    pub fn expect(&self, copies: u64) {
        self.lock().to_pull += copies;
    }

    /// A pull that was expected to bring `expected` copies brought
    /// `keys` copies of `bytes` bytes.
    pub fn pulled(&self, expected: u64, keys: u64, bytes: u64) {
        let mut s = self.lock();
        s.to_pull = s.to_pull.saturating_sub(expected);
        if let Some(r) = &mut s.running {
            r.keys_moved += keys;
            r.bytes_moved += bytes;
        }
    }

    /// `keys` copies of `bytes` bytes were handed off to their owners.
    pub fn handed(&self, keys: u64, bytes: u64) {
        if let Some(r) = &mut self.lock().running {
            r.keys_moved += keys;
            r.bytes_moved += bytes;
        }
    }

    /// The sync ended with `report` after `took` (at `now_ms`).
    pub fn end(&self, why: Why, report: &Report, took: Duration, now_ms: u64) {
        let mut s = self.lock();
        let Some(running) = s.running.take() else {
            return;
        };
        if report.quiet(why) {
            return;
        }
        if s.recent.len() == RECENT_REBALANCES {
            s.recent.pop_front();
        }
        s.recent.push_back(Finished {
            epoch: running.epoch,
            ended_ms: now_ms,
            took_ms: took.as_millis() as u64,
            keys: (report.pulled + report.handed) as u64,
            bytes: (report.pulled_bytes + report.handed_bytes) as u64,
            complete: report.complete(),
            why: match why {
                Why::Change => "change",
                Why::Retry => "retry",
                Why::AntiEntropy => "anti-entropy",
            }
            .into(),
        });
    }

    /// A sync was interrupted (by a newer topology); it starts over.
    pub fn interrupted(&self) {
        self.lock().running = None;
    }

    /// The sync running now, with its estimate of what is left — copies
    /// to pull, plus `to_hand` keys held for other owners and not yet
    /// confirmed; bytes from the mean size of what moved, or else of the
    /// `held` copies — and the last syncs that ended.
    pub fn snapshot(&self, held: (u64, u64), to_hand: u64) -> (Option<Running>, Vec<Finished>) {
        let s = self.lock();
        let running = s.running.clone().map(|mut r| {
            r.keys_to_go = s.to_pull + to_hand;
            let (keys, bytes) = if r.keys_moved > 0 {
                (r.keys_moved, r.bytes_moved)
            } else {
                held
            };
            r.bytes_to_go = r
                .keys_to_go
                .saturating_mul(bytes)
                .checked_div(keys)
                .unwrap_or(0);
            r
        });
        (running, s.recent.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(pulled: usize, bytes: usize) -> Report {
        Report {
            pulled,
            pulled_bytes: bytes,
            ..Report::default()
        }
    }

    #[test]
    fn what_is_left_shrinks_as_copies_move_and_bytes_follow_their_mean_size() {
        let p = Progress::default();
        assert_eq!(p.snapshot((0, 0), 0).0, None);
        p.begin(7, 1_000);
        p.expect(100);
        let (running, _) = p.snapshot((10, 1_000), 20);
        let running = running.expect("running");
        assert_eq!((running.keys_to_go, running.bytes_to_go), (120, 12_000));
        p.pulled(60, 50, 10_000);
        let running = p.snapshot((10, 1_000), 20).0.expect("running");
        assert_eq!(running.keys_to_go, 60);
        // 200 bytes per copy moved, not the 100 held.
        assert_eq!(running.bytes_to_go, 12_000);
        assert_eq!((running.keys_moved, running.bytes_moved), (50, 10_000));
        p.end(
            Why::Change,
            &report(50, 10_000),
            Duration::from_millis(30),
            2_000,
        );
        let (running, recent) = p.snapshot((0, 0), 0);
        assert_eq!(running, None);
        assert_eq!(recent.len(), 1);
        assert_eq!(
            (
                recent[0].epoch,
                recent[0].keys,
                recent[0].took_ms,
                recent[0].why.as_str()
            ),
            (7, 50, 30, "change")
        );
    }

    #[test]
    fn quiet_anti_entropy_rounds_are_not_remembered_and_the_list_is_bounded() {
        let p = Progress::default();
        p.begin(1, 0);
        p.end(Why::AntiEntropy, &report(0, 0), Duration::ZERO, 1);
        assert!(p.snapshot((0, 0), 0).1.is_empty());
        for epoch in 0..20 {
            p.begin(epoch, epoch);
            p.end(Why::Change, &report(1, 1), Duration::ZERO, epoch);
        }
        let recent = p.snapshot((0, 0), 0).1;
        assert_eq!(recent.len(), RECENT_REBALANCES);
        assert_eq!(recent.last().map(|f| f.epoch), Some(19));
    }

    #[test]
    fn an_empty_worker_with_nothing_moved_yet_estimates_no_bytes() {
        let p = Progress::default();
        p.begin(2, 0);
        p.expect(10);
        let running = p.snapshot((0, 0), 0).0.expect("running");
        assert_eq!((running.keys_to_go, running.bytes_to_go), (10, 0));
    }
}
