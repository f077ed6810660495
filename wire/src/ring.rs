//! The consistent-hash ring: which workers own a key.
//!
//! Every process (controller, workers, kvctl) builds the ring from the same
//! list of live worker ids and must get the same answer, so it hashes with
//! xxh3 — stable across platforms, releases and processes — never with
//! `std::hash`, whose output may change between Rust versions and is seeded
//! per process. Golden vectors in the tests pin the layout.
//!
//! Each worker places [`Ring::DEFAULT_VNODES`] virtual nodes on a 64-bit
//! circle at `xxh3(id, seed = i)`. A key hashes to `xxh3(key)`; its owners
//! are the first `n` distinct workers met walking clockwise from there, the
//! first of them the primary. Walking the ring for replicas (as Cassandra and
//! Dynamo do) keeps movement minimal: adding or removing a worker changes
//! only the owner sets that worker enters or leaves.

use crate::digest::HashRange;
use std::borrow::Cow;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Owners precomputed per arc: lookups for up to this many owners (the
/// replication factor) are one binary search and one read, no walk.
const PRECOMPUTED: usize = crate::REPLICATION_FACTOR;
/// Padding in a precomputed arc of a ring with fewer workers.
const NONE: u32 = u32::MAX;

/// A consistent-hash ring over a set of worker ids (empty by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// Worker ids, sorted and distinct; tokens point into this list.
    nodes: Vec<String>,
    /// Token positions, sorted (ties broken by node index).
    tokens: Vec<u64>,
    /// The node (index into `nodes`) of each token.
    token_nodes: Vec<u32>,
    /// The first [`PRECOMPUTED`] distinct owners walking clockwise from each
    /// token, padded with [`NONE`].
    arcs: Vec<[u32; PRECOMPUTED]>,
    /// Where to look up a hash: entry `p` is the first token at or above
    /// the hashes whose top [`Ring::index_bits`] bits are `p` (one entry
    /// more at the end). A lookup then searches a couple of tokens, not the
    /// whole list: a binary search over the 8,192 tokens of 4 workers missed
    /// the cache at nearly every step on a busy machine, and was 3% of all
    /// CPU in a 90/10 benchmark (mostly the client's).
    index: Vec<u32>,
}

impl Ring {
    /// Virtual nodes per worker by default. Measured over every ring size
    /// from 4 to 64 workers, the busiest primary owns 1.06x the mean share at
    /// 2048 (1.10x at 1024, 1.14x at 256); a ring of 64 workers is still only
    /// 2 MiB of tokens and is rebuilt only when membership changes.
    pub const DEFAULT_VNODES: u32 = 2048;

