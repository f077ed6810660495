//! Rebalancing and anti-entropy: carrying out the rules of [`crate::sync`].
//!
//! One task follows the topology. After a change settles (debounced), and
//! every `--anti-entropy-interval` otherwise, it runs one *sync* towards
//! the current view: compare digests of every owned arc with each
//! co-owner and each leaver and pull what is missing here, then hand off
//! the keys this worker does not own (all of them, when it is leaving).
//! A completed sync settles the view: that is what `/readyz` and a
//! leaving worker's drain wait for. A sync after a change repeats its comparisons
//! while they still move data (a co-owner may have been filling up at the
//! first look); a periodic round compares once, paced, and moves nothing
//! when nothing differs. A sync that could not reach a peer, or left keys
//! unconfirmed, is retried with backoff rather than left to the next
//! change. A newer topology interrupts a sync, which starts over towards
//! it: nothing depends on where an earlier one stopped.

use crate::lifecycle::holds_share_at_once;
use crate::node::Node;
use crate::sync::{decide, second_look, Comparisons, Handoff, Look, OfferRounds, PeerArcs, Pull};
use crate::topology::View;
use futures::stream::{self, StreamExt};
use kv_service::Backoff;
use kv_wire::{Digest, Entry, HashRange, Member, Request, Response};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Quiet time after a topology change before acting on it.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest a stream of changes can postpone a rebalance.
const MAX_DEBOUNCE: Duration = Duration::from_secs(3);
/// Ranges per `Compare` request.
const COMPARE_BATCH: usize = 1024;
/// Pulls of arcs in flight per peer (the connection pipelines them).
const PULLS_IN_FLIGHT: usize = 8;
/// Keys per `Fetch` request.
const FETCH_BATCH: usize = 512;
/// Entries per `Offer` or handed-off `Replicate`.
const HANDOFF_BATCH: usize = 1024;
/// `Offer`s in flight per owner during a handoff's round (all owners are
/// offered at once). One at a time, a leaver's round at 1M keys under
/// writes took 12 s, mostly waiting on answers.
const OFFERS_IN_FLIGHT: usize = 4;
/// Comparison passes of a sync after a change, at most.
const MAX_PASSES: usize = 3;
/// Tries of one call before the sync counts the peer as failed.
const CALL_ATTEMPTS: usize = 4;
/// First retry of an incomplete sync; doubles up to the interval.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// After a sync that handed keys off, how long until this worker looks
/// once more for keys it does not own: while the others' rebalances run,
/// writes still send it hints as an owner of their settled view (4,579
/// stray copies on the old owners when a fifth worker joined 4 holding
/// 1M keys under writes), which would otherwise wait for the next
/// anti-entropy round.
const TIDY_AFTER: Duration = Duration::from_secs(5);
/// Pause between `Compare` batches of a periodic round: its cost is
/// spread out, never a burst.
const ROUND_PACE: Duration = Duration::from_millis(20);
/// How long a periodic round waits before each further look at the arcs
/// that differed ([`crate::sync::second_look`]): time for the copies in
/// flight to land (a replication batch takes milliseconds).
const SECOND_LOOK: Duration = Duration::from_millis(250);
/// Further looks at most at an arc that keeps moving before the round
/// leaves it for later.
const LOOKS: usize = 3;
/// Every this many periodic rounds, one compares key by key the arcs that
/// are being written too, so a copy lost in an arc that is never quiet is
/// still repaired (within five minutes at the default interval).
const THOROUGH_EVERY: u64 = 5;

/// Why a sync runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The topology changed.
    Change,
    /// The last sync was incomplete.
    Retry,
    /// The periodic anti-entropy round.
    AntiEntropy,
}

