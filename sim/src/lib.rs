//! kv's deterministic simulation.
//!
//! One run is one seed: a controller and four or five workers (the real
//! `Node`, rebalancing and `Membership` code) on one single-threaded
//! runtime whose clock only moves when every task waits, talking over an
//! in-memory network ([`net`]). Clients write (a key at a time through any
//! worker, or a bulk batch to a primary), delete and read a small set of
//! keys through random workers while the run injects faults — crashes
//! and restarts, pauses, partitions one way or both, a worker cut off,
//! message loss and delay, controller restarts, joins and graceful leaves,
//! and copies planted on workers that do not own their keys. Then
//! everything heals, and the run checks ([`history`]): the cluster settles
//! again, every planted copy reached its key's owners, every key can be
//! written and read, every acknowledged write survived, no read went back
//! in time, the owners of each key agree, and no worker was called DOWN
//! while nothing kept it from heartbeating.
//!
//! Every random choice comes from the seed and the runtime runs tasks in a
//! fixed order, so a seed replays exactly: [`Report::trace`] hashes every
//! event of the run (faults, epochs, status changes, each operation and its
//! outcome) and is the same on every run of the seed.

pub mod audited;
pub mod cluster;
pub mod history;
pub mod net;

use crate::cluster::{lock, Cluster, Settings};
use crate::history::Kind;
use crate::net::CONTROLLER;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What one run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster's timings.
    pub settings: Settings,
    /// How long faults are injected.
    pub chaos: Duration,
    /// Distinct keys the clients use (few, so they collide).
    pub keys: usize,
    /// Clients, each one operation at a time.
    pub clients: usize,
    /// Keep the trace's lines (for `--seed S --verbose`).
    pub keep_log: bool,
    /// A worker that leaves starts again on its data dir once it exited,
    /// as a StatefulSet's rolling restart does, rather than leaving for
    /// good.
    pub leavers_return: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            settings: Settings::default(),
            chaos: Duration::from_secs(10),
            keys: 40,
            clients: 4,
            keep_log: false,
            leavers_return: false,
        }
    }
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct Report {
    /// Its seed.
    pub seed: u64,
    /// The hash of every event of the run.
    pub trace: u64,
    /// What the checks found wrong: empty when the run passed.
    pub problems: Vec<String>,
    /// Client operations run.
    pub ops: usize,
    /// Faults injected.
    pub faults: usize,
    /// Simulated time the run took.
    pub simulated: Duration,
    /// The trace's lines, if kept.
    pub log: Vec<String>,
}

impl Report {
    /// A seed that failed before it could run its scenario to the end.
    fn failed(seed: u64, problem: String) -> Report {
        Report {
            seed,
            trace: 0,
            problems: vec![problem],
            ops: 0,
            faults: 0,
            simulated: Duration::ZERO,
            log: Vec::new(),
        }
    }
}

/// What a panic said, if it said it with a string.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs seed `seed`.
pub fn run(seed: u64, options: &Options) -> Report {
    let failed = |problem: String| Report::failed(seed, problem);
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    if !seed_scheduler(&mut builder, seed) {
        return failed(
            "built without --cfg tokio_unstable (.cargo/config.toml; RUSTFLAGS replaces it): tokio's choices cannot be seeded, so runs cannot replay".into(),
        );
    }
    match builder.build() {
        Ok(runtime) => runtime.block_on(scenario(seed, options)),
        Err(e) => failed(format!("cannot build a runtime: {e}")),
    }
}

/// Seeds the runtime's random choices (the order in which `select!` polls
/// ready branches); false when this build cannot.
#[cfg(tokio_unstable)]
fn seed_scheduler(builder: &mut tokio::runtime::Builder, seed: u64) -> bool {
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    true
}

#[cfg(not(tokio_unstable))]
fn seed_scheduler(_: &mut tokio::runtime::Builder, _: u64) -> bool {
    false
}

