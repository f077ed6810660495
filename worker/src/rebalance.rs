//! Rebalancing: when the topology changes, move copies to the workers that
//! now own them, and drop the ones this worker no longer owns.
//!
//! Planning is pure and local: from the view where the data settled and
//! the new view, each worker decides for each key it holds what to do —
//! no request to the controller, no per-key coordination:
//!
//! - the key's *designated sender* is its first previous owner still live
//!   in the same incarnation (every worker computes the same one). It sends
//!   the key to the owners it gained. Every acknowledged write is on the
//!   primary and the first replica, so the designated sender holds it even
//!   when the primary is the worker that died.
//! - when an owner departed, the designated sender also *offers* the key
//!   (key and version only) to the owners that kept it, which take the
//!   value only if they lack it: the async third copy the dead primary
//!   never delivered.
//! - a worker that no longer owns a key offers it to all its new owners and
//!   drops it only once each confirms holding that version or newer. If
//!   some still lack it after a few rounds (the designated sender did not
//!   have it), it sends the value itself.
//!
//! Changes are debounced: a worker that flaps DOWN and UP within the quiet
//! period moves nothing.

use crate::node::Node;
use crate::store::Stored;
use crate::topology::View;
use kv_wire::{Entry, Member, Request, Response, Version};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Quiet time after a topology change before acting on it.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest a stream of changes can postpone a rebalance.
const MAX_DEBOUNCE: Duration = Duration::from_secs(3);
/// Entries per `Replicate` or `Offer` frame.
const BATCH: usize = 1024;
/// Rounds of offers before a non-designated holder sends values itself.
const OFFER_ROUNDS: usize = 3;
/// Tries of one rebalancing call before leaving it to the next rebalance.
const CALL_ATTEMPTS: usize = 4;
/// Pause between offer rounds, giving designated senders time to deliver.
const OFFER_PAUSE: Duration = Duration::from_millis(500);

/// What to do with one key held here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyPlan<'a> {
    /// Send the value to these.
    pub send: Vec<&'a Member>,
    /// Offer the version to these; send the value to those that lack it.
    pub offer: Vec<&'a Member>,
    /// This worker no longer owns the key: drop it once every new owner
    /// confirmed it.
    pub drop: bool,
    /// This worker is the key's designated sender.
    pub designated: bool,
}

/// The plan for `key`, held by `me`, when data moves from `from` to `to`.
pub fn plan_key<'a>(me: &str, from: &View, to: &'a View, key: &str) -> KeyPlan<'a> {
    let new_owners = to.owners(key);
    let old_owners = from.owners(key);
    let continuing = |m: &Member| to.has(m);
    let was_owner = |m: &Member| {
        old_owners
            .iter()
            .any(|o| o.id == m.id && o.generation == m.generation)
    };
    let drop = !new_owners.iter().any(|m| m.id == me);
    let designated = old_owners
        .iter()
        .find(|m| continuing(m))
        .map(|m| m.id.as_str());
    let departed = old_owners.iter().any(|m| !continuing(m));
    let others = new_owners.iter().copied().filter(|m| m.id != me);
    match designated {
        Some(d) if d == me => KeyPlan {
            send: others.clone().filter(|m| !was_owner(m)).collect(),
            offer: if departed || drop {
                others.filter(|m| was_owner(m)).collect()
            } else {
                Vec::new()
            },
            drop,
            designated: true,
        },
        // Nobody who held the key before is left to send it (or this
        // worker's view of the past is not shared): offer it to every owner.
        None => KeyPlan {
            offer: others.collect(),
            drop,
            ..KeyPlan::default()
        },
        Some(_) if drop => KeyPlan {
            offer: others.collect(),
            drop,
            ..KeyPlan::default()
        },
        Some(_) => KeyPlan::default(),
    }
}

/// Whether two views hold the same members in the same incarnations (then
/// no data needs to move, whatever the epochs).
fn same_members(a: &View, b: &View) -> bool {
    a.topology.members == b.topology.members
}