/// What one sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Arcs owned here.
    pub arcs: usize,
    /// Arc comparisons with co-owners.
    pub compared: usize,
    /// Of those, comparisons whose digests differed.
    pub differing: usize,
    /// Of those, arcs a periodic round found being written and left to a
    /// later round.
    pub busy: usize,
    /// Copies pulled and applied here.
    pub pulled: usize,
    /// Bytes of keys and values pulled.
    pub pulled_bytes: usize,
    /// Keys held here that this worker does not own.
    pub foreign: usize,
    /// Copies handed off (values sent to owners lacking them).
    pub handed: usize,
    /// Bytes of keys and values handed off.
    pub handed_bytes: usize,
    /// Foreign keys dropped after every owner confirmed them.
    pub dropped: usize,
    /// Foreign keys kept: some owner has not confirmed them.
    pub kept: usize,
    /// Owned arcs not verified against every co-owner.
    pub unverified: usize,
    /// Calls that failed after retries.
    pub failures: usize,
}

impl Report {
    /// Whether everything was verified and handed off.
    pub fn complete(&self) -> bool {
        self.failures == 0 && self.kept == 0 && self.unverified == 0
    }

    /// Whether a sync for `why` is not worth a log line or a place among
    /// the recent rebalances: a periodic round that found nothing to do.
    pub fn quiet(&self, why: Why) -> bool {
        why == Why::AntiEntropy
            && self.pulled + self.handed == 0
            && self.dropped == 0
            && self.complete()
    }

    fn add_peer(&mut self, p: &PeerReport) {
        self.compared += p.compared;
        self.differing += p.differing;
        self.busy += p.busy;
        self.pulled += p.pulled;
        self.pulled_bytes += p.pulled_bytes;
        self.failures += p.failures;
    }
}

/// Follows topology changes until `shutdown`: a sync after each change
/// settles, and an anti-entropy round every `interval`.
pub async fn run(node: Arc<Node>, interval: Duration, shutdown: CancellationToken) {
    let mut changes = node.topologies.subscribe();
    let mut next_round = Instant::now() + interval;
    let mut backoff = Backoff::new(RETRY_MIN, interval);
    let mut retry_at: Option<Instant> = None;
    let mut tidy_at: Option<Instant> = None;
    // Whether a sync began since the last complete one: until one
    // completes, data may sit anywhere between the views involved.
    let mut unfinished = false;
    let mut rounds: u64 = 0;
    loop {
        let why = tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() || !debounce(&mut changes, &shutdown).await {
                    return;
                }
                Why::Change
            }
            () = sleep_until(retry_at), if retry_at.is_some() => Why::Retry,
            () = tokio::time::sleep_until(next_round) => Why::AntiEntropy,
            () = sleep_until(tidy_at), if tidy_at.is_some() => {
                tidy_at = None;
                tokio::select! {
                    () = tidy(&node) => {}
                    // A newer topology brings a whole sync, handoff included.
                    _ = changes.changed() => changes.mark_changed(),
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            () = shutdown.cancelled() => return,
        };
        let view = changes.borrow_and_update().clone();
        if why == Why::AntiEntropy {
            next_round = Instant::now() + interval;
            rounds += 1;
        }
        if view.topology.members.is_empty() {
            // Nothing to sync towards until a topology with workers comes
            // (a change wakes this loop); a retry left pending would be due
            // at once, every turn, and spin (found by the simulator).
            retry_at = None;
            continue;
        }
        // The next epoch of the same workers (a controller restart), or of
        // them and fresh ones that joined empty, brings this worker nothing,
        // provided its last sync completed: then every arc it keeps was
        // verified with its co-owners. Nor when a worker starts leaving: its
        // keys are to be pulled from it (one called DOWN and then told to
        // stop leaves with the members unchanged). The rules are in
        // `holds_share_at_once`. With workers joined, it is ready at once,
        // and the sync below still runs: it hands the joiners what this
        // worker held in the arcs it lost to them (they pull it as well)
        // and drops it.
        let settled = node.topologies.settled();
        if why == Why::Change
            && !unfinished
            && holds_share_at_once(&settled.topology, &view.topology)
        {
            node.topologies.settle(view.clone());
            if view.topology.fresh.is_empty() {
                continue;
            }
        }
        // Only a round over a view this worker already holds its share of
        // may leave busy arcs for later: one that would settle a view (an
        // earlier sync was cut short) must compare everything.
        let defer_busy = why == Why::AntiEntropy
            && !unfinished
            && settled.epoch() == view.epoch()
            && !rounds.is_multiple_of(THOROUGH_EVERY);
        unfinished = true;
        let began = Instant::now();
        node.progress.begin(view.epoch(), node.now_ms());
        let report = tokio::select! {
            report = sync(&node, &view, why, defer_busy) => report,
            // A newer topology: start over towards it. What was pulled so
            // far stays (copies apply idempotently).
            _ = changes.changed() => {
                info!(to = view.epoch(), "topology changed during a rebalance; starting over");
                node.progress.interrupted();
                changes.mark_changed();
                continue;
            }
            () = shutdown.cancelled() => return,
        };
        let took = began.elapsed();
        record(&node, &view, why, &report, took);
        node.progress.end(why, &report, took, node.now_ms());
        tidy_at =
            (why != Why::AntiEntropy && report.foreign > 0).then(|| Instant::now() + TIDY_AFTER);
        if report.complete() {
            node.topologies.settle(view);
            unfinished = false;
            retry_at = None;
            backoff.reset();
        } else {
            retry_at = Some(Instant::now() + backoff.next_wait());
        }
    }
}