async fn scenario(seed: u64, options: &Options) -> Report {
    let c = Cluster::new(seed, options.settings.clone(), options.keep_log);
    let mut problems = Vec::new();
    c.start_controller();
    let workers = 4 + c.net.rng().usize(0..=1);
    for i in 1..=workers {
        c.start_worker(&format!("worker{i}"));
    }
    let mut faults = 0;
    if !wait_until(Duration::from_secs(20), || c.settled()).await {
        problems.push("the cluster did not settle within 20 s of starting".to_string());
    } else {
        c.event("settled");
        let stop = CancellationToken::new();
        let audit = CancellationToken::new();
        tokio::spawn(c.clone().audit_readiness(options.keys, audit.clone()));
        let clients: Vec<_> = (0..options.clients)
            .map(|_| tokio::spawn(client(c.clone(), options.keys, stop.clone())))
            .collect();
        faults = chaos(&c, options, workers).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        heal(&c);
        stop.cancel();
        for client in clients {
            let _ = client.await;
        }
        after_healing(&c, options, &mut problems).await;
        audit.cancel();
    }
    let (trace, log) = c.trace();
    let ops = c.history().ops().len();
    c.tear_down();
    Report {
        seed,
        trace,
        problems,
        ops,
        faults,
        simulated: Duration::from_millis(c.now_ms()),
        log,
    }
}

/// Waits (in simulated time) until `done`, at most `limit`.
async fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// One client: an operation at a time on a random key, through a random
/// running worker, until `stop`.
async fn client(c: Arc<Cluster>, keys: usize, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let (pause, key, roll) = {
            let mut rng = c.net.rng();
            (rng.u64(5..60), rng.usize(0..keys), rng.u32(0..100))
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let kind = match roll {
            0..5 => {
                bulk(&c, keys).await;
                continue;
            }
            5..55 => Kind::Put(c.fresh_value()),
            55..70 => Kind::Delete,
            _ => Kind::Get,
        };
        let Some(gateway) = pick(&c, |id| !c.net.is_paused(id)) else {
            continue;
        };
        let wrote = !matches!(kind, Kind::Get);
        c.client_op(&gateway, format!("key{key}"), kind).await;
        // A third of the writes are read back at once through any worker,
        // as clients do: a write acknowledged before its copies are where
        // quorum reads look shows up here.
        if wrote && c.net.rng().u32(0..3) == 0 {
            if let Some(gateway) = pick(&c, |id| !c.net.is_paused(id)) {
                c.client_op(&gateway, format!("key{key}"), Kind::Get).await;
            }
        }
    }
}

/// A bulk write through a random running worker of the keys, among a few
/// drawn, that it is the primary of in its view (`kvctl load` splits its
/// batches by primary so).
async fn bulk(c: &Arc<Cluster>, keys: usize) {
    let Some(gateway) = pick(c, |id| !c.net.is_paused(id)) else {
        return;
    };
    let Some(proc) = c.net.proc(&gateway) else {
        return;
    };
    let view = proc.node.topologies.current();
    let drawn: BTreeSet<usize> = (0..8).map(|_| c.net.rng().usize(0..keys)).collect();
    let mine: Vec<String> = drawn
        .into_iter()
        .map(|k| format!("key{k}"))
        .filter(|key| view.primary(key).is_some_and(|m| m.id == gateway))
        .collect();
    if !mine.is_empty() {
        c.client_bulk(&gateway, mine).await;
    }
}

/// A random running worker that `ok` accepts.
fn pick(c: &Cluster, ok: impl Fn(&str) -> bool) -> Option<String> {
    let ids: Vec<String> = c
        .net
        .procs()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| ok(id))
        .collect();
    if ids.is_empty() {
        return None;
    }
    let i = c.net.rng().usize(0..ids.len());
    Some(ids[i].clone())
}

/// The kinds of fault, and how often each is drawn.
const FAULTS: [(Fault, u32); 10] = [
    (Fault::Crash, 3),
    (Fault::Restart, 2),
    (Fault::Pause, 2),
    (Fault::Partition, 3),
    (Fault::Isolate, 2),
    (Fault::Loss, 1),
    (Fault::ControllerRestart, 1),
    (Fault::Join, 1),
    (Fault::Leave, 1),
    (Fault::Plant, 1),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Crash,
    Restart,
    Pause,
    Partition,
    Isolate,
    Loss,
    ControllerRestart,
    Join,
    Leave,
    Plant,
}