/// What one rebalance did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Keys examined.
    pub keys: usize,
    /// Values sent.
    pub sent: usize,
    /// Bytes of keys and values sent.
    pub bytes: usize,
    /// Keys offered.
    pub offered: usize,
    /// Keys dropped after confirmation.
    pub dropped: usize,
}

/// Follows topology changes until `shutdown`, rebalancing after each
/// settles.
pub async fn run(node: Arc<Node>, shutdown: CancellationToken) {
    let mut changes = node.topologies.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
        // Debounce: wait for a quiet period, up to a bound.
        let started = Instant::now();
        loop {
            let quiet = tokio::time::timeout(DEBOUNCE, changes.changed());
            tokio::select! {
                r = quiet => match r {
                    Err(_) => break,
                    Ok(Err(_)) => return,
                    Ok(Ok(())) if started.elapsed() >= MAX_DEBOUNCE => break,
                    Ok(Ok(())) => {}
                },
                () = shutdown.cancelled() => return,
            }
        }
        let to = changes.borrow_and_update().clone();
        let from = node.topologies.settled();
        if same_members(&from, &to) {
            node.topologies.settle(to);
            continue;
        }
        let began = Instant::now();
        tokio::select! {
            summary = rebalance(&node, &from, &to) => {
                let took = began.elapsed();
                node.topologies.settle(to.clone());
                let m = &node.metrics;
                m.rebalances.inc();
                m.rebalance_keys.inc_by(summary.sent as u64);
                m.rebalance_bytes.inc_by(summary.bytes as u64);
                m.rebalance_dropped.inc_by(summary.dropped as u64);
                m.rebalance_last_ms.set(took.as_millis() as i64);
                m.rebalance_pending.set(0);
                info!(from = from.epoch(), to = to.epoch(), keys = summary.keys, sent = summary.sent, bytes = summary.bytes, offered = summary.offered, dropped = summary.dropped, took_ms = took.as_millis() as u64, "rebalance done");
            }
            // A newer topology: start over from the settled view towards it.
            // What was sent so far is harmless (copies apply idempotently).
            _ = changes.changed() => {
                info!(to = to.epoch(), "topology changed during a rebalance; starting over");
                changes.mark_changed();
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Offered `(key, version)` pairs.
type Offers = Vec<(String, Version)>;

/// Per-target batches of the keys of one shard.
#[derive(Default)]
struct Batches<'a> {
    send: HashMap<&'a str, (&'a Member, Vec<Entry>)>,
    offer: HashMap<&'a str, (&'a Member, Offers)>,
}