/// The handoff alone, towards the view this worker last settled on: the
/// keys it holds there but does not own reach their owners and are
/// dropped. Logged only when it found some.
async fn tidy(node: &Node) {
    let view = node.topologies.settled();
    if view.epoch() != node.topologies.current().epoch() {
        return;
    }
    let mut report = Report::default();
    hand_off(node, &view, &mut report).await;
    node.metrics.rebalance_dropped.inc_by(report.dropped as u64);
    if report.foreign > 0 {
        info!(
            epoch = view.epoch(),
            foreign = report.foreign,
            handed = report.handed,
            dropped = report.dropped,
            kept = report.kept,
            failures = report.failures,
            "tidied: keys this worker does not own, which arrived after its sync"
        );
    }
}

/// Counts copies moved as they move: a sync cut short by a newer topology
/// reports nothing at its end, and a drain often ends one that way.
fn count_moved(node: &Node, keys: usize, bytes: usize) {
    node.metrics.rebalance_keys.inc_by(keys as u64);
    node.metrics.rebalance_bytes.inc_by(bytes as u64);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for a quiet period after a change, up to a bound; false on
/// shutdown or when the topology source is gone.
async fn debounce(
    changes: &mut tokio::sync::watch::Receiver<Arc<View>>,
    shutdown: &CancellationToken,
) -> bool {
    let started = Instant::now();
    loop {
        let quiet = tokio::time::timeout(DEBOUNCE, changes.changed());
        tokio::select! {
            r = quiet => match r {
                Err(_) => return true,
                Ok(Err(_)) => return false,
                Ok(Ok(())) if started.elapsed() >= MAX_DEBOUNCE => return true,
                Ok(Ok(())) => {}
            },
            () = shutdown.cancelled() => return false,
        }
    }
}

fn record(node: &Node, view: &View, why: Why, r: &Report, took: Duration) {
    let m = &node.metrics;
    let moved = (r.pulled + r.handed) as u64;
    if why == Why::AntiEntropy {
        m.ae_rounds.inc();
        m.ae_arcs_compared.inc_by(r.compared as u64);
        m.ae_arcs_differing.inc_by(r.differing as u64);
        m.ae_arcs_busy.inc_by(r.busy as u64);
        m.ae_keys_repaired.inc_by(moved);
        m.ae_last_ms.set(took.as_millis() as i64);
    } else {
        m.rebalances.inc();
        m.rebalance_last_ms.set(took.as_millis() as i64);
    }
    m.rebalance_dropped.inc_by(r.dropped as u64);
    if !r.quiet(why) {
        info!(
            ?why,
            epoch = view.epoch(),
            arcs = r.arcs,
            compared = r.compared,
            differing = r.differing,
            busy = r.busy,
            pulled = r.pulled,
            pulled_bytes = r.pulled_bytes,
            foreign = r.foreign,
            handed = r.handed,
            dropped = r.dropped,
            kept = r.kept,
            unverified = r.unverified,
            failures = r.failures,
            took_ms = took.as_millis() as u64,
            "sync done"
        );
    }
}

/// One sync of this worker towards `view`; with `defer_busy`, arcs being
/// written during it are left to a later round.
pub async fn sync(node: &Node, view: &View, why: Why, defer_busy: bool) -> Report {
    let plan = Comparisons::new(&node.id, view);
    let mut report = Report {
        arcs: plan.arcs.len(),
        ..Report::default()
    };
    // Comparisons each arc still needs before it counts as verified.
    let mut remaining: Vec<usize> = plan.arcs.iter().map(|(_, n)| *n).collect();
    let unverified = |remaining: &[usize]| remaining.iter().filter(|n| **n > 0).count();
    if why == Why::Change {
        node.metrics
            .arcs_unverified
            .set(unverified(&remaining) as i64);
    }
    let passes = if why == Why::AntiEntropy {
        1
    } else {
        MAX_PASSES
    };
    for pass in 0..passes {
        let pulled_before = report.pulled;
        for phase in &plan.phases {
            let peers = phase
                .values()
                .map(|arcs| sync_peer(node, &plan, arcs, why, defer_busy));
            for peer in futures::future::join_all(peers).await {
                report.add_peer(&peer);
                if pass == 0 {
                    for i in peer.verified {
                        remaining[i] -= 1;
                    }
                }
            }
            if pass == 0 && why == Why::Change {
                node.metrics
                    .arcs_unverified
                    .set(unverified(&remaining) as i64);
            }
        }
        if report.pulled == pulled_before {
            break;
        }
    }
    report.unverified = unverified(&remaining);
    // Only a change makes arcs unverified; a retry or a round can only
    // verify more of them.
    let gauge = &node.metrics.arcs_unverified;
    if why == Why::Change || (report.unverified as i64) < gauge.get() {
        gauge.set(report.unverified as i64);
    }
    hand_off(node, view, &mut report).await;
    report
}

/// What syncing with one peer did.
#[derive(Debug, Default)]
struct PeerReport {
    compared: usize,
    differing: usize,
    busy: usize,
    pulled: usize,
    pulled_bytes: usize,
    failures: usize,
    /// Arcs (indices into the plan) compared, and pulled if they differed.
    verified: Vec<usize>,
}

/// Compares the arcs of `arcs` with its peer, pulling what differs.
async fn sync_peer(
    node: &Node,
    plan: &Comparisons<'_>,
    arcs: &PeerArcs<'_>,
    why: Why,
    defer_busy: bool,
) -> PeerReport {
    let mut report = PeerReport::default();
    let peer = arcs.peer;
    for (batch, chunk) in arcs.arcs.chunks(COMPARE_BATCH).enumerate() {
        if why == Why::AntiEntropy && batch > 0 {
            tokio::time::sleep(ROUND_PACE).await;
        }
        let mut mine: Vec<(HashRange, Digest)> = chunk
            .iter()
            .map(|&i| (plan.arcs[i].0, node.store.digest(plan.arcs[i].0)))
            .collect();
        let compared = match compare(node, peer, &mine).await {
            Some(differ) if defer_busy && !differ.is_empty() => {
                let differing = differ.len();
                look_again(node, peer, &mut mine, differ)
                    .await
                    .map(|(still, busy)| (differing, still, busy))
            }
            differ => differ.map(|differ| (differ.len(), differ, 0)),
        };
        let Some((differing, differ, busy)) = compared else {
            report.failures += 1;
            continue;
        };
        report.compared += chunk.len();
        report.differing += differing;
        report.busy += busy;
        // Each pull with the copies the peer holds beyond ours: what the
        // progress shows still to come.
        let pulls: Vec<_> = differ
            .into_iter()
            .filter_map(|(i, theirs)| {
                let (range, my) = *mine.get(i as usize)?;
                let expected = theirs.count.saturating_sub(my.count);
                match decide(my, theirs) {
                    Pull::Nothing => None,
                    how => Some((i as usize, range, how, expected)),
                }
            })
            .collect();
        node.progress.expect(pulls.iter().map(|p| p.3).sum());
        let mut failed = HashSet::new();
        let mut results = stream::iter(pulls)
            .map(|(i, range, how, expected)| async move {
                (i, expected, pull(node, peer, range, how).await)
            })
            .buffer_unordered(PULLS_IN_FLIGHT);
        while let Some((i, expected, pulled)) = results.next().await {
            let (keys, bytes) = pulled.unwrap_or_default();
            node.progress.pulled(expected, keys as u64, bytes as u64);
            count_moved(node, keys, bytes);
            match pulled {
                Some(_) => {
                    report.pulled += keys;
                    report.pulled_bytes += bytes;
                }
                None => {
                    report.failures += 1;
                    failed.insert(i);
                }
            }
        }
        report.verified.extend(
            chunk
                .iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(i))
                .map(|(_, &arc)| arc),
        );
    }
    report
}