    /// A ring over `ids` (duplicates ignored, order irrelevant) with the
    /// default number of virtual nodes.
    pub fn new<I, S>(ids: I) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ring::with_vnodes(ids, Ring::DEFAULT_VNODES)
    }

    /// A ring with `vnodes` virtual nodes per worker (at least one).
    pub fn with_vnodes<I, S>(ids: I, vnodes: u32) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut nodes: Vec<String> = ids.into_iter().map(Into::into).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let vnodes = vnodes.max(1);
        let mut placed = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (index, id) in (0u32..).zip(&nodes) {
            for v in 0..vnodes {
                placed.push((xxh3_64_with_seed(id.as_bytes(), u64::from(v)), index));
            }
        }
        placed.sort_unstable();
        let (tokens, token_nodes): (Vec<u64>, Vec<u32>) = placed.into_iter().unzip();
        let want = PRECOMPUTED.min(nodes.len());
        let arcs = (0..tokens.len())
            .map(|start| {
                let mut arc = [NONE; PRECOMPUTED];
                let mut found = 0;
                for &node in token_nodes[start..].iter().chain(&token_nodes[..start]) {
                    if found == want {
                        break;
                    }
                    if !arc[..found].contains(&node) {
                        arc[found] = node;
                        found += 1;
                    }
                }
                arc
            })
            .collect();
        let bits = Ring::index_bits(tokens.len());
        let index = (0..=1u64 << bits)
            .map(|p| match p < 1 << bits {
                true => tokens.partition_point(|&t| t < p << (64 - bits)) as u32,
                false => tokens.len() as u32,
            })
            .collect();
        Ring {
            nodes,
            tokens,
            token_nodes,
            arcs,
            index,
        }
    }

    /// Bits of a hash that pick its entry in the index: about two tokens
    /// an entry, at most 2^16 entries.
    fn index_bits(tokens: usize) -> u32 {
        (tokens / 2).max(1).ilog2().clamp(1, 16)
    }

    /// The first token at or above `hash`, wrapping past the top to the
    /// first token (the ring must have tokens).
    fn successor(&self, hash: u64) -> usize {
        let p = (hash >> (64 - Ring::index_bits(self.tokens.len()))) as usize;
        let (from, to) = (self.index[p] as usize, self.index[p + 1] as usize);
        (from + self.tokens[from..to].partition_point(|&t| t < hash)) % self.tokens.len()
    }

    /// The worker ids on the ring, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Whether the ring has no workers (every lookup then yields nothing).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether `id` is one of the ring's workers.
    pub fn contains(&self, id: &str) -> bool {
        self.nodes.binary_search_by(|n| n.as_str().cmp(id)).is_ok()
    }

    /// The hash that places `key` on the ring.
    pub fn key_hash(key: &[u8]) -> u64 {
        xxh3_64(key)
    }

    /// Up to `n` distinct owners of `key`, primary first. Fewer than `n` only
    /// when the ring has fewer than `n` workers.
    pub fn owners(&self, key: &[u8], n: usize) -> Vec<&str> {
        self.owner_indices(Ring::key_hash(key), n)
            .iter()
            .map(|&i| self.nodes[i as usize].as_str())
            .collect()
    }

    /// The primary owner of `key`, if the ring has any worker.
    pub fn primary(&self, key: &[u8]) -> Option<&str> {
        self.primary_index(Ring::key_hash(key))
            .map(|i| self.nodes[i as usize].as_str())
    }

    /// Whether `id` is among the first `n` owners of `key`.
    pub fn is_owner(&self, key: &[u8], n: usize, id: &str) -> bool {
        self.owners(key, n).contains(&id)
    }

    /// Each worker's share of the circle as primary, in [`Ring::nodes`]
    /// order (fractions summing to 1; empty for an empty ring). A token
    /// owns the hashes from the previous token (exclusive) up to itself.
    pub fn primary_shares(&self) -> Vec<f64> {
        let mut widths = vec![0u128; self.nodes.len()];
        let Some(&last) = self.tokens.last() else {
            return Vec::new();
        };
        let mut previous = last;
        for (i, (&token, &node)) in self.tokens.iter().zip(&self.token_nodes).enumerate() {
            // The first token also owns the wrap from above the last one.
            let width = if i == 0 {
                (1u128 << 64) - u128::from(last) + u128::from(token)
            } else {
                u128::from(token - previous)
            };
            widths[node as usize] += width;
            previous = token;
        }
        let whole = (1u128 << 64) as f64;
        widths.iter().map(|&w| w as f64 / whole).collect()
    }

    /// The share of the circle (0 to 1) whose owners ([`Ring::arcs`]) are
    /// all ones `gone` names.
    pub fn share_owned_only_by(&self, gone: impl Fn(&str) -> bool) -> f64 {
        let width: u128 = self
            .arcs()
            .into_iter()
            .filter(|(_, owners)| owners.iter().all(|o| gone(o)))
            .map(|(range, _)| u128::from(range.end - range.start) + 1)
            .sum();
        width as f64 / (1u128 << 64) as f64
    }

    /// The circle cut into `segments` equal parts, and the primary of
    /// each part's midpoint as an index into [`Ring::nodes`]: a picture of
    /// the ring small enough to draw (empty for an empty ring).
    pub fn picture(&self, segments: usize) -> Vec<u32> {
        if self.tokens.is_empty() || segments == 0 {
            return Vec::new();
        }
        let step = (1u128 << 64) / segments as u128;
        (0..segments as u128)
            .map(|i| {
                let mid = (i * step + step / 2) as u64;
                self.token_nodes[self.successor(mid)]
            })
            .collect()
    }

    /// The circle cut into arcs, each a [`HashRange`] with its owners
    /// (primary first, up to the replication factor), in hash order. Every
    /// hash lies in exactly one; a key's owners are those of the arc holding
    /// `key_hash(key)`. Tokens that coincide make no empty arc, and the arc
    /// that wraps past the top comes as two ranges (at both ends).
    pub fn arcs(&self) -> Vec<(HashRange, Vec<&str>)> {
        let Some(&last) = self.tokens.last() else {
            return Vec::new();
        };
        let owners = |i: usize| -> Vec<&str> {
            self.arcs[i]
                .iter()
                .take_while(|&&n| n != NONE)
                .map(|&n| self.nodes[n as usize].as_str())
                .collect()
        };
        let mut arcs = Vec::with_capacity(self.tokens.len() + 1);
        let mut start = 0u64;
        for (i, &token) in self.tokens.iter().enumerate() {
            if i == 0 || token >= start {
                arcs.push((HashRange { start, end: token }, owners(i)));
            }
            match token.checked_add(1) {
                Some(next) => start = next,
                None => return arcs,
            }
        }
        // Hashes above the last token wrap to the first token's owners.
        if last < u64::MAX {
            arcs.push((
                HashRange {
                    start: last + 1,
                    end: u64::MAX,
                },
                owners(0),
            ));
        }
        arcs
    }

    /// The index into [`Ring::nodes`] of the primary of the key hashing to
    /// `hash`: [`Ring::owner_indices`]' first, without a list (a client
    /// routing a write looks up only the primary).
    pub(crate) fn primary_index(&self, hash: u64) -> Option<u32> {
        (!self.nodes.is_empty()).then(|| self.arcs[self.successor(hash)][0])
    }

    /// Indices into [`Ring::nodes`] of up to `n` distinct owners of the key
    /// hashing to `hash`, primary first: borrowed from the precomputed arcs
    /// for the replication factor or fewer (every read and write asks this:
    /// no allocation), listed for more.
    pub(crate) fn owner_indices(&self, hash: u64, n: usize) -> Cow<'_, [u32]> {
        let want = n.min(self.nodes.len());
        if want == 0 {
            return Cow::Borrowed(&[]);
        }
        let start = self.successor(hash);
        if want <= PRECOMPUTED {
            return Cow::Borrowed(&self.arcs[start][..want]);
        }
        let mut owners = Vec::with_capacity(want);
        let (before, after) = self.token_nodes.split_at(start);
        for &node in after.iter().chain(before) {
            if !owners.contains(&node) {
                owners.push(node);
                if owners.len() == want {
                    break;
                }
            }
        }
        Cow::Owned(owners)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn primary_shares_sum_to_one_and_match_where_keys_land() {
        assert!(Ring::default().primary_shares().is_empty());
        assert_eq!(Ring::new(["solo"]).primary_shares(), vec![1.0]);
        let ring = Ring::with_vnodes(workers(5), 64);
        let shares = ring.primary_shares();
        assert!(
            (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{shares:?}"
        );
        let mut landed = vec![0usize; 5];
        let keys = 200_000;
        for i in 0..keys {
            let primary = ring.primary(format!("key{i}").as_bytes()).expect("primary");
            landed[ring
                .nodes()
                .iter()
                .position(|n| n == primary)
                .expect("node")] += 1;
        }
        for (share, count) in shares.iter().zip(&landed) {
            let seen = *count as f64 / keys as f64;
            assert!(
                (share - seen).abs() < 0.01,
                "share {share} but {seen} of keys"
            );
        }
    }

    #[test]
    fn the_picture_shows_the_primary_of_each_segment() {
        assert!(Ring::default().picture(8).is_empty());
        let ring = Ring::with_vnodes(workers(3), 16);
        let picture = ring.picture(360);
        assert_eq!(picture.len(), 360);
        let step = u64::MAX / 360;
        for (i, &node) in picture.iter().enumerate() {
            let mid = i as u64 * step + step / 2;
            assert_eq!(ring.owner_indices(mid, 1), vec![node], "segment {i}");
        }
        // Every worker appears, in proportion to its share.
        for (n, share) in ring.primary_shares().iter().enumerate() {
            let drawn = picture.iter().filter(|&&p| p == n as u32).count() as f64 / 360.0;
            assert!(
                (drawn - share).abs() < 0.05,
                "{drawn} drawn for a share of {share}"
            );
        }
    }

    fn workers(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("worker{i}")).collect()
    }

    fn keys(count: usize) -> impl Iterator<Item = String> {
        (0..count).map(|i| format!("key:{i}"))
    }

    /// Each worker's exact share of the hash space as (primary, copies),
    /// copies counting each arc on each of its `n` owners. This is the
    /// expected fraction of keys, free of key-sampling noise.
    fn shares(ring: &Ring, n: usize) -> (Vec<f64>, Vec<f64>) {
        let nodes = ring.nodes().len();
        let mut primary = vec![0.0; nodes];
        let mut copies = vec![0.0; nodes];
        let space = 2f64.powi(64);
        for (i, &token) in ring.tokens.iter().enumerate() {
            // The arc (previous token, token] hashes to the owners of `token`.
            let prev = if i == 0 {
                ring.tokens[ring.tokens.len() - 1]
            } else {
                ring.tokens[i - 1]
            };
            let arc = token.wrapping_sub(prev) as f64 / space;
            let owners = ring.owner_indices(token, n);
            primary[owners[0] as usize] += arc;
            for &o in owners.iter() {
                copies[o as usize] += arc;
            }
        }
        (primary, copies)
    }

    fn max_over_mean(load: &[f64]) -> f64 {
        let mean = load.iter().sum::<f64>() / load.len() as f64;
        load.iter().copied().fold(0.0, f64::max) / mean
    }

    #[test]
    fn golden_vectors_pin_the_layout() {
        // A change of hash, seed, token layout or walk breaks these: every
        // process of a mixed-version cluster must agree on them.
        let ring = Ring::new(workers(4));
        let cases = [
            ("user123", ["worker4", "worker2", "worker1"]),
            ("hello", ["worker1", "worker2", "worker3"]),
            ("key:0", ["worker4", "worker2", "worker3"]),
            ("", ["worker1", "worker4", "worker3"]),
        ];
        assert_eq!(Ring::key_hash(b"user123"), 0x6f3b_ae88_a40b_238c);
        assert_eq!(
            ring.tokens[..2],
            [1_018_056_878_270_471, 1_846_419_460_150_565]
        );
        assert_eq!(ring.token_nodes[..2], [2, 3]);
        for (key, expected) in cases {
            assert_eq!(ring.owners(key.as_bytes(), 3), expected, "key {key:?}");
        }
    }

    #[test]
    fn precomputed_owners_agree_with_walking_the_ring() {
        for n in [1, 2, 3, 5, 9] {
            let ring = Ring::with_vnodes(workers(n), 64);
            for key in keys(2_000) {
                let all = ring.owners(key.as_bytes(), n + 2);
                for want in 1..=3 {
                    assert_eq!(
                        ring.owners(key.as_bytes(), want),
                        all[..want.min(n)],
                        "{n} workers, {key}"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_index_finds_the_token_a_search_of_all_tokens_finds(
            workers_n in 1usize..40,
            vnodes in 1u32..300,
            hashes in proptest::collection::vec(proptest::num::u64::ANY, 1..64),
        ) {
            let ring = Ring::with_vnodes(workers(workers_n), vnodes);
            // Tokens themselves, their neighbours, and the circle's ends.
            let edges = ring.tokens.iter().take(16).flat_map(|&t| [t, t.wrapping_sub(1), t.wrapping_add(1)]);
            for hash in hashes.into_iter().chain(edges).chain([0, u64::MAX]) {
                let everywhere = ring.tokens.partition_point(|&t| t < hash) % ring.tokens.len();
                proptest::prop_assert_eq!(ring.successor(hash), everywhere, "hash {}", hash);
            }
        }
    }

    #[test]
    fn member_order_and_duplicates_do_not_matter() {
        let a = Ring::new(["w1", "w2", "w3", "w4"]);
        let b = Ring::new(["w4", "w2", "w1", "w3", "w2"]);
        assert_eq!(a, b);
    }

    #[test]
    fn owners_are_distinct_and_capped_by_ring_size() {
        for n in 0..6 {
            let ring = Ring::with_vnodes(workers(n), 16);
            for key in keys(2_000) {
                let owners = ring.owners(key.as_bytes(), 3);
                assert_eq!(owners.len(), n.min(3), "{n} workers");
                let mut distinct = owners.clone();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), owners.len(), "{owners:?}");
                assert_eq!(ring.primary(key.as_bytes()), owners.first().copied());
            }
        }
    }

    #[test]
    fn every_size_from_4_to_64_is_balanced_within_10_percent() {
        for n in 4..=64 {
            let ring = Ring::new(workers(n));
            let (primary, copies) = shares(&ring, 3);
            let (p, c) = (max_over_mean(&primary), max_over_mean(&copies));
            assert!(p <= 1.10, "{n} workers: busiest primary {p:.3} x mean");
            assert!(c <= 1.10, "{n} workers: busiest holder {c:.3} x mean");
        }
    }

    #[test]
    fn real_keys_spread_within_10_percent() {
        for n in [4, 16, 64] {
            let ring = Ring::new(workers(n));
            let mut held: HashMap<&str, usize> = HashMap::new();
            let count = 200_000;
            for key in keys(count) {
                for owner in ring.owners(key.as_bytes(), 3) {
                    *held.entry(owner).or_default() += 1;
                }
            }
            let load: Vec<f64> = held.values().map(|&c| c as f64).collect();
            assert_eq!(load.len(), n);
            let m = max_over_mean(&load);
            assert!(m <= 1.10, "{n} workers: busiest holds {m:.3} x mean");
        }
    }

    /// Fractions of primaries and of copies that differ between two rings,
    /// checking that every changed owner set involves `node`.
    fn movement(before: &Ring, after: &Ring, node: &str, count: usize) -> (f64, f64) {
        let (mut primaries, mut copies) = (0usize, 0usize);
        for key in keys(count) {
            let old = before.owners(key.as_bytes(), 3);
            let new = after.owners(key.as_bytes(), 3);
            if old != new {
                assert!(
                    old.contains(&node) || new.contains(&node),
                    "{key}: {old:?} -> {new:?} does not involve {node}"
                );
            }
            primaries += usize::from(old[0] != new[0]);
            copies += new.iter().filter(|o| !old.contains(o)).count();
        }
        (
            primaries as f64 / count as f64,
            copies as f64 / (3 * count) as f64,
        )
    }

    #[test]
    fn adding_or_removing_one_worker_moves_at_most_1_2_over_n() {
        let count = 50_000;
        for n in [4, 5, 8, 16, 32] {
            let names = workers(n + 1);
            let small = Ring::new(names[..n].iter().cloned());
            let large = Ring::new(names.iter().cloned());
            let joined = names[n].as_str();
            let bound = 1.2 / n as f64;
            let (p, c) = movement(&small, &large, joined, count);
            assert!(
                p <= bound && c <= bound,
                "join to {n}: primaries {p:.4}, copies {c:.4} > {bound:.4}"
            );
            // Removing one of the n+1 moves at most 1.2/(n+1).
            let bound = 1.2 / (n + 1) as f64;
            let (p, c) = movement(&large, &small, joined, count);
            assert!(
                p <= bound && c <= bound,
                "leave from {}: primaries {p:.4}, copies {c:.4} > {bound:.4}",
                n + 1
            );
        }
    }

    #[test]
    fn arcs_tile_the_circle_and_give_each_key_its_owners() {
        for n in [1, 2, 4, 7] {
            let ring = Ring::with_vnodes(workers(n), 64);
            let arcs = ring.arcs();
            assert_eq!(arcs.first().map(|a| a.0.start), Some(0));
            assert_eq!(arcs.last().map(|a| a.0.end), Some(u64::MAX));
            for pair in arcs.windows(2) {
                assert!(pair[0].0.is_valid());
                assert_eq!(
                    pair[0].0.end.wrapping_add(1),
                    pair[1].0.start,
                    "{n}: gap or overlap"
                );
            }
            for key in keys(3_000) {
                let h = Ring::key_hash(key.as_bytes());
                let i = arcs.partition_point(|(r, _)| r.end < h);
                assert!(arcs[i].0.contains(h));
                assert_eq!(
                    arcs[i].1,
                    ring.owners(key.as_bytes(), 3),
                    "{n} workers, {key}"
                );
            }
        }
        assert!(Ring::new(Vec::<String>::new()).arcs().is_empty());
    }

    #[test]
    fn contains_and_is_owner_agree_with_owners() {
        let ring = Ring::new(workers(5));
        assert!(ring.contains("worker5"));
        assert!(!ring.contains("worker6"));
        let owners = ring.owners(b"user123", 3);
        for id in ring.nodes() {
            assert_eq!(
                ring.is_owner(b"user123", 3, id),
                owners.contains(&id.as_str())
            );
        }
        assert!(Ring::new(Vec::<String>::new()).primary(b"x").is_none());
    }

    /// Every arc has exactly one set of owners: over all the sets of three
    /// of five workers, the shares owned only by each sum to the circle.
    #[test]
    fn the_shares_owned_only_by_each_set_of_owners_make_the_circle() {
        let ids = ["w1", "w2", "w3", "w4", "w5"];
        let ring = Ring::new(ids);
        let mut sum = 0.0;
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let set = [ids[a], ids[b], ids[c]];
                    let share = ring.share_owned_only_by(|id| set.contains(&id));
                    assert!(share > 0.05 && share < 0.15, "{set:?}: {share}");
                    sum += share;
                }
            }
        }
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        assert_eq!(ring.share_owned_only_by(|_| true), 1.0);
        assert_eq!(ring.share_owned_only_by(|_| false), 0.0);
        assert_eq!(
            Ring::new(Vec::<String>::new()).share_owned_only_by(|_| true),
            0.0
        );
    }
}