/// Moves what `from` -> `to` requires of this worker's keys.
pub async fn rebalance(node: &Node, from: &View, to: &View) -> Summary {
    let mut summary = Summary::default();
    let mut pending_keys: i64 = node.store.stats().0 as i64;
    // Keys to drop, with the owners that have not yet confirmed them.
    let mut unconfirmed: HashMap<String, (Version, HashSet<String>)> = HashMap::new();
    // Offered keys some owner lacked, for later rounds: key -> copy.
    let mut lacking: HashMap<String, (Stored, bool)> = HashMap::new();
    for shard in 0..node.store.shards() {
        let snapshot = node.store.snapshot(shard);
        pending_keys -= snapshot.len() as i64;
        node.metrics.rebalance_pending.set(pending_keys.max(0));
        let mut batches = Batches::default();
        let mut copies: HashMap<&str, (&Stored, bool)> = HashMap::new();
        for (key, copy) in &snapshot {
            summary.keys += 1;
            let plan = plan_key(&node.id, from, to, key);
            if plan.send.is_empty() && plan.offer.is_empty() && !plan.drop {
                continue;
            }
            copies.insert(key, (copy, plan.designated));
            let entry = || Entry {
                key: key.clone(),
                version: copy.version,
                value: copy.value.clone(),
            };
            for m in &plan.send {
                batches
                    .send
                    .entry(&m.id)
                    .or_insert_with(|| (m, Vec::new()))
                    .1
                    .push(entry());
            }
            for m in &plan.offer {
                batches
                    .offer
                    .entry(&m.id)
                    .or_insert_with(|| (m, Vec::new()))
                    .1
                    .push((key.clone(), copy.version));
            }
            if plan.drop {
                let owners = to
                    .owners(key)
                    .iter()
                    .filter(|m| m.id != node.id)
                    .map(|m| m.id.clone())
                    .collect();
                unconfirmed.insert(key.clone(), (copy.version, owners));
            }
        }
        // Values first, then offers: an owner that just received a value
        // confirms it when offered.
        for (member, entries) in batches.send.into_values() {
            for chunk in entries.chunks(BATCH) {
                if send(node, member, chunk.to_vec(), &mut summary).await {
                    confirm(
                        &mut unconfirmed,
                        &member.id,
                        chunk.iter().map(|e| e.key.as_str()),
                    );
                }
            }
        }
        for (member, items) in batches.offer.into_values() {
            for chunk in items.chunks(BATCH) {
                summary.offered += chunk.len();
                let Some(wanted) = offer(node, member, chunk.to_vec()).await else {
                    continue;
                };
                let wanted: HashSet<u32> = wanted.into_iter().collect();
                let (mut now, mut held) = (Vec::new(), Vec::new());
                for (i, (key, _)) in chunk.iter().enumerate() {
                    if !wanted.contains(&(i as u32)) {
                        held.push(key.as_str());
                    } else if let Some(&(copy, designated)) = copies.get(key.as_str()) {
                        if designated {
                            now.push(Entry {
                                key: key.clone(),
                                version: copy.version,
                                value: copy.value.clone(),
                            });
                        } else {
                            lacking.insert(key.clone(), (copy.clone(), false));
                        }
                    }
                }
                confirm(&mut unconfirmed, &member.id, held.into_iter());
                if !now.is_empty() && send(node, member, now.clone(), &mut summary).await {
                    confirm(
                        &mut unconfirmed,
                        &member.id,
                        now.iter().map(|e| e.key.as_str()),
                    );
                }
            }
        }
    }
    // Later rounds for keys some owner lacked: offer again (a designated
    // sender may have delivered since); in the last round send the values.
    for round in 1..=OFFER_ROUNDS {
        let waiting: Vec<(String, Version, Vec<String>)> = unconfirmed
            .iter()
            .filter(|(_, (_, owners))| !owners.is_empty())
            .map(|(k, (v, owners))| (k.clone(), *v, owners.iter().cloned().collect()))
            .collect();
        if waiting.is_empty() {
            break;
        }
        tokio::time::sleep(OFFER_PAUSE).await;
        let last = round == OFFER_ROUNDS;
        let mut per_owner: HashMap<String, Vec<(String, Version)>> = HashMap::new();
        for (key, version, owners) in waiting {
            for owner in owners {
                per_owner
                    .entry(owner)
                    .or_default()
                    .push((key.clone(), version));
            }
        }
        for (owner, items) in per_owner {
            let Some(member) = to.member(&owner) else {
                continue;
            };
            for chunk in items.chunks(BATCH) {
                let Some(wanted) = offer(node, member, chunk.to_vec()).await else {
                    continue;
                };
                let wanted: HashSet<u32> = wanted.into_iter().collect();
                let held = chunk
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !wanted.contains(&(*i as u32)))
                    .map(|(_, (k, _))| k.as_str());
                confirm(&mut unconfirmed, &owner, held);
                if last {
                    let entries: Vec<Entry> = chunk
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| wanted.contains(&(*i as u32)))
                        .filter_map(|(_, (k, _))| {
                            node.store.get(k).map(|c| Entry {
                                key: k.clone(),
                                version: c.version,
                                value: c.value,
                            })
                        })
                        .collect();
                    if !entries.is_empty()
                        && send(node, member, entries.clone(), &mut summary).await
                    {
                        confirm(
                            &mut unconfirmed,
                            &owner,
                            entries.iter().map(|e| e.key.as_str()),
                        );
                    }
                }
            }
        }
    }
    for (key, (version, owners)) in &unconfirmed {
        if owners.is_empty() && node.store.remove_if(key, *version) {
            summary.dropped += 1;
        }
    }
    let kept = unconfirmed
        .values()
        .filter(|(_, owners)| !owners.is_empty())
        .count();
    if kept > 0 {
        warn!(
            keys = kept,
            "keys this worker no longer owns are kept: their new owners did not confirm them"
        );
    }
    summary
}