/// The arcs of `mine` whose digest differs at `peer`, with the peer's
/// digest; `None` if the call failed.
async fn compare(
    node: &Node,
    peer: &Member,
    mine: &[(HashRange, Digest)],
) -> Option<Vec<(u32, Digest)>> {
    let request = || Request::Compare {
        ranges: mine.to_vec(),
    };
    call(node, peer, request, |r| match r {
        Response::Compared(differ) => Some(differ),
        _ => None,
    })
    .await
}

/// A periodic round's further looks at the arcs of `mine` that differed
/// (`differ`): a moment later, both sides' digests again, up to
/// [`LOOKS`] times while some moved (another worker's repair moves a
/// digest once; a stream of writes keeps moving it). Returns the arcs
/// that differ at rest, to be pulled (`mine` updated to the digests
/// seen at rest), and how many kept moving: busy, left to a later round.
/// The rest settled.
async fn look_again(
    node: &Node,
    peer: &Member,
    mine: &mut [(HashRange, Digest)],
    differ: Vec<(u32, Digest)>,
) -> Option<(Vec<(u32, Digest)>, usize)> {
    let mut moving: Vec<(usize, (Digest, Digest))> = differ
        .iter()
        .filter_map(|&(i, theirs)| Some((i as usize, (mine.get(i as usize)?.1, theirs))))
        .collect();
    let mut still = Vec::new();
    for _ in 0..LOOKS {
        if moving.is_empty() {
            break;
        }
        tokio::time::sleep(SECOND_LOOK).await;
        let now: Vec<(HashRange, Digest)> = moving
            .iter()
            .map(|&(i, _)| (mine[i].0, node.store.digest(mine[i].0)))
            .collect();
        let mut again: Vec<Option<(Digest, Digest)>> = vec![None; now.len()];
        for (j, theirs) in compare(node, peer, &now).await? {
            if let Some(slot) = again.get_mut(j as usize) {
                *slot = Some((now[j as usize].1, theirs));
            }
        }
        let looked = std::mem::take(&mut moving);
        for ((i, before), again) in looked.into_iter().zip(again) {
            match (second_look(before, again), again) {
                (Look::Differs, _) => {
                    mine[i].1 = before.0;
                    still.push((i as u32, before.1));
                }
                (Look::Busy, Some(now)) => moving.push((i, now)),
                _ => {}
            }
        }
    }
    Some((still, moving.len()))
}