/// Injects faults for `options.chaos`; how many.
///
/// A crash loses the worker's copies (a store in memory, or a data dir
/// lost with its pod), so crashes come one at a time, each once the
/// cluster has settled since the last: three copies survive one loss, not
/// two at once. A restart (`kill -9` of a worker with a data dir, started
/// again on it) loses nothing, and like everything else may overlap.
async fn chaos(c: &Arc<Cluster>, options: &Options, mut workers: usize) -> usize {
    let end = tokio::time::Instant::now() + options.chaos;
    let mut injected = 0;
    while tokio::time::Instant::now() < end {
        let (wait, fault, lasts) = {
            let mut rng = c.net.rng();
            let total: u32 = FAULTS.iter().map(|(_, w)| w).sum();
            let mut roll = rng.u32(0..total);
            let fault = FAULTS
                .iter()
                .find(|(_, w)| {
                    let hit = roll < *w;
                    roll = roll.saturating_sub(*w);
                    hit
                })
                .map_or(Fault::Pause, |(f, _)| *f);
            (
                Duration::from_millis(rng.u64(200..1_200)),
                fault,
                Duration::from_millis(rng.u64(100..3_000)),
            )
        };
        tokio::time::sleep(wait).await;
        let live = |id: &str| {
            c.net
                .proc(id)
                .is_some_and(|p| !p.node.leaving.is_cancelled())
        };
        let done = match fault {
            Fault::Crash if c.settled() => pick(c, live).is_some_and(|id| {
                c.crash_worker(&id);
                c.lose_data(&id);
                c.impair(&id);
                c.restart_later(id, lasts, false);
                true
            }),
            Fault::Crash => false,
            Fault::Restart => pick(c, live).is_some_and(|id| {
                c.crash_worker(&id);
                c.impair(&id);
                c.restart_later(id, lasts, true);
                true
            }),
            Fault::Pause => pick(c, |id| !c.net.is_paused(id)).is_some_and(|id| {
                c.event(format!("{id} paused for {lasts:?}"));
                c.net.set_paused(&id, true);
                c.impair(&id);
                let c = c.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    c.net.set_paused(&id, false);
                    c.event(format!("{id} resumes"));
                    c.mend(&id);
                });
                true
            }),
            // With every worker process down there is nothing to cut apart.
            Fault::Partition if !c.net.procs().is_empty() => {
                let mut hosts: Vec<String> = c.net.procs().into_iter().map(|(id, _)| id).collect();
                hosts.push(CONTROLLER.to_string());
                let (a, b, both) = {
                    let mut rng = c.net.rng();
                    let a = rng.usize(0..hosts.len());
                    let b = (a + rng.usize(1..hosts.len())) % hosts.len();
                    (hosts[a].clone(), hosts[b].clone(), rng.bool())
                };
                c.event(format!(
                    "cut {a} -> {b}{} for {lasts:?}",
                    if both { " both ways" } else { "" }
                ));
                cut(c, &a, &b, both, lasts);
                true
            }
            Fault::Partition => false,
            Fault::Isolate => pick(c, |_| true).is_some_and(|id| {
                c.event(format!("{id} cut off for {lasts:?}"));
                let mut others: Vec<String> = c
                    .net
                    .procs()
                    .into_iter()
                    .map(|(o, _)| o)
                    .filter(|o| *o != id)
                    .collect();
                others.push(CONTROLLER.to_string());
                for other in others {
                    cut(c, &id, &other, true, lasts);
                }
                true
            }),
            Fault::Loss => {
                let loss = c.net.rng().f64() * 0.2;
                c.event(format!("loss {:.0}% for {lasts:?}", loss * 100.0));
                c.net.set_loss(loss);
                c.impair("*");
                let c = c.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    c.net.set_loss(0.0);
                    c.event("loss ends");
                    c.mend("*");
                });
                true
            }
            Fault::ControllerRestart => {
                c.stop_controller();
                c.impair(CONTROLLER);
                let c = c.clone();
                let down = lasts / 3;
                tokio::spawn(async move {
                    tokio::time::sleep(down).await;
                    c.start_controller();
                    // Its grace, and the workers registering again.
                    tokio::time::sleep(c.settings.grace).await;
                    c.mend(CONTROLLER);
                });
                true
            }
            Fault::Join if workers < 7 => {
                workers += 1;
                c.start_worker(&format!("worker{workers}"));
                true
            }
            Fault::Join => false,
            Fault::Leave if c.net.procs().into_iter().filter(|(id, _)| live(id)).count() > 3 => {
                pick(c, live).is_some_and(|id| {
                    if options.leavers_return {
                        c.leave_and_return(&id, lasts)
                    } else {
                        c.leave_worker(&id)
                    }
                })
            }
            Fault::Leave => false,
            Fault::Plant => pick(c, live).is_some_and(|id| c.plant(&id, options.keys)),
        };
        injected += usize::from(done);
    }
    injected
}

