//! The versioned in-memory store, behind a small trait so a disk engine can
//! follow.
//!
//! Every copy carries its version; [`Store::apply`] keeps whichever is newer,
//! which makes replication, retries and rebalancing idempotent and lets the
//! copies of a key converge whatever order writes arrive in. Deletes are
//! tombstones (a version with no value) so that an older value arriving late
//! cannot resurrect the key; they are purged after a grace period.

use bytes::Bytes;
use kv_wire::Version;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use xxhash_rust::xxh3::xxh3_64;

/// A stored copy: a value or a tombstone, at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The write that produced it.
    pub version: Version,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
}

impl Stored {
    /// Bytes this copy accounts for, key included.
    pub fn size(&self, key: &str) -> usize {
        key.len() + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// What [`Store::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The copy was newer and is now stored.
    Stored,
    /// This exact version was already held (a replay).
    Held,
    /// A newer version is held; the copy was ignored.
    Older {
        /// The version held.
        held: Version,
    },
}

/// A versioned key-value store.
pub trait Store: Send + Sync + 'static {
    /// The copy of `key`, tombstones included.
    fn get(&self, key: &str) -> Option<Stored>;
    /// Stores `copy` if it is newer than the held one.
    fn apply(&self, key: &str, copy: Stored) -> Applied;
    /// Removes `key` if it is still at `version` (a newer write since then
    /// stays). Returns whether it was removed.
    fn remove_if(&self, key: &str, version: Version) -> bool;
    /// How many shards [`Store::snapshot`] takes.
    fn shards(&self) -> usize;
    /// A copy of one shard's entries, taken under its lock and released
    /// before the caller works on it.
    fn snapshot(&self, shard: usize) -> Vec<(String, Stored)>;
    /// Removes tombstones whose version is older than `before`; returns how
    /// many.
    fn purge_tombstones(&self, before: Version) -> usize;
    /// Keys held (tombstones included) and bytes of keys and values.
    fn stats(&self) -> (usize, usize);
}

/// Shards of the in-memory store: enough that 2 to 16 cores rarely contend.
const SHARDS: usize = 64;

/// One shard's map. foldhash, randomly seeded per process: several times
/// faster than the default SipHash on short keys, and still unpredictable to
/// clients choosing keys.
type Shard = HashMap<String, Stored, foldhash::fast::RandomState>;

