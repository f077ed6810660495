//! Timers of coarse precision, for the waits that nearly every request arms
//! and nearly always cancels: a read's hedge, a write's deadline. (A call's
//! timeout needs no timer at all: see `pending`.)
//!
//! Why not tokio's own: arming a tokio timer due before the time the
//! runtime last went to sleep for wakes the runtime's driver with a system
//! call (an eventfd write), even when that runtime is busy on this very
//! thread and not asleep at all (tokio-rs/tokio#5207). Under kv's 90% read
//! load that was 0.77 eventfd writes per operation across the workers, and
//! a build with no timers on the read path did 1.08x the operations at
//! 0.93x the CPU per operation. Arming and cancelling a tokio timer took
//! 265 ns here, a wait on these 120 ns.
//!
//! Here a wait joins the slot of its deadline rounded up to a [`TICK`], one
//! [`Notify`] per slot, and one task per [`Timers`] sleeps on a tokio timer
//! until the earliest slot and wakes its waiters: one tokio timer per tick
//! that has waiters, not one per wait. A wait ends at its deadline or up to
//! a tick later; a wait dropped before then costs a lock and an unlink.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How late a wait may end: deadlines are rounded up to a multiple of it.
pub const TICK: Duration = Duration::from_millis(10);

/// A set of coarse timers, and the task that fires them (started by the
/// first wait, on that wait's runtime; it ends when the last clone of the
/// `Timers` is dropped). Waits must be made within a tokio runtime.
#[derive(Debug, Clone)]
pub struct Timers {
    shared: Arc<Shared>,
}

/// A deadline passed before the future it bounded completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

#[derive(Debug)]
struct Shared {
    /// The instant slots are counted from.
    origin: Instant,
    slots: Mutex<Slots>,
    /// Wakes the firing task: a slot earlier than the one it sleeps for
    /// has come, or the timers are gone.
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Slots {
    /// The waiters of each slot, by the slot's time.
    due: BTreeMap<Instant, Arc<Notify>>,
    /// Whether the firing task runs.
    firing: bool,
}

impl Default for Timers {
    fn default() -> Self {
        Timers::new()
    }
}

impl Timers {
    /// Timers with nothing armed.
    pub fn new() -> Timers {
        Timers {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                slots: Mutex::default(),
                wake: Arc::new(Notify::new()),
            }),
        }
    }

    /// Completes at `deadline`, or up to a [`TICK`] after it. The wait is
    /// armed when first polled.
    pub fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move { Shared::arm(&shared, deadline).await }
    }

    /// [`Timers::sleep_until`] `after` from now.
    pub fn sleep(&self, after: Duration) -> impl Future<Output = ()> + Send + 'static {
        self.sleep_until(Instant::now() + after)
    }

    /// `future`'s output, unless `deadline` (give or take a [`TICK`])
    /// comes first.
    pub async fn timeout_at<F: Future>(
        &self,
        deadline: Instant,
        future: F,
    ) -> Result<F::Output, Elapsed> {
        let elapsed = self.sleep_until(deadline);
        tokio::select! {
            biased;
            output = future => Ok(output),
            () = elapsed => Err(Elapsed),
        }
    }
}

impl Shared {
    /// Joins the slot of `deadline`: what completes when it fires.
    fn arm(shared: &Arc<Shared>, deadline: Instant) -> tokio::sync::futures::OwnedNotified {
        let at = shared.slot_of(deadline);
        let mut slots = shared.lock();
        let earliest = slots.due.first_key_value().map(|(first, _)| *first);
        // Made before the slot can fire: `notify_waiters` reaches every
        // future made before it, polled or not.
        let fired = slots.due.entry(at).or_default().clone().notified_owned();
        if !slots.firing {
            slots.firing = true;
            tokio::spawn(fire(Arc::downgrade(shared), shared.wake.clone()));
        } else if earliest.is_none_or(|first| at < first) {
            shared.wake.notify_one();
        }
        fired
    }