/// Pulls what `how` says of `range` from `peer`: copies applied and their
/// bytes, or `None` if a call failed.
async fn pull(node: &Node, peer: &Member, range: HashRange, how: Pull) -> Option<(usize, usize)> {
    let (mut keys, mut bytes) = (0, 0);
    let mut after: Option<String> = None;
    loop {
        let (got, next) = match how {
            Pull::Nothing => return Some((0, 0)),
            Pull::All => {
                let request = || Request::FetchRange {
                    range,
                    after: after.clone(),
                };
                let (entries, next) = call(node, peer, request, entries_of).await?;
                (node.absorb(entries), next)
            }
            Pull::Diff => {
                let request = || Request::List {
                    range,
                    after: after.clone(),
                };
                let (items, next) = call(node, peer, request, |r| match r {
                    Response::Listed { items, next } => Some((items, next)),
                    _ => None,
                })
                .await?;
                let wanted = node.wanted(&items);
                let wanted: Vec<String> = wanted
                    .into_iter()
                    .filter_map(|i| items.get(i as usize).map(|(k, _)| k.clone()))
                    .collect();
                (fetch(node, peer, wanted).await?, next)
            }
        };
        keys += got.0;
        bytes += got.1;
        match next {
            Some(n) => after = Some(n),
            None => return Some((keys, bytes)),
        }
    }
}