/// The in-memory [`Store`]: sharded hash maps behind read-write locks.
#[derive(Debug)]
pub struct MemStore {
    shards: Vec<RwLock<Shard>>,
    keys: AtomicI64,
    bytes: AtomicI64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            keys: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
        }
    }

    fn shard_of(key: &str) -> usize {
        (xxh3_64(key.as_bytes()) as usize) % SHARDS
    }

    // A writer that panicked mid-insert leaves a HashMap that is still
    // valid; keep serving rather than poison every later request.
    fn read(&self, shard: usize) -> RwLockReadGuard<'_, Shard> {
        self.shards[shard].read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, shard: usize) -> RwLockWriteGuard<'_, Shard> {
        self.shards[shard]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn account(&self, keys: i64, bytes: i64) {
        self.keys.fetch_add(keys, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl Store for MemStore {
    fn get(&self, key: &str) -> Option<Stored> {
        self.read(Self::shard_of(key)).get(key).cloned()
    }

    fn apply(&self, key: &str, copy: Stored) -> Applied {
        let mut shard = self.write(Self::shard_of(key));
        match shard.get_mut(key) {
            Some(held) if held.version > copy.version => Applied::Older { held: held.version },
            Some(held) if held.version == copy.version => Applied::Held,
            Some(held) => {
                let delta = copy.size(key) as i64 - held.size(key) as i64;
                *held = copy;
                drop(shard);
                self.account(0, delta);
                Applied::Stored
            }
            None => {
                let size = copy.size(key) as i64;
                shard.insert(key.to_string(), copy);
                drop(shard);
                self.account(1, size);
                Applied::Stored
            }
        }
    }

    fn remove_if(&self, key: &str, version: Version) -> bool {
        let mut shard = self.write(Self::shard_of(key));
        if shard.get(key).is_some_and(|held| held.version == version) {
            if let Some(gone) = shard.remove(key) {
                drop(shard);
                self.account(-1, -(gone.size(key) as i64));
                return true;
            }
        }
        false
    }

    fn shards(&self) -> usize {
        SHARDS
    }

    fn snapshot(&self, shard: usize) -> Vec<(String, Stored)> {
        self.read(shard)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn purge_tombstones(&self, before: Version) -> usize {
        let mut purged = 0;
        for shard in 0..SHARDS {
            let mut map = self.write(shard);
            let before_len = map.len();
            let mut freed = 0i64;
            map.retain(|key, copy| {
                let expired = copy.value.is_none() && copy.version < before;
                if expired {
                    freed += copy.size(key) as i64;
                }
                !expired
            });
            let gone = before_len - map.len();
            drop(map);
            self.account(-(gone as i64), -freed);
            purged += gone;
        }
        purged
    }

    fn stats(&self) -> (usize, usize) {
        let keys = self.keys.load(Ordering::Relaxed).max(0) as usize;
        let bytes = self.bytes.load(Ordering::Relaxed).max(0) as usize;
        (keys, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: u64) -> Version {
        Version { hlc, node: 1 }
    }

    fn copy(hlc: u64, value: Option<&'static str>) -> Stored {
        Stored {
            version: v(hlc),
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
        }
    }

    #[test]
    fn the_newest_version_wins_whatever_the_arrival_order() {
        let orders = [[1, 2, 3], [3, 2, 1], [2, 3, 1], [1, 3, 2]];
        for order in orders {
            let store = MemStore::new();
            for hlc in order {
                store.apply("k", copy(hlc, Some(["a", "b", "c"][hlc as usize - 1])));
            }
            assert_eq!(store.get("k"), Some(copy(3, Some("c"))), "{order:?}");
        }
    }

    #[test]
    fn apply_reports_replays_and_older_copies() {
        let store = MemStore::new();
        assert_eq!(store.apply("k", copy(5, Some("x"))), Applied::Stored);
        assert_eq!(store.apply("k", copy(5, Some("x"))), Applied::Held);
        assert_eq!(
            store.apply("k", copy(4, Some("old"))),
            Applied::Older { held: v(5) }
        );
    }

    #[test]
    fn a_tombstone_keeps_older_values_out_until_purged() {
        let store = MemStore::new();
        store.apply("k", copy(1, Some("x")));
        store.apply("k", copy(2, None));
        assert_eq!(
            store.apply("k", copy(1, Some("x"))),
            Applied::Older { held: v(2) }
        );
        assert_eq!(store.get("k"), Some(copy(2, None)));
        assert_eq!(store.purge_tombstones(v(2)), 0, "not older than the cutoff");
        assert_eq!(store.purge_tombstones(v(3)), 1);
        assert_eq!(store.get("k"), None);
        assert_eq!(store.stats(), (0, 0));
    }

    #[test]
    fn remove_if_spares_a_newer_write() {
        let store = MemStore::new();
        store.apply("k", copy(1, Some("x")));
        store.apply("k", copy(2, Some("y")));
        assert!(!store.remove_if("k", v(1)));
        assert!(store.remove_if("k", v(2)));
        assert_eq!(store.get("k"), None);
    }

    #[test]
    fn stats_count_keys_and_bytes_and_snapshots_see_everything() {
        let store = MemStore::new();
        for i in 0..1000 {
            store.apply(&format!("key{i}"), copy(1, Some("0123456789")));
        }
        store.apply("key0", copy(2, Some("01234")));
        let expected_bytes: usize = (0..1000)
            .map(|i| format!("key{i}").len() + 10)
            .sum::<usize>()
            - 5;
        assert_eq!(store.stats(), (1000, expected_bytes));
        let seen: usize = (0..store.shards()).map(|s| store.snapshot(s).len()).sum();
        assert_eq!(seen, 1000);
    }
}
