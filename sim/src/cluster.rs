//! The simulated cluster: a controller and workers as tasks on one
//! simulated clock, talking over [`Net`]. What runs is the real code:
//! each worker is a `kv_worker::node::Node` with its real rebalancing loop,
//! answering peers through the real `wire_server::answer`; the controller
//! is the real `Membership` (registration, the failure detector, epochs).
//! What the simulation stands in for is the I/O around them: the HTTP
//! registration, the heartbeat datagrams and the topology pushes are
//! messages on the simulated network, with the same timings and retries.

use crate::audited::{Audited, Change};
use crate::history::{Kind, Outcome};
use crate::net::{self, Net, Proc, SimTransport, CONTROLLER};
use bytes::Bytes;
use futures::future::join_all;
use kv_controller::detector::{Status, Why};
use kv_controller::membership::Membership;
use kv_wire::heartbeat::HeartbeatAck;
use kv_wire::register::{LeaveRequest, RegisterReply, RegisterRequest};
use kv_wire::{HashRange, Member, Request, Response, Topology};
use kv_worker::node::{Limits, Node};
use kv_worker::presence::{Ack, Presence};
use kv_worker::store::{MemStore, Store};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::Xxh3;

/// The timings of the simulated cluster: the defaults of SPEC, but for
/// anti-entropy, which runs every few seconds so a run sees it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Between heartbeats.
    pub heartbeat: Duration,
    /// Silence before DOWN.
    pub down_after: Duration,
    /// The controller's start-up grace.
    pub grace: Duration,
    /// Between anti-entropy rounds.
    pub anti_entropy: Duration,
    /// A write's wait for its quorum.
    pub write_timeout: Duration,
    /// A quorum read's wait.
    pub read_timeout: Duration,
    /// How long a leaving worker hands over before it exits anyway.
    pub drain_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeat: Duration::from_millis(200),
            down_after: Duration::from_secs(1),
            grace: Duration::from_secs(2),
            anti_entropy: Duration::from_secs(3),
            write_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(60),
        }
    }
}

/// The wall clock's reading at the start of every run.
const EPOCH_MS: u64 = 1_780_000_000_000;
/// Registration and leave calls wait this long for the controller.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// Between retries of a registration, a leave or a push.
const RETRY: Duration = Duration::from_millis(100);
/// How soon an acknowledged write is on every owner when nothing impairs
/// them: its third copy is sent at once, in the next batch to that replica.
pub const THIRD_COPY_WITHIN: Duration = Duration::from_secs(1);
/// How long before a write nothing may have impaired its owners or the
/// network for the third-copy audit to hold it to [`THIRD_COPY_WITHIN`]: a
/// batch sent into a partition holds its link until its call times out
/// (the write timeout), and a failed one is retried after up to 1 s.
const QUIET_BEFORE: Duration = Duration::from_secs(5);

/// A DOWN the controller declared for silence.
#[derive(Debug, Clone)]
pub struct Down {
    /// The worker.
    pub id: String,
    /// Simulated milliseconds.
    pub at: u64,
    /// Whether the worker was running then.
    pub running: bool,
    /// How long no fault had touched it, the controller or the network.
    pub clear_for: Duration,
}

/// Faults on one host: how many are on now, and when the last one ended.
#[derive(Debug, Clone, Copy, Default)]
struct Impaired {
    active: u32,
    last: u64,
}

/// The controller's state while it runs.
struct Controller {
    membership: Membership,
    incarnation: u64,
    published: Option<Topology>,
    /// The epoch each worker acknowledged a push of.
    pushed: BTreeMap<String, u64>,
    pushing: BTreeSet<String>,
    alive: CancellationToken,
}

/// The whole simulated cluster.
pub struct Cluster {
    /// The network.
    pub net: Arc<Net>,
    /// Its timings.
    pub settings: Settings,
    start: Instant,
    controller: Mutex<Option<Controller>>,
    incarnations: Mutex<u64>,
    trace: Mutex<(Xxh3, Vec<String>, bool)>,
    history: Mutex<crate::history::History>,
    values: Mutex<u64>,
    downs: Mutex<Vec<Down>>,
    /// When owner sets changed: topologies published, workers crashed or
    /// started, or an operation began or ended while some worker held
    /// another topology than the published one (one cut off from the
    /// controller keeps serving with its last, as SPEC says it must).
    changes: Mutex<Vec<u64>>,
    /// When each epoch was first published (simulated ms).
    published_at: Mutex<BTreeMap<u64, u64>>,
    /// Every topology published, with when (simulated ms), in order.
    rings: Mutex<Vec<(u64, kv_worker::topology::View)>>,
    /// When each running worker last started (simulated ms).
    started_at: Mutex<BTreeMap<String, u64>>,
    /// What the readiness audit found wrong.
    unready: Mutex<Vec<String>>,
    /// Copies a worker replaced with older ones ([`crate::audited`]).
    regressions: Arc<Mutex<Vec<String>>>,
    /// The faults on each host: the controller, a worker, or `"*"` for
    /// the whole network.
    impaired: Mutex<BTreeMap<String, Impaired>>,
    /// Each worker's standing with the controller, as its process has it.
    presences: Mutex<BTreeMap<String, Arc<Mutex<Presence>>>>,
    skews: Mutex<BTreeMap<String, i64>>,
    /// Each worker's data dir: the store a restart with its data opens
    /// again (`kill -9` of a worker with `--data-dir`: the process dies,
    /// what it stored stays, as with `--sync always`).
    disks: Mutex<BTreeMap<String, Arc<MemStore>>>,
    /// When copies were lost: a worker's data dir gone (simulated ms).
    losses: Mutex<Vec<(String, u64)>>,
    /// What the audits of acknowledgements and removals found: writes
    /// acknowledged on fewer than two copies, third copies missing with
    /// nothing in their way, copies removed before their owners held them.
    broken_promises: Mutex<Vec<String>>,
    /// Crashed workers not started again yet.
    restarting: Mutex<usize>,
    /// When each worker stored the copy of each key it holds (simulated ms).
    arrivals: Mutex<BTreeMap<(String, String), u64>>,
    /// The newest version of each key each worker removed (handed off).
    removed: Mutex<BTreeMap<(String, String), kv_wire::Version>>,
    /// Copies planted on workers that do not own their keys.
    planted: Mutex<Vec<Planted>>,
}