fn confirm<'k>(
    unconfirmed: &mut HashMap<String, (Version, HashSet<String>)>,
    owner: &str,
    keys: impl Iterator<Item = &'k str>,
) {
    for key in keys {
        if let Some((_, owners)) = unconfirmed.get_mut(key) {
            owners.remove(owner);
        }
    }
}

async fn send(node: &Node, member: &Member, entries: Vec<Entry>, summary: &mut Summary) -> bool {
    let count = entries.len();
    let bytes: usize = entries
        .iter()
        .map(|e| e.key.len() + e.value.as_ref().map_or(0, |v| v.len()))
        .sum();
    let sent = call(
        node,
        member,
        || Request::Replicate {
            entries: entries.clone(),
        },
        |r| matches!(r, Response::Replicated { .. }).then_some(()),
    )
    .await;
    if sent.is_some() {
        summary.sent += count;
        summary.bytes += bytes;
    }
    sent.is_some()
}

async fn offer(node: &Node, member: &Member, items: Vec<(String, Version)>) -> Option<Vec<u32>> {
    call(
        node,
        member,
        || Request::Offer {
            items: items.clone(),
        },
        |r| match r {
            Response::Wanted(wanted) => Some(wanted),
            _ => None,
        },
    )
    .await
}

/// One rebalancing call, retried a few times while `member` is still in
/// the topology: a connection that broke between batches (a peer's idle
/// timeout, a blip) must not leave keys behind until the next change.
async fn call<T>(
    node: &Node,
    member: &Member,
    request: impl Fn() -> Request,
    accept: impl Fn(Response) -> Option<T>,
) -> Option<T> {
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=CALL_ATTEMPTS {
        let answer = node.pool.call(member, request()).await;
        let failure = match answer {
            Ok(response) => match accept(response) {
                Some(value) => return Some(value),
                None => "unexpected answer".to_string(),
            },
            Err(e) => e.to_string(),
        };
        if attempt == CALL_ATTEMPTS || !node.topologies.current().has(member) {
            warn!(peer = %member.id, %failure, "rebalance call failed; the next rebalance retries");
            return None;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_wire::Topology;

    fn member(id: &str, generation: u64) -> Member {
        Member {
            id: id.into(),
            host: "h".into(),
            port: 1,
            wire_port: 2,
            generation,
        }
    }

    fn view(epoch: u64, members: &[(&str, u64)]) -> View {
        View::new(Topology {
            epoch,
            members: members.iter().map(|(id, g)| member(id, *g)).collect(),
        })
    }

    fn ids<'a>(members: &[&'a Member]) -> Vec<&'a str> {
        members.iter().map(|m| m.id.as_str()).collect()
    }

    /// A key whose owners under `from` start with `first`.
    fn key_led_by(from: &View, first: &str) -> String {
        (0..)
            .map(|i| format!("key:{i}"))
            .find(|k| from.owners(k)[0].id == first)
            .unwrap()
    }

    #[test]
    fn when_a_primary_dies_its_first_replica_sends_to_the_new_owner_and_offers_to_the_other() {
        let from = view(1, &[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1)]);
        let to = view(2, &[("w2", 1), ("w3", 1), ("w4", 1)]);
        let key = key_led_by(&from, "w1");
        let old: Vec<String> = from.owners(&key).iter().map(|m| m.id.clone()).collect();
        let (r1, r2) = (old[1].as_str(), old[2].as_str());
        let gained = to
            .owners(&key)
            .iter()
            .map(|m| m.id.clone())
            .find(|id| !old.contains(id))
            .unwrap();

        let plan = plan_key(r1, &from, &to, &key);
        assert!(plan.designated && !plan.drop);
        assert_eq!(ids(&plan.send), [gained.as_str()]);
        assert_eq!(ids(&plan.offer), [r2]);
        // The second replica leaves it to the first.
        assert_eq!(plan_key(r2, &from, &to, &key), KeyPlan::default());
    }

    #[test]
    fn when_a_worker_joins_the_primary_sends_and_the_displaced_owner_offers_then_drops() {
        let from = view(1, &[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1)]);
        let to = view(2, &[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1), ("w5", 1)]);
        let key = (0..)
            .map(|i| format!("key:{i}"))
            .find(|k| to.owners(k).iter().any(|m| m.id == "w5"))
            .unwrap();
        let old: Vec<&str> = from.owners(&key).iter().map(|m| m.id.as_str()).collect();
        let new: Vec<&str> = to.owners(&key).iter().map(|m| m.id.as_str()).collect();
        let displaced = *old.iter().find(|id| !new.contains(id)).unwrap();

        let designated = plan_key(old[0], &from, &to, &key);
        assert!(designated.designated);
        assert_eq!(ids(&designated.send), ["w5"]);
        if displaced != old[0] {
            let plan = plan_key(displaced, &from, &to, &key);
            assert!(plan.drop && !plan.designated && plan.send.is_empty());
            let mut offered = ids(&plan.offer);
            offered.sort_unstable();
            let mut expected = new.clone();
            expected.sort_unstable();
            assert_eq!(offered, expected);
        }
        // Owners that stay owners and are not designated do nothing.
        for id in new.iter().filter(|id| **id != old[0] && **id != "w5") {
            assert_eq!(plan_key(id, &from, &to, &key), KeyPlan::default(), "{id}");
        }
    }

    #[test]
    fn a_restarted_worker_with_the_same_id_is_sent_its_share_as_if_new() {
        let from = view(1, &[("w1", 1), ("w2", 1), ("w3", 1)]);
        let to = view(2, &[("w1", 1), ("w2", 2), ("w3", 1)]);
        let key = key_led_by(&from, "w1");
        let plan = plan_key("w1", &from, &to, &key);
        assert_eq!(ids(&plan.send), ["w2"]);
        assert!(!plan.drop);
    }

    #[test]
    fn nothing_moves_when_the_members_are_unchanged() {
        let from = view(1, &[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1)]);
        let to = view(7, &[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1)]);
        assert!(same_members(&from, &to));
        for i in 0..200 {
            let key = format!("key:{i}");
            for me in from.owners(&key).iter().map(|m| m.id.as_str()) {
                let plan = plan_key(me, &from, &to, &key);
                assert!(
                    plan.send.is_empty() && plan.offer.is_empty() && !plan.drop,
                    "{me} {key}: {plan:?}"
                );
            }
        }
    }

    #[test]
    fn exactly_one_holder_sends_each_key_to_each_gained_owner() {
        let from = view(1, &[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1), ("w5", 1)]);
        let to = view(2, &[("w1", 1), ("w2", 1), ("w4", 1), ("w5", 1), ("w6", 1)]);
        for i in 0..2000 {
            let key = format!("key:{i}");
            let holders = from.owners(&key);
            let mut sent: HashMap<String, usize> = HashMap::new();
            for h in &holders {
                for m in plan_key(&h.id, &from, &to, &key).send {
                    *sent.entry(m.id.clone()).or_default() += 1;
                }
            }
            let gained: Vec<String> = to
                .owners(&key)
                .iter()
                .filter(|m| !holders.iter().any(|h| h.id == m.id))
                .map(|m| m.id.clone())
                .collect();
            for g in &gained {
                assert_eq!(sent.get(g), Some(&1), "{key}: {g} from {sent:?}");
            }
            assert_eq!(sent.len(), gained.len(), "{key}: {sent:?} vs {gained:?}");
        }
    }
}