fn entries_of(r: Response) -> Option<(Vec<Entry>, Option<String>)> {
    match r {
        Response::Entries { entries, next } => Some((entries, next)),
        _ => None,
    }
}

/// Fetches `keys` from `peer` and applies them: copies applied and bytes.
async fn fetch(node: &Node, peer: &Member, keys: Vec<String>) -> Option<(usize, usize)> {
    let (mut applied, mut bytes) = (0, 0);
    for chunk in keys.chunks(FETCH_BATCH) {
        let mut rest: &[String] = chunk;
        while !rest.is_empty() {
            let (entries, next) = call(
                node,
                peer,
                || Request::Fetch {
                    keys: rest.to_vec(),
                },
                entries_of,
            )
            .await?;
            let (k, b) = node.absorb(entries);
            applied += k;
            bytes += b;
            // An answer cut short names the last key it considered.
            rest = match next.and_then(|n| rest.iter().position(|k| *k == n)) {
                Some(i) => &rest[i + 1..],
                None => &[],
            };
        }
    }
    Some((applied, bytes))
}

/// Hands off the keys held here that `view` gives to others: offers them
/// to all their owners at once, in rounds (owners pull meanwhile), sends
/// an owner the values it still lacks once it stopped taking them itself
/// ([`OfferRounds`]), and drops each key once every owner confirmed it
/// (unless this worker is leaving).
async fn hand_off(node: &Node, view: &View, report: &mut Report) {
    let mut handoff = Handoff::default();
    for (range, owners) in view.ring.arcs() {
        if owners.contains(&node.id.as_str()) {
            continue;
        }
        let mut keys = Vec::new();
        node.store.scan(range, &mut |key, version| {
            keys.push((key.to_string(), version));
        });
        if !keys.is_empty() {
            handoff.add(owners.iter().map(|o| o.to_string()).collect(), keys);
        }
    }
    report.foreign = handoff.len();
    node.metrics.handoff_pending.set(handoff.len() as i64);
    if handoff.is_empty() {
        return;
    }
    let mut rounds = OfferRounds::default();
    loop {
        let waiting = handoff.waiting();
        let offers = waiting.iter().filter_map(|(owner, keys)| {
            let member = view.member(owner)?;
            Some(offer(node, member, &handoff, keys, rounds.push_to(owner)))
        });
        let mut confirmed = BTreeMap::new();
        for round in futures::future::join_all(offers).await {
            report.failures += round.failures;
            report.handed += round.handed;
            report.handed_bytes += round.handed_bytes;
            confirmed.insert(round.owner.clone(), round.confirmed.len());
            handoff.confirm(&round.owner, round.confirmed);
        }
        node.metrics
            .handoff_pending
            .set(handoff.unconfirmed() as i64);
        match rounds.next(confirmed, handoff.unconfirmed()) {
            Some(pause) => tokio::time::sleep(pause).await,
            None => break,
        }
    }
    // A leaving worker keeps them: it is about to exit, and a durable one
    // that comes back under its id (a StatefulSet's rolling restart) then
    // holds them already and pulls only what changed meanwhile (see
    // `disk::mark_left`). Dropping them would cost a delete per key for
    // nothing: its owners hold them.
    if !node.leaving.is_cancelled() {
        let confirmed: Vec<_> = handoff.confirmed().collect();
        report.dropped += node.store.remove_many_if(&confirmed);
    }
    report.kept = handoff.unconfirmed();
    node.metrics.handoff_pending.set(report.kept as i64);
    if report.kept > 0 {
        warn!(
            keys = report.kept,
            "keys this worker does not own are kept: their owners did not confirm them; retrying"
        );
    }
}

/// What one round of a handoff did with one owner.
#[derive(Debug, Default)]
struct OwnerRound {
    owner: String,
    /// Keys it confirmed: holds them, or took their values.
    confirmed: Vec<usize>,
    /// Values sent to it, and their bytes.
    handed: usize,
    handed_bytes: usize,
    failures: usize,
}