/// A copy stored straight into a worker that does not own its key, as one
/// is left behind when a write's replica stops owning the key and the
/// owners lose their copies: no owner pulls from a non-owner, so only the
/// handoff's values can bring it to them.
#[derive(Debug, Clone)]
struct Planted {
    worker: String,
    key: String,
    version: kv_wire::Version,
    /// Simulated ms.
    at: u64,
}

/// A mutex's guard, poisoned or not (a panicking seed is reported as its
/// own failure; its locks must not fail every other).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` until `alive` is cancelled.
pub fn spawn_in(alive: &CancellationToken, work: impl Future<Output = ()> + Send + 'static) {
    let alive = alive.clone();
    tokio::spawn(async move {
        tokio::select! {
            biased;
            () = alive.cancelled() => {}
            () = work => {}
        }
    });
}

impl Cluster {
    /// An empty cluster on a healthy network drawing from `seed`; with
    /// `keep_log`, the trace's lines are kept for printing.
    pub fn new(seed: u64, settings: Settings, keep_log: bool) -> Arc<Cluster> {
        Arc::new(Cluster {
            net: Arc::new(Net::new(seed)),
            settings,
            start: Instant::now(),
            controller: Mutex::new(None),
            incarnations: Mutex::new(0),
            trace: Mutex::new((Xxh3::new(), Vec::new(), keep_log)),
            history: Mutex::default(),
            values: Mutex::default(),
            downs: Mutex::default(),
            changes: Mutex::default(),
            published_at: Mutex::default(),
            rings: Mutex::default(),
            started_at: Mutex::default(),
            unready: Mutex::default(),
            regressions: Arc::default(),
            impaired: Mutex::default(),
            presences: Mutex::default(),
            skews: Mutex::default(),
            disks: Mutex::default(),
            losses: Mutex::default(),
            broken_promises: Mutex::default(),
            restarting: Mutex::default(),
            removed: Mutex::default(),
            arrivals: Mutex::default(),
            planted: Mutex::default(),
        })
    }

    /// Simulated milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Adds a line to the trace.
    pub fn event(&self, line: impl AsRef<str>) {
        let line = format!("{:>7} {}", self.now_ms(), line.as_ref());
        let mut trace = lock(&self.trace);
        trace.0.update(line.as_bytes());
        trace.0.update(b"\n");
        if trace.2 {
            trace.1.push(line);
        }
    }

    /// The hash of the whole trace so far, and its lines if kept.
    pub fn trace(&self) -> (u64, Vec<String>) {
        let trace = lock(&self.trace);
        (trace.0.digest(), trace.1.clone())
    }

