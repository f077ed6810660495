//! Digests of what a worker holds, for anti-entropy and rebalancing.
//!
//! Keys live on a 64-bit hash circle (`xxh3(key)`, as the ring places
//! them). A [`Digest`] summarises the copies held in a [`HashRange`] of it:
//! how many, and the XOR of a fingerprint of each `(key, version)`. XOR is
//! order-free and its own inverse, so a store keeps digests exact as writes
//! replace versions (remove the old fingerprint, add the new) and a range's
//! digest is the XOR of its parts. Two owners whose digests of a range are
//! equal hold the same versions there (up to a 2^-64 accident); only ranges
//! whose digests differ need their keys compared.

use crate::Version;
use serde::{Deserialize, Serialize};

/// Hashes `start..=end` of the circle (never wrapping: `start <= end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HashRange {
    /// First hash in the range.
    pub start: u64,
    /// Last hash in the range (inclusive).
    pub end: u64,
}

impl HashRange {
    /// The whole circle.
    pub const ALL: HashRange = HashRange {
        start: 0,
        end: u64::MAX,
    };

    /// Whether `hash` lies in the range.
    pub fn contains(&self, hash: u64) -> bool {
        self.start <= hash && hash <= self.end
    }

    /// Whether the range is well formed (`start <= end`); peers may send
    /// anything.
    pub fn is_valid(&self) -> bool {
        self.start <= self.end
    }
}

/// A summary of the copies held in a range: their count, and the XOR of
/// their [`fingerprint`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest {
    /// Copies (tombstones included).
    pub count: u64,
    /// XOR of their fingerprints.
    pub xor: u64,
}

impl Digest {
    /// Counts one copy in.
    pub fn add(&mut self, key_hash: u64, version: Version) {
        self.count = self.count.wrapping_add(1);
        self.xor ^= fingerprint(key_hash, version);
    }

    /// Counts one copy out (the inverse of [`Digest::add`]).
    pub fn remove(&mut self, key_hash: u64, version: Version) {
        self.count = self.count.wrapping_sub(1);
        self.xor ^= fingerprint(key_hash, version);
    }

    /// Adds the copies another digest summarises (of a disjoint range).
    pub fn merge(&mut self, other: Digest) {
        self.count = self.count.wrapping_add(other.count);
        self.xor ^= other.xor;
    }
}

/// The fingerprint of one copy: `key_hash` (its place on the circle) and
/// its version, mixed so that any change of either flips about half the
/// bits (the finaliser of SplitMix64, applied twice).
pub fn fingerprint(key_hash: u64, version: Version) -> u64 {
    mix(key_hash ^ mix(version.hlc ^ mix(version.node)))
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(hlc: u64, node: u64) -> Version {
        Version { hlc, node }
    }

    #[test]
    fn a_digest_depends_on_versions_not_on_order() {
        let copies = [(1u64, v(10, 1)), (2, v(11, 1)), (3, v(12, 2))];
        let mut forwards = Digest::default();
        copies.iter().for_each(|(h, v)| forwards.add(*h, *v));
        let mut backwards = Digest::default();
        copies.iter().rev().for_each(|(h, v)| backwards.add(*h, *v));
        assert_eq!(forwards, backwards);

        let mut newer = Digest::default();
        newer.add(1, v(10, 1));
        newer.add(2, v(13, 1));
        newer.add(3, v(12, 2));
        assert_eq!(newer.count, forwards.count);
        assert_ne!(
            newer, forwards,
            "a newer version of one key changes the digest"
        );
    }

    #[test]
    fn fingerprints_separate_keys_hlcs_and_writers() {
        let base = fingerprint(7, v(100, 1));
        assert_ne!(base, fingerprint(8, v(100, 1)));
        assert_ne!(base, fingerprint(7, v(101, 1)));
        assert_ne!(base, fingerprint(7, v(100, 2)));
        // Swapping the parts does not collide either.
        assert_ne!(fingerprint(1, v(2, 3)), fingerprint(2, v(1, 3)));
    }

    proptest! {
        #[test]
        fn removing_what_was_added_restores_the_digest(
            before in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..20),
            extra in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..20),
        ) {
            let mut d = Digest::default();
            for (h, hlc, node) in &before { d.add(*h, v(*hlc, *node)); }
            let snapshot = d;
            for (h, hlc, node) in &extra { d.add(*h, v(*hlc, *node)); }
            for (h, hlc, node) in extra.iter().rev() { d.remove(*h, v(*hlc, *node)); }
            prop_assert_eq!(d, snapshot);
        }

        #[test]
        fn a_split_range_merges_back_to_the_whole(
            copies in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50),
            cut in any::<u64>(),
        ) {
            let (mut whole, mut low, mut high) = (Digest::default(), Digest::default(), Digest::default());
            for (h, hlc) in &copies {
                whole.add(*h, v(*hlc, 1));
                if *h <= cut { low.add(*h, v(*hlc, 1)) } else { high.add(*h, v(*hlc, 1)) }
            }
            low.merge(high);
            prop_assert_eq!(low, whole);
        }
    }
}
