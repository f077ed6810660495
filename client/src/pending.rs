//! The calls of one connection that wait for their answers, each with its
//! deadline.
//!
//! A call's timeout is kept beside it rather than armed as a timer of its
//! own: nearly every call is answered in time, and a quorum read armed and
//! cancelled three tokio timers (its ask's timeout, its own deadline, its
//! hedge); a build without them spent 0.93x the servers' CPU per read.
//! Instead the connection's reader sweeps out the overdue calls on one
//! timer, armed for the earliest deadline that may be due: a timer per
//! timeout's length while calls flow, none while the connection is idle.

use crate::connection::ConnectionError;
use kv_wire::Response;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// What a call's waiter receives: the answer, or why none came.
pub(crate) type Answer = Result<Response, ConnectionError>;

/// The waiting calls of one connection.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    state: Mutex<State>,
    /// Tells the reader to look at [`Pending::next_sweep`] again: a call
    /// came that is due before the sweep it has armed, if any.
    pub(crate) rearm: Notify,
}

#[derive(Debug, Default)]
struct State {
    calls: HashMap<u64, Waiter>,
    /// When the reader sweeps next; `None` when it has nothing to sweep.
    /// Never later than the earliest deadline (it may be earlier: a call
    /// answered in time leaves it where it was).
    sweep: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    answer: oneshot::Sender<Answer>,
    deadline: Instant,
    /// The timeout the caller gave, for the error.
    after: Duration,
}

impl Pending {
    /// Registers call `id`, given `after` until `deadline`: what receives
    /// its answer.
    pub(crate) fn register(
        &self,
        id: u64,
        deadline: Instant,
        after: Duration,
    ) -> oneshot::Receiver<Answer> {
        let (answer, receiver) = oneshot::channel();
        let mut state = self.lock();
        state.calls.insert(
            id,
            Waiter {
                answer,
                deadline,
                after,
            },
        );
        if state.sweep.is_none_or(|sweep| deadline < sweep) {
            state.sweep = Some(deadline);
            drop(state);
            self.rearm.notify_one();
        }
        receiver
    }

    /// Passes the answer to call `id`, if it still waits.
    pub(crate) fn answer(&self, id: u64, response: Response) {
        if let Some(waiter) = self.lock().calls.remove(&id) {
            let _ = waiter.answer.send(Ok(response));
        }
    }

    /// Forgets call `id`: it was never sent.
    pub(crate) fn forget(&self, id: u64) {
        self.lock().calls.remove(&id);
    }

    /// Fails every waiting call: the connection is lost.
    pub(crate) fn fail_all(&self, addr: &str, reason: &str) {
        let calls = std::mem::take(&mut self.lock().calls);
        for waiter in calls.into_values() {
            let _ = waiter.answer.send(Err(ConnectionError::Lost {
                addr: addr.to_string(),
                reason: reason.to_string(),
            }));
        }
    }

    /// When the reader should sweep next, if at all.
    pub(crate) fn next_sweep(&self) -> Option<Instant> {
        self.lock().sweep
    }

    /// Fails every call overdue at `now` with a timeout; returns when to
    /// sweep next, if at all.
    pub(crate) fn sweep(&self, now: Instant, addr: &str) -> Option<Instant> {
        let (overdue, next) = {
            let mut state = self.lock();
            let overdue: Vec<Waiter> = state
                .calls
                .extract_if(|_, waiter| waiter.deadline <= now)
                .map(|(_, waiter)| waiter)
                .collect();
            state.sweep = state.calls.values().map(|waiter| waiter.deadline).min();
            (overdue, state.sweep)
        };
        for waiter in overdue {
            let _ = waiter.answer.send(Err(ConnectionError::Timeout {
                addr: addr.to_string(),
                after: waiter.after,
            }));
        }
        next
    }

    // A panic while holding the lock leaves the map whole: carry on.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    const ADDR: &str = "127.0.0.1:1";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_times_out_the_overdue_calls_only() {
        let pending = Pending::default();
        let start = Instant::now();
        let soon = pending.register(1, start + ms(100), ms(100));
        let later = pending.register(2, start + ms(300), ms(300));
        assert_eq!(pending.next_sweep(), Some(start + ms(100)));
        assert_eq!(pending.sweep(start + ms(99), ADDR), Some(start + ms(100)));
        assert_eq!(pending.sweep(start + ms(100), ADDR), Some(start + ms(300)));
        let timed_out = soon.now_or_never().expect("answered").expect("sent");
        assert!(
            matches!(timed_out, Err(ConnectionError::Timeout { after, .. }) if after == ms(100)),
            "{timed_out:?}"
        );
        pending.answer(2, Response::Value(None));
        assert!(matches!(
            later.now_or_never(),
            Some(Ok(Ok(Response::Value(None))))
        ));
        // Nothing left: the sweep disarms.
        assert_eq!(pending.sweep(start + ms(300), ADDR), None);
        assert_eq!(pending.next_sweep(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_due_before_the_armed_sweep_rearms_it() {
        let pending = Pending::default();
        let start = Instant::now();
        let _slow = pending.register(1, start + ms(1_000), ms(1_000));
        // The first call arms the reader.
        pending
            .rearm
            .notified()
            .now_or_never()
            .expect("told to arm");
        let _later = pending.register(2, start + ms(2_000), ms(2_000));
        assert!(pending.rearm.notified().now_or_never().is_none());
        let _sooner = pending.register(3, start + ms(50), ms(50));
        pending
            .rearm
            .notified()
            .now_or_never()
            .expect("told to rearm");
        assert_eq!(pending.next_sweep(), Some(start + ms(50)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_connection_fails_every_waiting_call() {
        let pending = Pending::default();
        let start = Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|id| pending.register(id, start + ms(100), ms(100)))
            .collect();
        pending.fail_all(ADDR, "closed by the server");
        for call in calls {
            let lost = call.now_or_never().expect("answered").expect("sent");
            assert!(
                matches!(lost, Err(ConnectionError::Lost { .. })),
                "{lost:?}"
            );
        }
    }
}