    /// What the clients did.
    pub fn history(&self) -> MutexGuard<'_, crate::history::History> {
        lock(&self.history)
    }

    /// A value no write of the run had before.
    pub fn fresh_value(&self) -> Bytes {
        let mut n = lock(&self.values);
        *n += 1;
        Bytes::from(format!("v{n}"))
    }

    /// A fault on `host` begins (`"*"`: on every host).
    pub fn impair(&self, host: &str) {
        let now = self.now_ms();
        let mut impaired = lock(&self.impaired);
        let i = impaired.entry(host.to_string()).or_default();
        i.active += 1;
        i.last = now;
    }

    /// A fault on `host` ends.
    pub fn mend(&self, host: &str) {
        let now = self.now_ms();
        let mut impaired = lock(&self.impaired);
        let i = impaired.entry(host.to_string()).or_default();
        i.active = i.active.saturating_sub(1);
        i.last = now;
    }

    /// When owner sets changed (simulated ms).
    pub fn changes(&self) -> Vec<u64> {
        lock(&self.changes).clone()
    }

    /// Counts it as a change of owner sets when the workers do not all
    /// hold the published topology.
    fn note_disagreement(&self) {
        let published = self.published().map(|t| t.epoch);
        let agree = self
            .net
            .procs()
            .iter()
            .all(|(_, p)| Some(p.node.topologies.current().epoch()) == published);
        if !agree {
            self.changed();
        }
    }

    fn changed(&self) {
        let now = self.now_ms();
        lock(&self.changes).push(now);
    }

    /// The DOWNs declared for silence so far.
    pub fn downs(&self) -> Vec<Down> {
        lock(&self.downs).clone()
    }

    /// How long no fault has touched `host`, the controller or the network.
    fn clear_for(&self, host: &str) -> Duration {
        let now = self.now_ms();
        let impaired = lock(&self.impaired);
        let since = [host, CONTROLLER, "*"]
            .iter()
            .filter_map(|h| impaired.get(*h))
            .map(|i| if i.active > 0 { now } else { i.last })
            .max()
            .unwrap_or(0);
        Duration::from_millis(now - since)
    }

    /// The state of things, for a report that the cluster did not settle.
    pub fn describe(&self) -> String {
        let published = self.published();
        let statuses = self.statuses();
        let workers: Vec<String> = self
            .net
            .procs()
            .iter()
            .map(|(id, p)| {
                let ready = match p.node.readiness() {
                    Ok(_) => "ready".to_string(),
                    Err(why) => why.to_string(),
                };
                format!(
                    "{id} {:?} epoch {} {ready}",
                    statuses.get(id),
                    p.node.topologies.current().epoch()
                )
            })
            .collect();
        format!(
            "published epoch {:?}, ring {:?}; {}",
            published.as_ref().map(|t| t.epoch),
            published.map(|t| t.members.into_iter().map(|m| m.id).collect::<Vec<_>>()),
            workers.join("; ")
        )
    }

    fn instant(&self) -> std::time::Instant {
        Instant::now().into_std()
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(EPOCH_MS + self.now_ms())
    }

    // ---- the controller ----

    /// Starts a controller (a new incarnation, knowing nothing).
    pub fn start_controller(self: &Arc<Self>) {
        let incarnation = {
            let mut n = lock(&self.incarnations);
            *n += 1;
            *n
        };
        let alive = CancellationToken::new();
        let membership = Membership::new(
            self.settings.down_after,
            self.settings.grace,
            self.instant(),
        );
        *lock(&self.controller) = Some(Controller {
            membership,
            incarnation,
            published: None,
            pushed: BTreeMap::new(),
            pushing: BTreeSet::new(),
            alive: alive.clone(),
        });
        self.event(format!("controller starts (incarnation {incarnation})"));
        let me = self.clone();
        spawn_in(&alive, async move { me.controller_loop().await });
    }

    /// Stops the controller, if it runs.
    pub fn stop_controller(&self) {
        if let Some(c) = lock(&self.controller).take() {
            c.alive.cancel();
            self.event("controller stops");
        }
    }

    /// Evaluates the detector and publishes, as the controller's heartbeat
    /// thread does every `EVALUATE_EVERY`, and pushes topologies.
    async fn controller_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(kv_controller::heartbeat::EVALUATE_EVERY).await;
            let now = self.instant();
            let (pushes, alive) = {
                let mut guard = lock(&self.controller);
                let Some(c) = guard.as_mut() else { return };
                for change in c.membership.evaluate(now) {
                    let t = change.transition;
                    self.event(format!(
                        "{}: {:?} -> {:?} ({})",
                        change.id, t.from, t.to, t.why
                    ));
                    if t.to == Status::Down && matches!(t.why, Why::Silent(_)) {
                        let down = Down {
                            id: change.id.clone(),
                            at: self.now_ms(),
                            running: self.net.proc(&change.id).is_some(),
                            clear_for: self.clear_for(&change.id),
                        };
                        lock(&self.downs).push(down);
                    }
                }
                if let Some(topology) = c.membership.publish(now) {
                    let ids = |ms: &[Member]| {
                        ms.iter()
                            .map(|m| m.id.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    self.event(format!(
                        "epoch {}: ring [{}] leaving [{}]",
                        topology.epoch,
                        ids(&topology.members),
                        ids(&topology.leaving)
                    ));
                    lock(&self.published_at)
                        .entry(topology.epoch)
                        .or_insert(self.now_ms());
                    lock(&self.rings).push((
                        self.now_ms(),
                        kv_worker::topology::View::new(topology.clone()),
                    ));
                    c.published = Some(topology);
                    self.changed();
                }
                let Some(topology) = c.published.clone() else {
                    continue;
                };
                let mut pushes = Vec::new();
                for member in topology.members.iter().chain(&topology.leaving) {
                    let acked = c.pushed.get(&member.id).copied().unwrap_or(0);
                    if acked < topology.epoch && c.pushing.insert(member.id.clone()) {
                        pushes.push((member.clone(), topology.clone()));
                    }
                }
                (pushes, c.alive.clone())
            };
            for (member, topology) in pushes {
                let me = self.clone();
                spawn_in(&alive, async move { me.push(member, topology).await });
            }
        }
    }

    /// One push of `topology` to `member` (the bus's link, one attempt;
    /// the controller loop tries again while the worker is behind).
    async fn push(self: Arc<Self>, member: Member, topology: Topology) {
        let Some(alive) = lock(&self.controller).as_ref().map(|c| c.alive.clone()) else {
            return;
        };
        let epoch = topology.epoch;
        let call = net::call(
            &self.net,
            CONTROLLER,
            &alive,
            &member,
            Request::Topology(topology),
        );
        let accepted = match tokio::time::timeout(HTTP_TIMEOUT, call).await {
            Ok(Ok(Response::TopologyAccepted { epoch })) => Some(epoch),
            _ => None,
        };
        if accepted.is_none() {
            tokio::time::sleep(RETRY).await;
        }
        let mut guard = lock(&self.controller);
        if let Some(c) = guard.as_mut().filter(|c| c.alive == alive) {
            c.pushing.remove(&member.id);
            if let Some(held) = accepted {
                let acked = c.pushed.entry(member.id.clone()).or_default();
                *acked = (*acked).max(held.min(epoch));
            }
        }
    }

    /// The published topology, if the controller runs and has one.
    pub fn published(&self) -> Option<Topology> {
        lock(&self.controller).as_ref()?.published.clone()
    }

    /// Every worker the controller lists, with its status.
    pub fn statuses(&self) -> BTreeMap<String, Status> {
        let now = self.instant();
        lock(&self.controller)
            .as_ref()
            .map(|c| {
                c.membership
                    .nodes(now)
                    .into_iter()
                    .map(|n| (n.worker.member.id.clone(), n.status))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Carries a request to the controller and its answer back, as the
    /// worker's HTTP client would (a lost one times out); `None` when it
    /// got no answer.
    async fn to_controller<T>(
        &self,
        from: &str,
        datagram: bool,
        handle: impl FnOnce(&mut Controller, std::time::Instant, SystemTime) -> T,
    ) -> Option<T> {
        let exchange = async {
            if !self.net.carry(from, CONTROLLER, datagram).await {
                return None;
            }
            let answer = {
                let mut guard = lock(&self.controller);
                let c = guard.as_mut()?;
                handle(c, self.instant(), self.wall())
            };
            if !self.net.carry(CONTROLLER, from, datagram).await {
                return None;
            }
            Some(answer)
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange)
            .await
            .ok()
            .flatten()
    }

    // ---- workers ----

    /// Starts worker `id` with an empty store: its first start, or a
    /// restart after a crash that lost its copies.
    pub fn start_worker(self: &Arc<Self>, id: &str) {
        self.lose_data(id);
        self.boot(id);
    }

    /// Worker `id`'s data dir is gone (a store in memory, or a dir lost
    /// with its pod): what it held is lost.
    pub fn lose_data(&self, id: &str) {
        if lock(&self.disks).remove(id).is_some() {
            lock(&self.losses).push((id.to_string(), self.now_ms()));
        }
    }

    /// Starts worker `id` again on the data dir its last run left, as
    /// `kv-worker --data-dir` does after a `kill -9`.
    pub fn restart_worker_with_data(self: &Arc<Self>, id: &str) {
        self.boot(id);
    }

    /// Starts worker `id` on its data dir (a new, empty one if it has none).
    fn boot(self: &Arc<Self>, id: &str) {
        let disk = lock(&self.disks)
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(MemStore::new()))
            .clone();
        // What the real worker's open reports: the copies and the newest
        // version among them, which its clock moves past.
        let (mut copies, mut newest) = (0usize, None);
        disk.scan(HashRange::ALL, &mut |_, version| {
            copies += 1;
            newest = newest.max(Some(version));
        });
        let alive = CancellationToken::new();
        let leaving = CancellationToken::new();
        let skew = *lock(&self.skews)
            .entry(id.to_string())
            .or_insert_with(|| self.net.rng().i64(-20..=20));
        let start = self.start;
        let wall: kv_worker::transport::Wall = Arc::new(move || {
            (EPOCH_MS + start.elapsed().as_millis() as u64).saturating_add_signed(skew)
        });
        let transport = Arc::new(SimTransport {
            from: id.to_string(),
            alive: alive.clone(),
            net: self.net.clone(),
        });
        let watch = {
            let (cluster, id) = (Arc::downgrade(self), id.to_string());
            Arc::new(move |change, key: &str, version| {
                let Some(c) = cluster.upgrade() else { return };
                match change {
                    Change::Stored => {
                        let now = c.now_ms();
                        lock(&c.arrivals).insert((id.clone(), key.to_string()), now);
                    }
                    Change::Removed => c.audit_removal(&id, key, version),
                }
            })
        };
        let store: Arc<dyn Store> =
            Arc::new(Audited::new(disk, id, self.regressions.clone()).on_change(watch));
        let node = Arc::new(Node::new(
            id.to_string(),
            store,
            transport,
            wall,
            Limits {
                max_value: kv_wire::DEFAULT_MAX_VALUE_LEN,
                write_timeout: self.settings.write_timeout,
                read_timeout: self.settings.read_timeout,
            },
            leaving,
            alive.clone(),
        ));
        if let Some(newest) = newest {
            node.clock.observe(newest);
        }
        self.net.start(
            id,
            Proc {
                node: node.clone(),
                alive: alive.clone(),
            },
        );
        if copies == 0 {
            self.event(format!("{id} starts"));
        } else {
            self.event(format!("{id} starts with {copies} copies in its data dir"));
        }
        lock(&self.started_at).insert(id.to_string(), self.now_ms());
        self.changed();
        spawn_in(
            &alive,
            kv_worker::rebalance::run(node.clone(), self.settings.anti_entropy, alive.clone()),
        );
        let me = RegisterRequest {
            id: id.to_string(),
            host: id.to_string(),
            port: 8080,
            wire_port: 9090,
            epoch: None,
            generation: None,
            peers: Vec::new(),
            empty: false,
        };
        let presence = Arc::new(Mutex::new(Presence::new(me, self.instant())));
        lock(&self.presences).insert(id.to_string(), presence.clone());
        let wake = Arc::new(Notify::new());
        let (me, id) = (self.clone(), id.to_string());
        let registrar =
            me.clone()
                .registrar(id.clone(), node.clone(), presence.clone(), wake.clone());
        spawn_in(&alive, registrar);
        spawn_in(&alive, me.heartbeats(id, node, presence, wake));
    }

    /// Starts crashed worker `id` again after `lasts`, on its data dir or
    /// empty, and mends its faults.
    pub fn restart_later(self: &Arc<Self>, id: String, lasts: Duration, with_data: bool) {
        *lock(&self.restarting) += 1;
        let c = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(lasts).await;
            if with_data {
                c.restart_worker_with_data(&id);
            } else {
                c.start_worker(&id);
            }
            c.mend(&id);
            *lock(&c.restarting) -= 1;
        });
    }

    /// Crashed workers not started again yet: the checks after healing
    /// wait for them (one restarted with its data brings back old copies
    /// that the rebalance then replaces).
    pub fn restarting(&self) -> usize {
        *lock(&self.restarting)
    }

    /// Kills worker `id` at once (`kill -9`); what it stored stays in its
    /// data dir for [`Cluster::restart_worker_with_data`], and
    /// [`Cluster::start_worker`] starts it without.
    pub fn crash_worker(&self, id: &str) -> bool {
        let crashed = self.net.stop(id);
        if crashed {
            self.event(format!("{id} crashes"));
            self.changed();
        }
        crashed
    }

    /// Ends the run: stops every worker and forgets the data dirs. A
    /// running worker's node reaches the network through its transport,
    /// and the network holds the running workers: without this, every
    /// run's cluster outlived it (a cycle of `Arc`s, 25 MB a seed).
    pub fn tear_down(&self) {
        for (id, _) in self.net.procs() {
            self.net.stop(&id);
        }
        lock(&self.disks).clear();
    }

    /// Does what the worker's registration task does, driven by the same
    /// [`Presence`]: registers (again whenever it asks), and says the
    /// leave once leaving.
    async fn registrar(
        self: Arc<Self>,
        id: String,
        node: Arc<Node>,
        presence: Arc<Mutex<Presence>>,
        wake: Arc<Notify>,
    ) {
        loop {
            if lock(&presence).wants_registration() {
                self.register(&id, &node, &presence).await;
                continue;
            }
            let leave = lock(&presence).leave_to_say();
            if let Some(leave) = leave {
                self.say_leave(&id, leave, &presence).await;
                continue;
            }
            tokio::select! {
                () = wake.notified() => {}
                () = node.leaving.cancelled(), if !lock(&presence).is_leaving() => lock(&presence).leave(),
            }
        }
    }

    /// Does what the worker's heartbeat thread does, driven by the same
    /// [`Presence`]: a heartbeat each interval, its ack fed back, the
    /// registration task woken when the controller restarted.
    async fn heartbeats(
        self: Arc<Self>,
        id: String,
        node: Arc<Node>,
        presence: Arc<Mutex<Presence>>,
        wake: Arc<Notify>,
    ) {
        loop {
            // Unregistered, the thread looks again every 20 ms.
            let every = lock(&presence)
                .beat_settings()
                .map_or(Duration::from_millis(20), |(every, _)| every);
            tokio::time::sleep(every).await;
            self.net.while_paused(&id).await;
            let Some(hb) = lock(&presence).heartbeat(node.topologies.current().epoch()) else {
                continue;
            };
            let answered = self
                .to_controller(&id, true, |c, now, wall| {
                    // A heartbeat showing an older epoch than published
                    // makes the bus push again.
                    if c.membership.heartbeat(&hb, now, wall).lagging {
                        let id = c.membership.id_of(hb.member).unwrap_or_default();
                        c.pushed.remove(id);
                    }
                    HeartbeatAck {
                        epoch: c.published.as_ref().map_or(0, |t| t.epoch),
                        incarnation: c.incarnation,
                    }
                })
                .await;
            if let Some(ack) = answered {
                let at = self.instant();
                if lock(&presence).ack(&ack.seal(&hb, None), None, at) == Ack::Restarted {
                    self.event(format!("{id} registers again: the controller restarted"));
                    wake.notify_one();
                }
            }
            if lock(&presence).silent(self.instant()) {
                self.event(format!("{id} hears no ack: looks the controller up again"));
            }
        }
    }

    async fn register(&self, id: &str, node: &Node, presence: &Mutex<Presence>) {
        loop {
            self.net.while_paused(id).await;
            let reg = lock(presence).registration(
                None,
                &node.topologies.current().topology,
                node.store.is_empty(),
            );
            let heartbeat_interval_ms = self.settings.heartbeat.as_millis() as u64;
            let answer = self
                .to_controller(id, false, |c, now, wall| {
                    c.membership
                        .register(reg, now, wall)
                        .ok()
                        .map(|r| RegisterReply {
                            id: id.to_string(),
                            member: r.member,
                            generation: r.generation,
                            epoch: r.epoch,
                            heartbeat_port: 8001,
                            heartbeat_interval_ms,
                            incarnation: c.incarnation,
                        })
                })
                .await
                .flatten();
            if let Some(reply) = answer {
                self.event(format!("{id} registered, generation {}", reply.generation));
                lock(presence).registered(reply, id.to_string(), self.instant());
                return;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Makes worker `id` leave as SIGTERM does: out of the ring, its keys
    /// handed over, then it exits (after `drain_timeout` at the latest).
    pub fn leave_worker(self: &Arc<Self>, id: &str) -> bool {
        let Some(proc) = self.net.proc(id) else {
            return false;
        };
        if proc.node.leaving.is_cancelled() {
            return false;
        }
        proc.node.leaving.cancel();
        self.event(format!("{id} leaves"));
        let me = self.clone();
        let id = id.to_string();
        spawn_in(&proc.alive.clone(), async move {
            me.drain(id, proc).await;
        });
        true
    }

    /// Makes worker `id` leave as SIGTERM does and start again on its data
    /// dir `after` it exited: a StatefulSet's rolling restart (the same
    /// name, the same volume).
    pub fn leave_and_return(self: &Arc<Self>, id: &str, after: Duration) -> bool {
        if !self.leave_worker(id) {
            return false;
        }
        *lock(&self.restarting) += 1;
        let (c, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            while c.net.proc(&id).is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(after).await;
            c.restart_worker_with_data(&id);
            *lock(&c.restarting) -= 1;
        });
        true
    }

    /// Says the leave [`Presence`] asks for, as the registration task
    /// does (a refused one means register again first).
    async fn say_leave(&self, id: &str, leave: LeaveRequest, presence: &Mutex<Presence>) {
        let took = |c: &mut Controller, now, _| c.membership.leave(&leave, now).is_ok();
        match self.to_controller(id, false, took).await {
            Some(true) => lock(presence).leave_taken(leave.generation),
            Some(false) => lock(presence).unknown(),
            None => tokio::time::sleep(RETRY).await,
        }
    }

    /// Tells the controller that `id` left, as the worker does on its way
    /// out (best effort: silence says the same).
    async fn say_left(&self, id: &str) {
        let left = lock(&self.presences).get(id).and_then(|p| lock(p).left());
        if let Some(left) = left {
            let took = |c: &mut Controller, now, _| c.membership.leave(&left, now).is_ok();
            self.to_controller(id, false, took).await;
        }
    }

    async fn drain(self: Arc<Self>, id: String, proc: Proc) {
        let node = &proc.node;
        let deadline = Instant::now() + self.settings.drain_timeout;
        let outcome = loop {
            let (current, settled) = (node.topologies.current(), node.topologies.settled());
            if let Some(done) = kv_worker::lifecycle::drained(&id, &current, &settled) {
                break Some(done);
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.event(format!("{id} drained: {outcome:?}"));
        self.say_left(&id).await;
        self.net.stop(&id);
        self.event(format!("{id} exits"));
    }

    // ---- clients ----

    /// One client operation through worker `gateway` (as its HTTP handler
    /// runs it), recorded in the history; a crash of the gateway leaves its
    /// outcome unknown.
    pub async fn client_op(self: &Arc<Self>, gateway: &str, key: String, kind: Kind) {
        let Some(proc) = self.net.proc(gateway) else {
            return;
        };
        self.note_disagreement();
        let i = lock(&self.history).invoke(&key, kind.clone(), self.now_ms());
        let what = match &kind {
            Kind::Put(value) => format!("put {key}={}", String::from_utf8_lossy(value)),
            Kind::Delete => format!("delete {key}"),
            Kind::Get => format!("get {key}"),
        };
        // Half the reads are made as the wire client makes them, asking
        // two owners for their own copies; the rest as a worker's HTTP
        // handler, a quorum read the gateway coordinates.
        let by_owners = kind == Kind::Get && self.net.rng().bool();
        let how = if by_owners { " (owners' copies)" } else { "" };
        self.event(format!("op {i} {what} via {gateway}{how}"));
        let (node, began, written) = (proc.node.clone(), self.now_ms(), key.clone());
        let (c, from, alive) = (self.clone(), gateway.to_string(), proc.alive.clone());
        let work = async move {
            match kind {
                Kind::Put(value) => outcome_of_write(node.write(key, Some(value)).await),
                Kind::Delete => outcome_of_write(node.write(key, None).await),
                Kind::Get => {
                    let decided = if by_owners {
                        c.read_owners(&from, &alive, &node, &key).await
                    } else {
                        None
                    };
                    match decided {
                        Some(Ok(copy)) => {
                            Outcome::Read(copy.and_then(|e| e.value.map(|v| (e.version, v))))
                        }
                        Some(Err(e)) => Outcome::Failed(e.to_string()),
                        None => match node.get_quorum(&key).await {
                            Ok(copy) => Outcome::Read(
                                copy.and_then(|c| c.value.map(|value| (c.version, value))),
                            ),
                            Err(e) => Outcome::Failed(e.to_string()),
                        },
                    }
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            () = proc.alive.cancelled() => Outcome::Unknown,
            outcome = work => outcome,
        };
        self.note_disagreement();
        self.finish_op(i, &written, outcome, began);
    }

    /// A read of `key` as the wire client makes it ([`kv_client::read`]):
    /// the first two owners in the view of `from` (where the client is)
    /// asked over the network for their own copies, for at most the
    /// client's hedge; `None` when their answers decide nothing, and the
    /// client would have an owner coordinate the read.
    async fn read_owners(
        &self,
        from: &str,
        alive: &CancellationToken,
        node: &Node,
        key: &str,
    ) -> Option<Result<Option<kv_wire::Entry>, kv_client::ClientError>> {
        let view = node.topologies.current();
        let asks = kv_client::read::asks(&view, key)?;
        let asks = (asks.into_iter())
            .map(|(owner, request)| net::call(&self.net, from, alive, owner, request));
        let answers = tokio::time::timeout(kv_client::client::READ_HEDGE, join_all(asks));
        kv_client::read::decide(answers.await.ok()?)
    }

    /// A bulk write of `keys` through worker `gateway`, as `kvctl load`
    /// sends a batch to a key's primary (`PutMany`): each key a write of a
    /// fresh value in the history; a crash of the gateway leaves every
    /// outcome unknown.
    pub async fn client_bulk(self: &Arc<Self>, gateway: &str, keys: Vec<String>) {
        let Some(proc) = self.net.proc(gateway) else {
            return;
        };
        self.note_disagreement();
        let items: Vec<(String, Bytes)> = keys
            .iter()
            .map(|key| (key.clone(), self.fresh_value()))
            .collect();
        let began = self.now_ms();
        let ops: Vec<usize> = {
            let mut history = lock(&self.history);
            items
                .iter()
                .map(|(key, value)| history.invoke(key, Kind::Put(value.clone()), began))
                .collect()
        };
        let what: Vec<String> = items
            .iter()
            .map(|(key, value)| format!("{key}={}", String::from_utf8_lossy(value)))
            .collect();
        self.event(format!(
            "ops {ops:?} bulk put {} via {gateway}",
            what.join(" ")
        ));
        let node = proc.node.clone();
        let outcomes: Vec<Outcome> = tokio::select! {
            biased;
            () = proc.alive.cancelled() => vec![Outcome::Unknown; ops.len()],
            results = node.put_many(items) => results
                .into_iter()
                .map(|r| match r {
                    Ok(version) => Outcome::Written(version),
                    Err(failure) => Outcome::Failed(failure.message),
                })
                .collect(),
        };
        self.note_disagreement();
        for ((i, key), outcome) in ops.into_iter().zip(&keys).zip(outcomes) {
            self.finish_op(i, key, outcome, began);
        }
    }

    /// Ends operation `i` on `key`, begun at `began`, with `outcome`: an
    /// acknowledged write's copies are audited now, and its third copy
    /// once it is due.
    fn finish_op(self: &Arc<Self>, i: usize, key: &str, outcome: Outcome, began: u64) {
        self.event(format!("op {i}: {outcome:?}"));
        if let Outcome::Written(version) = outcome {
            self.audit_copies(i, key, version, began);
            let (c, key) = (self.clone(), key.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(THIRD_COPY_WITHIN).await;
                c.audit_third_copy(i, &key, version, began);
            });
        }
        lock(&self.history).complete(i, outcome, self.now_ms());
    }

    /// Stores a fresh copy of one of `keys` that worker `id` does not own
    /// (in its view) straight into its store; false if it owns them all.
    /// The copy is written as a client write of unknown outcome would be
    /// (the checks know its value), and [`Cluster::plants_astray`] checks
    /// that it reaches the owners.
    pub fn plant(&self, id: &str, keys: usize) -> bool {
        let Some(proc) = self.net.proc(id) else {
            return false;
        };
        let view = proc.node.topologies.current();
        let foreign: Vec<String> = (0..keys)
            .map(|k| format!("key{k}"))
            .filter(|key| !view.owners(key).iter().any(|m| m.id == id))
            .collect();
        if foreign.is_empty() {
            return false;
        }
        let key = foreign[self.net.rng().usize(0..foreign.len())].clone();
        let value = self.fresh_value();
        let version = proc.node.clock.tick(proc.node.now_ms());
        let copy = kv_worker::store::Stored {
            version,
            value: Some(value.clone()),
        };
        if let Err(e) = proc.node.store.apply(&key, copy) {
            self.event(format!("planting {key} on {id} failed: {e}"));
            return false;
        }
        let now = self.now_ms();
        let i = lock(&self.history).invoke(&key, Kind::Put(value.clone()), now);
        self.event(format!(
            "op {i} planted {key}={} at {version} on {id}, not an owner",
            String::from_utf8_lossy(&value)
        ));
        lock(&self.planted).push(Planted {
            worker: id.to_string(),
            key,
            version,
            at: now,
        });
        true
    }

    /// The planted copies whose key's owners (in the published topology)
    /// do not all hold them or a newer copy, but for those whose planter
    /// lost its copies since: a copy only a non-owner holds must reach the
    /// owners before it is dropped.
    pub fn plants_astray(&self) -> Vec<String> {
        let planted = lock(&self.planted).clone();
        let losses = lock(&self.losses).clone();
        planted
            .into_iter()
            .filter(|p| !losses.iter().any(|(id, at)| *id == p.worker && *at >= p.at))
            .filter_map(|p| {
                let copies = self.copies(&p.key);
                let home = copies
                    .iter()
                    .all(|c| c.as_ref().is_some_and(|(v, _)| *v >= p.version));
                (!home).then(|| {
                    let held: Vec<String> = copies
                        .iter()
                        .map(|c| match c {
                            None => "nothing".into(),
                            Some((v, Some(_))) => v.to_string(),
                            Some((v, None)) => format!("a tombstone at {v}"),
                        })
                        .collect();
                    format!(
                        "{}: the copy at {} planted on {} at {} ms, not an owner, never reached the owners: they hold {}",
                        p.key,
                        p.version,
                        p.worker,
                        p.at,
                        held.join(", ")
                    )
                })
            })
            .collect()
    }

    // ---- the whole ----

    /// Watches every worker's readiness until `stop`: a worker that says it
    /// is ready (`/readyz` 200) at an epoch must hold, of each of `keys` it
    /// owns there, every write acknowledged before that epoch was published
    /// (while no owner set changed during the write) that a sync had to
    /// bring it and a co-owner or leaver holds (the rules are in `audit`):
    /// that is what ready means, and what a rolling restart waits for
    /// before it stops the next worker. Anti-entropy repairs a rebalance
    /// that missed keys sooner or later; this catches it when it claims to
    /// be done.
    pub async fn audit_readiness(self: Arc<Self>, keys: usize, stop: CancellationToken) {
        let mut ready: BTreeMap<String, Option<u64>> = BTreeMap::new();
        while !stop.is_cancelled() {
            tokio::time::sleep(kv_controller::heartbeat::EVALUATE_EVERY).await;
            for (id, proc) in self.net.procs() {
                let now = proc.node.readiness().ok();
                let before = ready.insert(id.clone(), now);
                match now {
                    Some(epoch) if before != Some(Some(epoch)) => {
                        self.audit(&id, &proc, epoch, keys)
                    }
                    _ => {}
                }
            }
        }
    }

    fn audit(&self, id: &str, proc: &Proc, epoch: u64, keys: usize) {
        let Some(at) = lock(&self.published_at).get(&epoch).copied() else {
            return;
        };
        let view = proc.node.topologies.current();
        if view.epoch() != epoch {
            return;
        }
        let changes = self.changes();
        for k in 0..keys {
            let key = format!("key{k}");
            if !view.owners(&key).iter().any(|m| m.id == id) {
                continue;
            }
            // A write of a key this worker owned in every ring published
            // from the one in force when the write was acknowledged to
            // this one reaches it by replication, retried for as long as it
            // owns the key, which goes on after a sync and is not waited
            // for. Any other (an owner left out of a ring meanwhile, or a
            // write from before its last start) is what a sync must bring.
            let started = lock(&self.started_at).get(id).copied().unwrap_or(0);
            let owner_throughout = |done: u64| {
                let rings = lock(&self.rings);
                let first = rings.iter().rposition(|(published, _)| *published <= done);
                first.is_some_and(|first| {
                    rings[first..]
                        .iter()
                        .take_while(|(published, _)| *published <= at)
                        .all(|(_, ring)| ring.owners(&key).iter().any(|m| m.id == id))
                })
            };
            let missed = |op: &crate::history::Op| {
                op.invoked < started || op.done.is_some_and(|done| !owner_throughout(done))
            };
            let Some(owed) = self.history().owed(&key, at, &changes, missed) else {
                continue;
            };
            // Owed only if it could have been had: a co-owner or a leaver
            // held it when the epoch was published, before this worker's
            // sync towards it began. A write whose copies sit only on
            // workers out of the ring (cut off, called DOWN) comes back
            // with them; one only non-owners held reaches the owners by
            // hand-off, which readiness does not wait for.
            let others = view.owners(&key).into_iter().chain(&view.topology.leaving);
            let arrivals = lock(&self.arrivals);
            let reachable = others.filter(|m| m.id != id).any(|m| {
                let held = self
                    .net
                    .proc(&m.id)
                    .and_then(|p| p.node.store.held_version(&key));
                let since = arrivals.get(&(m.id.clone(), key.clone()));
                held.is_some_and(|v| v >= owed) && since.is_some_and(|t| *t <= at)
            });
            drop(arrivals);
            let held = proc.node.store.get(&key).map(|c| c.version);
            if reachable && held.is_none_or(|held| held < owed) {
                let problem = format!(
                    "{id} said it was ready at epoch {epoch} without {key}'s write {owed}, acknowledged before that epoch (it holds {})", held.map_or("nothing".to_string(), |v| v.to_string())
                );
                self.event(&problem);
                lock(&self.unready).push(problem);
            }
        }
    }

    /// What the readiness audit found.
    pub fn unready(&self) -> Vec<String> {
        lock(&self.unready).clone()
    }

    /// W=2: once a write is acknowledged, two workers hold it (or a newer
    /// copy of its key) in their stores or data dirs, or held it and
    /// handed it off (each removal is audited on its own: the key's owners
    /// held it first), unless copies were lost since it began. The client
    /// may hear of a write long after its primary acknowledged it (a
    /// paused worker passing the answer on), and the cluster may have
    /// shrunk to one owner meanwhile: a copy handed off to it still counts.
    /// The blind spot that leaves: a write wrongly acknowledged on one copy
    /// whose primary hands the key off before the client hears of it
    /// passes (the simulator sees an acknowledgement when the client does).
    fn audit_copies(&self, op: usize, key: &str, version: kv_wire::Version, began: u64) {
        if lock(&self.losses).iter().any(|(_, at)| *at >= began) {
            return;
        }
        let mut holders: BTreeSet<String> = lock(&self.disks)
            .iter()
            .filter(|(_, disk)| disk.held_version(key).is_some_and(|held| held >= version))
            .map(|(id, _)| id.clone())
            .collect();
        holders.extend(
            lock(&self.removed)
                .iter()
                .filter(|((_, removed), held)| removed == key && **held >= version)
                .map(|((worker, _), _)| worker.clone()),
        );
        let holders = holders.len();
        if holders < 2 {
            lock(&self.broken_promises).push(format!(
                "op {op}: {key} at {version} acknowledged while {holders} worker(s) held it"
            ));
        }
    }

    /// The third copy is asynchronous but sent at once (and retried): a
    /// write acknowledged while no owner set changed, no owner was leaving
    /// and nothing impaired its owners or the network, from
    /// [`QUIET_BEFORE`] before it began, is on every owner
    /// [`THIRD_COPY_WITHIN`] after it was acknowledged.
    fn audit_third_copy(&self, op: usize, key: &str, version: kv_wire::Version, began: u64) {
        let now = self.now_ms();
        if lock(&self.changes)
            .iter()
            .any(|t| (began..=now).contains(t))
            || lock(&self.losses).iter().any(|(_, at)| *at >= began)
        {
            return;
        }
        let Some(topology) = self.published() else {
            return;
        };
        let view = kv_worker::topology::View::new(topology);
        let owners = view.owners(key);
        let quiet_from = began.saturating_sub(QUIET_BEFORE.as_millis() as u64);
        let touched = {
            let impaired = lock(&self.impaired);
            owners
                .iter()
                .map(|m| m.id.as_str())
                .chain(["*"])
                .any(|host| {
                    impaired
                        .get(host)
                        .is_some_and(|i| i.active > 0 || i.last >= quiet_from)
                })
        };
        // A leaving worker takes no copies, and may still own keys until
        // the controller publishes the ring without it.
        let leaving = owners.iter().any(|m| {
            self.net
                .proc(&m.id)
                .is_none_or(|p| p.node.leaving.is_cancelled())
        });
        if touched || leaving {
            return;
        }
        for owner in owners {
            let held = self
                .net
                .proc(&owner.id)
                .and_then(|p| p.node.store.held_version(key));
            if held.is_none_or(|held| held < version) {
                lock(&self.broken_promises).push(format!(
                    "op {op}: {key} at {version}, acknowledged with nothing in the way, was not on its owner {} {} ms later: it held {}",
                    owner.id,
                    THIRD_COPY_WITHIN.as_millis(),
                    held.map_or("nothing".into(), |h| h.to_string())
                ));
            }
        }
    }

    /// A worker removes a copy only when it hands its keys off, at the end
    /// of a sync towards some view, once every owner of the key there
    /// confirmed it holds that version or a newer one: so each of them
    /// holds it now, or handed it off in turn (in a later view), unless it
    /// lost its copies since that view was published.
    fn audit_removal(&self, worker: &str, key: &str, version: kv_wire::Version) {
        lock(&self.removed)
            .entry((worker.to_string(), key.to_string()))
            .and_modify(|v| *v = (*v).max(version))
            .or_insert(version);
        let Some(proc) = self.net.proc(worker) else {
            return;
        };
        let problem = match proc.node.progress.snapshot((0, 0), 0).0 {
            None => Some(format!(
                "{worker} removed {key} at {version} outside a sync"
            )),
            Some(running) => {
                // The sync's view: the worker's own when it is still at
                // that epoch, else the last published under that number (a
                // restarted controller that never heard of an epoch may
                // publish another topology under it).
                let rings = lock(&self.rings);
                let current = proc.node.topologies.current();
                let view = rings
                    .iter()
                    .rev()
                    .find(|(_, view)| view.epoch() == running.epoch)
                    .map(|(since, view)| {
                        let own = current.epoch() == running.epoch;
                        (since, if own { current.as_ref() } else { view })
                    });
                view.and_then(|(since, view)| {
                    let since = *since;
                    let losses = lock(&self.losses);
                    let disks = lock(&self.disks);
                    let removed = lock(&self.removed);
                    view.owners(key)
                        .into_iter()
                        .filter(|o| !losses.iter().any(|(id, at)| *id == o.id && *at >= since))
                        .find_map(|o| {
                            let held = disks.get(&o.id).and_then(|d| d.held_version(key));
                            let passed_on = removed
                                .get(&(o.id.clone(), key.to_string()))
                                .is_some_and(|r| *r >= version);
                            (!passed_on && held.is_none_or(|h| h < version)).then(|| {
                                format!(
                                    "{worker} removed {key} at {version} in its sync towards epoch {} while its owner {} held {}",
                                    running.epoch,
                                    o.id,
                                    held.map_or("nothing".into(), |h| h.to_string())
                                )
                            })
                        })
                })
            }
        };
        if let Some(problem) = problem {
            lock(&self.broken_promises).push(problem);
        }
    }

    /// Writes acknowledged on fewer than two copies, third copies missing
    /// with nothing in their way, copies removed before their owners held
    /// them.
    pub fn broken_promises(&self) -> Vec<String> {
        lock(&self.broken_promises).clone()
    }

    /// Copies some worker replaced with older ones, at any time.
    pub fn regressions(&self) -> Vec<String> {
        lock(&self.regressions).clone()
    }

    /// Whether the cluster is at rest: the controller runs and lists every
    /// running worker UP in its latest topology (and nothing else), and
    /// every worker holds that topology and is ready in it.
    pub fn settled(&self) -> bool {
        let Some(topology) = self.published() else {
            return false;
        };
        let procs = self.net.procs();
        let running: BTreeSet<&str> = procs
            .iter()
            .filter(|(_, p)| !p.node.leaving.is_cancelled())
            .map(|(id, _)| id.as_str())
            .collect();
        let ring: BTreeSet<&str> = topology.members.iter().map(|m| m.id.as_str()).collect();
        if running != ring || !topology.leaving.is_empty() {
            return false;
        }
        let statuses = self.statuses();
        procs.iter().all(|(id, p)| {
            statuses.get(id) == Some(&Status::Up)
                && p.node.topologies.current().epoch() == topology.epoch
                && p.node.readiness().is_ok()
        })
    }

    /// What each owner (in the published topology) holds of `key`.
    pub fn copies(&self, key: &str) -> Vec<crate::history::Copy> {
        let Some(topology) = self.published() else {
            return Vec::new();
        };
        let view = kv_worker::topology::View::new(topology);
        let copies = view.owners(key).into_iter().map(|m| {
            self.net
                .proc(&m.id)
                .and_then(|p| p.node.store.get(key))
                .map(|c| (c.version, c.value))
        });
        copies.collect()
    }
}

fn outcome_of_write(r: Result<kv_worker::node::Written, kv_worker::node::OpError>) -> Outcome {
    match r {
        Ok(w) => Outcome::Written(w.version),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}