/// Cuts `a -> b` (and back, if `both`) for `lasts`.
fn cut(c: &Arc<Cluster>, a: &str, b: &str, both: bool, lasts: Duration) {
    let links = if both {
        vec![
            (a.to_string(), b.to_string()),
            (b.to_string(), a.to_string()),
        ]
    } else {
        vec![(a.to_string(), b.to_string())]
    };
    for (from, to) in &links {
        c.net.set_cut(from, to, true);
        c.impair(from);
        c.impair(to);
    }
    let c = c.clone();
    tokio::spawn(async move {
        tokio::time::sleep(lasts).await;
        for (from, to) in &links {
            c.net.set_cut(from, to, false);
            c.mend(from);
            c.mend(to);
        }
        c.event(format!("links {links:?} mended"));
    });
}

/// Ends every fault: links mended, pauses over, the controller running.
fn heal(c: &Arc<Cluster>) {
    c.event("healing");
    c.net.heal();
    if c.published().is_none() && c.statuses().is_empty() {
        c.start_controller();
    }
}

/// The checks once every fault is over.
async fn after_healing(c: &Arc<Cluster>, options: &Options, problems: &mut Vec<String>) {
    // Crashed workers restart within 3 s of their crash, a controller
    // within 1 s: give the cluster a minute to be whole again.
    if !wait_until(Duration::from_secs(60), || {
        c.restarting() == 0 && c.settled()
    })
    .await
    {
        problems.push(format!(
            "not settled 60 s after the faults healed: {}",
            c.describe()
        ));
        return;
    }
    c.event("settled after healing");
    // Before the writes below overwrite every key: copies planted on
    // non-owners reach the owners by the handoff of an anti-entropy round
    // (every few seconds), or of a retry once it found them unconfirmed.
    wait_until(Duration::from_secs(30), || c.plants_astray().is_empty()).await;
    problems.extend(c.plants_astray());
    // Every key can be written and read. A write may fail at first (503,
    // retry): a replication batch sent into a partition before it healed
    // holds its link until the call times out, and the link then backs
    // off. A client retrying every 200 ms must succeed by the fifth try.
    for k in 0..options.keys {
        let key = format!("key{k}");
        let mut written = None;
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let Some(gateway) = pick(c, |_| true) else {
                problems.push("no worker runs".into());
                return;
            };
            let i = c.history().ops().len();
            c.client_op(&gateway, key.clone(), Kind::Put(c.fresh_value()))
                .await;
            written = Some(c.history().ops()[i].outcome.clone());
            if matches!(written, Some(history::Outcome::Written(_))) {
                break;
            }
        }
        if !matches!(written, Some(history::Outcome::Written(_))) {
            problems.push(format!(
                "{key}: five writes after healing failed, the last {written:?}"
            ));
        }
        let Some(reader) = pick(c, |_| true) else {
            return;
        };
        let i = c.history().ops().len();
        c.client_op(&reader, key.clone(), Kind::Get).await;
        let read = c.history().ops()[i].outcome.clone();
        if !matches!(read, history::Outcome::Read(Some(_))) {
            problems.push(format!("{key}: a read after healing failed: {read:?}"));
        }
    }
    // The third copies are asynchronous: wait for every owner to agree.
    let keys: Vec<String> = (0..options.keys).map(|k| format!("key{k}")).collect();
    let agree = || {
        keys.iter().all(|k| {
            let copies = c.copies(k);
            copies.windows(2).all(|w| w[0] == w[1])
        })
    };
    wait_until(Duration::from_secs(10), agree).await;
    // The last writes' third-copy audits.
    tokio::time::sleep(cluster::THIRD_COPY_WITHIN).await;
    let finals = keys.iter().map(|k| (k.clone(), c.copies(k))).collect();
    problems.extend(c.history().check(&finals, &c.changes()));
    problems.extend(c.unready());
    problems.extend(c.regressions());
    problems.extend(c.broken_promises());
    let slack = options.settings.down_after + options.settings.heartbeat * 2;
    for down in c.downs() {
        if down.running && down.clear_for >= slack {
            problems.push(format!(
                "{} was called DOWN at {} ms though nothing had kept it from heartbeating for {} ms",
                down.id,
                down.at,
                down.clear_for.as_millis()
            ));
        }
    }
}