/// One round's offers of `keys` (indices into `handoff`) to `member`, a
/// few at a time; with `push`, the values it lacks are sent too.
async fn offer(
    node: &Node,
    member: &Member,
    handoff: &Handoff,
    keys: &[usize],
    push: bool,
) -> OwnerRound {
    let mut round = OwnerRound {
        owner: member.id.clone(),
        ..OwnerRound::default()
    };
    // Chunks by where they start: a stream of borrowed chunks trips the
    // compiler's check that the spawned sync is `Send` (rust-lang/rust#89976).
    let chunk = |start: usize| &keys[start..keys.len().min(start + HANDOFF_BATCH)];
    let mut answers = stream::iter((0..keys.len()).step_by(HANDOFF_BATCH))
        .map(|start| offer_batch(node, member, handoff, chunk(start)))
        .buffered(OFFERS_IN_FLIGHT);
    while let Some((chunk, wanted)) = answers.next().await {
        let Some(wanted) = wanted else {
            round.failures += 1;
            continue;
        };
        let wanted: HashSet<u32> = wanted.into_iter().collect();
        let (lacking, held): (Vec<_>, Vec<_>) =
            (chunk.iter().copied().enumerate()).partition(|(n, _)| wanted.contains(&(*n as u32)));
        round.confirmed.extend(held.into_iter().map(|(_, i)| i));
        if push && !lacking.is_empty() {
            // Those the store still holds (a purged tombstone is gone).
            let (sent, entries): (Vec<usize>, Vec<Entry>) = (lacking.into_iter())
                .filter_map(|(_, i)| {
                    let key = handoff.key(i).0;
                    let copy = node.store.get(key)?;
                    Some((
                        i,
                        Entry {
                            key: key.to_string(),
                            version: copy.version,
                            value: copy.value,
                        },
                    ))
                })
                .unzip();
            match send(node, member, &entries).await {
                Some(bytes) => {
                    round.handed += entries.len();
                    round.handed_bytes += bytes;
                    round.confirmed.extend(sent);
                }
                None => round.failures += 1,
            }
        }
    }
    round
}

/// Offers `chunk` (indices into `handoff`) to `member`: the chunk, and the
/// positions in it that `member` lacks (`None` if the call failed).
async fn offer_batch<'c>(
    node: &Node,
    member: &Member,
    handoff: &Handoff,
    chunk: &'c [usize],
) -> (&'c [usize], Option<Vec<u32>>) {
    let request = || Request::Offer {
        items: (chunk.iter())
            .map(|&i| handoff.key(i))
            .map(|(key, version)| (key.to_string(), version))
            .collect(),
    };
    let wanted = call(node, member, request, |r| match r {
        Response::Wanted(wanted) => Some(wanted),
        _ => None,
    });
    (chunk, wanted.await)
}

/// Sends handed-off copies to `member`: their bytes, or `None` if it did
/// not take them.
async fn send(node: &Node, member: &Member, entries: &[Entry]) -> Option<usize> {
    if entries.is_empty() {
        return Some(0);
    }
    call(
        node,
        member,
        || Request::Replicate {
            entries: entries.to_vec(),
        },
        |r| matches!(r, Response::Replicated { .. }).then_some(()),
    )
    .await?;
    let bytes = entries.iter().map(Entry::size).sum::<usize>();
    node.progress.handed(entries.len() as u64, bytes as u64);
    count_moved(node, entries.len(), bytes);
    Some(bytes)
}

/// One call, retried a few times while `member` is still in the
/// topology (or leaving it): a connection that broke between batches (a
/// peer's idle timeout, a blip) must not fail the whole sync.
async fn call<T>(
    node: &Node,
    member: &Member,
    request: impl Fn() -> Request,
    accept: impl Fn(Response) -> Option<T>,
) -> Option<T> {
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=CALL_ATTEMPTS {
        let failure = match node.transport.call(member, request(), None).await {
            Ok(response) => match accept(response) {
                Some(value) => return Some(value),
                None => "unexpected answer".to_string(),
            },
            Err(e) => e.to_string(),
        };
        if attempt == CALL_ATTEMPTS || !node.topologies.current().names(member) {
            warn!(peer = %member.id, %failure, "sync call failed; retrying later");
            return None;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    None
}