    /// The slot a deadline falls in: the first tick at or after it.
    fn slot_of(&self, deadline: Instant) -> Instant {
        let since = deadline.saturating_duration_since(self.origin);
        let ticks = since.as_nanos().div_ceil(TICK.as_nanos());
        // u32 ticks of 10 ms are over a year; a longer wait waits that long.
        self.origin + TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    // A panic while holding the lock leaves the map whole: carry on.
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the waiters of every slot that is due.
    fn fire_due(&self) {
        let now = Instant::now();
        let due = {
            let mut slots = self.lock();
            let later = slots.due.split_off(&(now + Duration::from_nanos(1)));
            std::mem::replace(&mut slots.due, later)
        };
        for waiters in due.into_values() {
            waiters.notify_waiters();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The firing task holds no strong reference while it waits: wake
        // it to find the timers gone and end.
        self.wake.notify_one();
    }
}

/// The firing task: sleeps until the earliest slot (or until woken for an
/// earlier one), fires what is due, again, until the timers are gone.
async fn fire(shared: Weak<Shared>, wake: Arc<Notify>) {
    let _firing = Firing(shared.clone());
    loop {
        let earliest = match shared.upgrade() {
            Some(shared) => shared.lock().due.first_key_value().map(|(at, _)| *at),
            None => return,
        };
        match earliest {
            None => wake.notified().await,
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = wake.notified() => {}
            },
        }
        match shared.upgrade() {
            Some(shared) => shared.fire_due(),
            None => return,
        }
    }
}

/// Marks the firing task gone when it ends, also when its runtime drops
/// it: the next wait starts another.
struct Firing(Weak<Shared>);

impl Drop for Firing {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.lock().firing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How late a wait that began at `start` for `after` ended; never early.
    fn late_by(start: Instant, after: Duration) -> Duration {
        let (due, now) = (start + after, Instant::now());
        assert!(now >= due, "ended {:?} early", due - now);
        now - due
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_deadline_or_within_a_tick_after() {
        let timers = Timers::new();
        for after in [0, 1, 9, 10, 11, 50, 999, 5_000].map(Duration::from_millis) {
            let start = Instant::now();
            timers.sleep(after).await;
            let late = late_by(start, after);
            assert!(late <= TICK, "{after:?}: {late:?} late");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_wait_is_not_held_up_by_a_later_one() {
        let timers = Timers::new();
        let start = Instant::now();
        // The firing task goes to sleep for the later slot first.
        let later = tokio::spawn(timers.sleep(Duration::from_secs(10)));
        tokio::task::yield_now().await;
        timers.sleep(Duration::from_millis(30)).await;
        assert!(late_by(start, Duration::from_millis(30)) <= TICK);
        assert!(!later.is_finished());
        later.await.unwrap();
        assert!(late_by(start, Duration::from_secs(10)) <= TICK);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_in_one_slot_all_end_and_dropped_ones_do_not_matter() {
        let timers = Timers::new();
        let start = Instant::now();
        let dropped = timers.sleep(Duration::from_millis(20));
        let waits: Vec<_> = (0..5)
            .map(|_| tokio::spawn(timers.sleep(Duration::from_millis(20))))
            .collect();
        drop(dropped);
        for wait in waits {
            wait.await.unwrap();
        }
        assert!(late_by(start, Duration::from_millis(20)) <= TICK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_passes_on_what_comes_in_time_and_elapses_otherwise() {
        let timers = Timers::new();
        let quick = timers.timeout_at(Instant::now() + Duration::from_millis(100), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            7
        });
        assert_eq!(quick.await, Ok(7));
        let start = Instant::now();
        let slow = timers.timeout_at(
            start + Duration::from_millis(100),
            std::future::pending::<()>(),
        );
        assert_eq!(slow.await, Err(Elapsed));
        assert!(late_by(start, Duration::from_millis(100)) <= TICK);
    }

    #[test]
    fn the_timers_outlive_the_runtime_that_fired_them() {
        let timers = Timers::new();
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            // Dropping the runtime drops its firing task; the next runtime's
            // first wait must start another, or it would never end.
            runtime.block_on(async {
                let wait = timers.sleep(Duration::from_millis(20));
                let ended = tokio::time::timeout(Duration::from_secs(1), wait).await;
                assert!(ended.is_ok(), "the wait never ended");
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_firing_task_ends_with_the_timers() {
        let timers = Timers::new();
        timers.sleep(Duration::from_millis(20)).await;
        let tasks = tokio::runtime::Handle::current().metrics();
        assert_eq!(tasks.num_alive_tasks(), 1);
        drop(timers);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(tasks.num_alive_tasks(), 0);
    }
}