/// Runs `seeds` on `threads` threads, telling `each` of every report as it
/// comes, and `stuck` of each seed still running after `limit` (a thread
/// cannot be stopped: a seed that spins would otherwise hang the run
/// without a word); how many passed and failed.
pub fn run_many(
    seeds: &[u64],
    options: &Options,
    threads: usize,
    limit: Duration,
    each: impl Fn(&Report) + Sync,
    stuck: impl Fn(u64) + Sync,
) -> (usize, usize) {
    seed_by_seed(
        seeds,
        threads,
        limit,
        |seed| run(seed, options),
        each,
        stuck,
    )
}

/// [`run_many`]'s loop, with `run` for running one seed.
fn seed_by_seed(
    seeds: &[u64],
    threads: usize,
    limit: Duration,
    run: impl Fn(u64) -> Report + Sync,
    each: impl Fn(&Report) + Sync,
    stuck: impl Fn(u64) + Sync,
) -> (usize, usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let tally = std::sync::Mutex::new((0, 0));
    // Which seed each runner is on, since when.
    let running: Vec<std::sync::Mutex<Option<(u64, std::time::Instant)>>> =
        (0..threads.max(1)).map(|_| Default::default()).collect();
    // Disconnected once every runner is done (none ever sends).
    let (finished, all_done) = std::sync::mpsc::channel::<()>();
    let (next, tally, run, each) = (&next, &tally, &run, &each);
    std::thread::scope(|s| {
        for slot in &running {
            let finished = finished.clone();
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else {
                    drop(finished);
                    return;
                };
                *lock(slot) = Some((seed, std::time::Instant::now()));
                // A panic is this seed's failure, not the end of every seed.
                let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)))
                    .unwrap_or_else(|panic| {
                        Report::failed(seed, format!("panicked: {}", panic_message(&panic)))
                    });
                *lock(slot) = None;
                each(&report);
                let mut tally = lock(tally);
                if report.problems.is_empty() {
                    tally.0 += 1;
                } else {
                    tally.1 += 1;
                }
            });
        }
        drop(finished);
        // The watchdog: looks at the runners ten times a limit until all
        // are done, and tells of each seed over the limit once.
        let (running, stuck) = (&running, &stuck);
        s.spawn(move || {
            let mut told = std::collections::HashSet::new();
            let every = (limit / 10).max(Duration::from_millis(1));
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = all_done.recv_timeout(every)
            {
                for slot in running {
                    if let Some((seed, since)) = *lock(slot) {
                        if since.elapsed() >= limit && told.insert(seed) {
                            stuck(seed);
                        }
                    }
                }
            }
        });
    });
    let counts = *lock(tally);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_seed_is_reported_as_that_seeds_failure_and_the_others_run() {
        let reports = std::sync::Mutex::new(Vec::new());
        let tally = seed_by_seed(
            &[1, 2, 3],
            2,
            Duration::from_secs(3600),
            |seed| {
                assert_ne!(seed, 2, "seed 2 breaks");
                Report {
                    problems: Vec::new(),
                    ..Report::failed(seed, String::new())
                }
            },
            |report| reports.lock().unwrap().push(report.clone()),
            |seed| panic!("seed {seed} is not stuck"),
        );
        let mut reports = reports.into_inner().unwrap();
        reports.sort_by_key(|r| r.seed);
        assert_eq!(tally, (2, 1));
        assert_eq!(reports.len(), 3);
        assert!(
            reports[1].problems[0]
                .starts_with("panicked: assertion `left != right` failed: seed 2 breaks"),
            "{:?}",
            reports[1].problems
        );
    }

    #[test]
    fn a_seed_over_the_limit_is_told_of_once_and_the_run_goes_on() {
        // Seed 2 runs until the watchdog tells of it.
        let (release, released) = std::sync::mpsc::channel();
        let released = std::sync::Mutex::new(released);
        let stuck = std::sync::Mutex::new(Vec::new());
        let tally = seed_by_seed(
            &[1, 2, 3],
            2,
            Duration::from_millis(50),
            |seed| {
                if seed == 2 {
                    let told = released
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(30));
                    told.expect("the watchdog told of seed 2 within 30 s");
                }
                Report {
                    problems: Vec::new(),
                    ..Report::failed(seed, String::new())
                }
            },
            |_| {},
            |seed| {
                stuck.lock().unwrap().push(seed);
                release.send(()).unwrap();
            },
        );
        assert_eq!(tally, (3, 0));
        assert_eq!(stuck.into_inner().unwrap(), [2]);
    }
}
