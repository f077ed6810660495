//! The versioned store, behind a small trait: [`MemStore`] in memory (the
//! default), [`crate::disk::DiskStore`] in a data dir.
//!
//! Every copy carries its version; [`Store::apply`] keeps whichever is newer,
//! which makes replication, retries and rebalancing idempotent and lets the
//! copies of a key converge whatever order writes arrive in. Deletes are
//! tombstones (a version with no value) so that an older value arriving late
//! cannot resurrect the key; they are purged after a grace period.
//!
//! Keys are laid out by their place on the ring's hash circle, so a ring arc
//! is a range of the store: [`Store::scan`] visits one and [`Store::digest`]
//! summarises one for anti-entropy without reading every key.

use bytes::Bytes;
use hashbrown::HashTable;
use kv_wire::{Digest, HashRange, Ring, Version};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// A store could not take a write (a disk error): the write must not be
/// acknowledged. Says what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub std::sync::Arc<str>);

/// Whether the copies applied before [`Store::persisted`] was called are as
/// durable as the store promises.
#[derive(Debug)]
pub enum Persisted {
    /// They are.
    Done,
    /// They will be once the ticket resolves.
    Wait(crate::disk::Ticket),
}

impl Persisted {
    /// Waits until they are (or could not be made so).
    pub async fn wait(self) -> Result<(), StoreError> {
        match self {
            Persisted::Done => Ok(()),
            Persisted::Wait(ticket) => ticket.wait().await,
        }
    }
}

/// A versioned key-value store.
pub trait Store: Send + Sync + 'static {
    /// The copy of `key`, tombstones included.
    fn get(&self, key: &str) -> Option<Stored>;
    /// Stores `copy` if it is newer than the held one. An error means it is
    /// not stored.
    fn apply(&self, key: &str, copy: Stored) -> Result<Applied, StoreError>;
    /// [`Store::apply`] for each copy, in order (a key may come more than
    /// once); an engine that can makes them one write (one journal write,
    /// one system call, for a whole replication batch).
    fn apply_many(&self, copies: &[(String, Stored)]) -> Vec<Result<Applied, StoreError>> {
        copies
            .iter()
            .map(|(key, copy)| self.apply(key, copy.clone()))
            .collect()
    }
    /// The version of the copy held of `key`, tombstones included; an
    /// engine may answer it without reading the value.
    fn held_version(&self, key: &str) -> Option<Version> {
        self.get(key).map(|copy| copy.version)
    }
    /// Durability of everything applied so far: a copy counts towards a
    /// write's quorum, or is confirmed to a peer, only once this resolves.
    /// Call it after the applies it covers; concurrent callers share work
    /// (one fsync for many writes).
    fn persisted(&self) -> Persisted;
    /// Removes `key` if it is still at `version` (a newer write since then
    /// stays). Returns whether it was removed.
    fn remove_if(&self, key: &str, version: Version) -> bool;
    /// [`Store::remove_if`] for each copy (a key at most once); returns
    /// how many were removed. An engine that can makes them one write.
    fn remove_many_if(&self, copies: &[(&str, Version)]) -> usize {
        (copies.iter())
            .filter(|(key, version)| self.remove_if(key, *version))
            .count()
    }
    /// Visits the key and version of every copy whose key hashes into
    /// `range` (tombstones included), in no particular order, a part of the
    /// range at a time under that part's lock: `visit` must be quick and
    /// must not touch the store. Values stay where they are: comparing
    /// and handing off ranges go by versions, and fetch only what differs.
    fn scan(&self, range: HashRange, visit: &mut dyn FnMut(&str, Version));
    /// Visits the key and version of each copy (tombstones included) whose
    /// key hashes into `range` and comes after `after`, in `(xxh3(key),
    /// key)` order, until `visit` returns false: the pages of an arc a
    /// co-owner lists to compare key by key. An engine that keeps its
    /// copies in that order reads them in one pass from the cursor on; this
    /// default scans the range and sorts it.
    fn versions_in_order(
        &self,
        range: HashRange,
        after: Option<(u64, &str)>,
        visit: &mut dyn FnMut(&str, Version) -> bool,
    ) {
        let mut keys = Vec::new();
        self.scan(range, &mut |key, version| {
            let hash = Ring::key_hash(key.as_bytes());
            if after.is_none_or(|cursor| (hash, key) > cursor) {
                keys.push((hash, key.to_string(), version));
            }
        });
        keys.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, key, version) in keys {
            if !visit(&key, version) {
                return;
            }
        }
    }
    /// [`Store::versions_in_order`] with the values: the pages of an arc a
    /// co-owner pulls whole. This default reads each copy after listing.
    fn copies_in_order(
        &self,
        range: HashRange,
        after: Option<(u64, &str)>,
        visit: &mut dyn FnMut(&str, Stored) -> bool,
    ) {
        let mut keys = Vec::new();
        self.versions_in_order(range, after, &mut |key, _| {
            keys.push(key.to_string());
            true
        });
        for key in keys {
            // A copy removed since the listing is passed over.
            if let Some(copy) = self.get(&key) {
                if !visit(&key, copy) {
                    return;
                }
            }
        }
    }
    /// The digest of the copies whose keys hash into `range`.
    fn digest(&self, range: HashRange) -> Digest;
    /// Removes tombstones whose version is older than `before`; returns how
    /// many.
    fn purge_tombstones(&self, before: Version) -> usize;
    /// Keys held (tombstones included) and bytes of keys and values.
    fn stats(&self) -> (usize, usize);
    /// Whether no copy is held, tombstones included: what a registration
    /// says as `empty`.
    fn is_empty(&self) -> bool {
        self.stats().0 == 0
    }
    /// Why the store cannot take writes now (its last write failed and
    /// none has succeeded since), or `None` while it can.
    fn failing(&self) -> Option<String> {
        None
    }
}

/// The store splits the hash circle into 2^16 buckets by the top bits of a
/// key's hash: a ring arc (about 1/8192 of the circle with 4 workers) spans
/// a few whole buckets, whose digests are kept up to date, and two partial
/// ones, which are scanned. Each bucket has its own lock, so writers rarely
/// contend.
pub(crate) const BUCKET_BITS: u32 = 16;

/// The bucket of a key hash.
pub(crate) fn bucket_of(hash: u64) -> usize {
    (hash >> (64 - BUCKET_BITS)) as usize
}

/// The hashes bucket `b` covers.
pub(crate) fn bucket_range(b: usize) -> HashRange {
    let start = (b as u64) << (64 - BUCKET_BITS);
    HashRange {
        start,
        end: start | (u64::MAX >> BUCKET_BITS),
    }
}

/// The buckets `range` touches, each with whether it lies wholly inside.
pub(crate) fn buckets_of(range: HashRange) -> impl Iterator<Item = (usize, bool)> {
    let (first, last) = if range.is_valid() {
        (bucket_of(range.start), bucket_of(range.end))
    } else {
        (1, 0)
    };
    (first..=last).map(move |b| {
        let covered = bucket_range(b);
        (b, range.start <= covered.start && covered.end <= range.end)
    })
}

/// Every bucket's digest, kept beside the buckets' locks rather than under
/// them, and a count of copies per page of buckets: digesting a range reads
/// its whole buckets without locking them and skips empty pages and
/// buckets. Anti-entropy digests every arc a worker owns on each pass,
/// three quarters of the 2^16 buckets with four workers, and a lock per
/// bucket was most of that pass's cost; in a sparse store (a new cluster,
/// the simulator's few keys) the pages skip nearly all of them.
///
/// A bucket's digest changes only while its store holds that bucket's write
/// lock, so writers never race each other on it. A reader may see a count
/// and an XOR from either side of a concurrent write: like any digest of a
/// store that takes writes while it is read, that at worst makes one
/// comparison differ, and the next one settles it.
#[derive(Debug)]
pub(crate) struct BucketDigests {
    /// Per bucket: copies, and the XOR of their fingerprints.
    buckets: Box<[[AtomicU64; 2]]>,
    /// Per page of [`PAGE`] buckets: copies.
    pages: Box<[AtomicU64]>,
}

/// Buckets per page of [`BucketDigests`].
const PAGE: usize = 64;

impl BucketDigests {
    /// All buckets empty.
    pub(crate) fn new() -> BucketDigests {
        let atomics = |n: usize| (0..n).map(|_| AtomicU64::new(0));
        BucketDigests {
            buckets: atomics(1 << BUCKET_BITS)
                .map(|n| [n, AtomicU64::new(0)])
                .collect(),
            pages: atomics((1 << BUCKET_BITS) / PAGE).collect(),
        }
    }

    /// Counts a copy in. The caller holds its bucket's write lock.
    pub(crate) fn add(&self, hash: u64, version: Version) {
        self.change(hash, version, 1);
    }

    /// Loads bucket `b`'s digest into the cache (see [`MemStore::apply_many`]).
    pub(crate) fn touch(&self, b: usize) {
        std::hint::black_box(self.buckets[b][0].load(Ordering::Relaxed));
    }

    /// Counts a copy out. The caller holds its bucket's write lock.
    pub(crate) fn remove(&self, hash: u64, version: Version) {
        self.change(hash, version, u64::MAX);
    }

    fn change(&self, hash: u64, version: Version, count: u64) {
        let b = bucket_of(hash);
        let [n, xor] = &self.buckets[b];
        n.fetch_add(count, Ordering::Relaxed);
        xor.fetch_xor(
            kv_wire::digest::fingerprint(hash, version),
            Ordering::Relaxed,
        );
        self.pages[b / PAGE].fetch_add(count, Ordering::Relaxed);
    }

    /// The digest of `range`: its whole buckets' from here, and for each
    /// partly covered bucket that holds anything, `within(bucket)`: the
    /// digest of that bucket's copies inside `range`, which the store
    /// computes under the bucket's lock.
    pub(crate) fn over(&self, range: HashRange, mut within: impl FnMut(usize) -> Digest) -> Digest {
        let mut total = Digest::default();
        if !range.is_valid() {
            return total;
        }
        let (first, last) = (bucket_of(range.start), bucket_of(range.end));
        let mut page_start = first;
        while page_start <= last {
            let page_end = ((page_start / PAGE + 1) * PAGE).min(last + 1);
            if self.pages[page_start / PAGE].load(Ordering::Relaxed) != 0 {
                for b in page_start..page_end {
                    let [n, xor] = &self.buckets[b];
                    let count = n.load(Ordering::Relaxed);
                    if count == 0 {
                        continue;
                    }
                    // Only the first and the last bucket can be partly covered.
                    let covered = bucket_range(b);
                    let whole = range.start <= covered.start && covered.end <= range.end;
                    total.merge(if whole {
                        Digest {
                            count,
                            xor: xor.load(Ordering::Relaxed),
                        }
                    } else {
                        within(b)
                    });
                }
            }
            page_start = page_end;
        }
        total
    }
}

/// One copy as the in-memory store holds it: its version, and its key and
/// value in one allocation, split at `key_len`. One allocation a copy
/// (not a key's, a value's and, once shared, a count's) and a 40-byte slot
/// in its bucket's table (not 72): less memory per copy, and fewer fresh
/// pages for the kernel to fault in and zero while a store grows (a third
/// of a worker's time during a bulk load).
///
/// The slot also keeps the key's place in its table ([`Slot`]), so that a
/// table growing moves its copies without reading each key from the heap
/// again to hash it: a cache miss per copy moved, 7% of a worker's time
/// during a bulk load.
#[derive(Debug)]
struct Held {
    version: Version,
    key_and_value: Box<[u8]>,
    slot: Slot,
    key_len: u16,
    tombstone: bool,
}

// The place and the length share what was padding.
const _: () = assert!(std::mem::size_of::<Held>() == 40);

/// A key's place in its bucket's table: 32 bits of its hash, which fit
/// the padding of [`Held`] where 64 would grow it by a fifth.
#[derive(Debug, Clone, Copy)]
struct Slot(u32);

impl Slot {
    /// The hash the table places the key by. The table picks the position
    /// from the low bits and filters its probes by the top seven, so the
    /// 32 bits go to both ends.
    fn hash(self) -> u64 {
        (u64::from(self.0) << 32) | u64::from(self.0)
    }
}

impl Held {
    /// The copy of a [`storable`] key.
    fn new(key: &str, slot: Slot, copy: &Stored) -> Held {
        let value = copy.value.as_deref().unwrap_or_default();
        let mut key_and_value = Vec::with_capacity(key.len() + value.len());
        key_and_value.extend_from_slice(key.as_bytes());
        key_and_value.extend_from_slice(value);
        Held {
            version: copy.version,
            key_and_value: key_and_value.into_boxed_slice(),
            slot,
            // At most MAX_KEY_LEN (1,024): storable.
            key_len: key.len() as u16,
            tombstone: copy.value.is_none(),
        }
    }

    /// Becomes `copy` of the same key: in place when the value is as long
    /// as the one held (overwrites of a value of the same size, the common
    /// case, then cost no allocation and no free).
    fn replace(&mut self, key: &str, slot: Slot, copy: &Stored) {
        let value = copy.value.as_deref().unwrap_or_default();
        if self.key_and_value.len() == key.len() + value.len() {
            self.key_and_value[key.len()..].copy_from_slice(value);
            self.version = copy.version;
            self.tombstone = copy.value.is_none();
        } else {
            *self = Held::new(key, slot, copy);
        }
    }

    fn key_bytes(&self) -> &[u8] {
        &self.key_and_value[..self.key_len as usize]
    }

    fn key(&self) -> &str {
        // Made from a `&str` in `new`: never invalid.
        std::str::from_utf8(self.key_bytes()).unwrap_or_default()
    }

    /// The copy, its value copied out (a store's answer outlives its lock).
    fn stored(&self) -> Stored {
        Stored {
            version: self.version,
            value: (!self.tombstone)
                .then(|| Bytes::copy_from_slice(&self.key_and_value[self.key_len as usize..])),
        }
    }

    /// What [`Stored::size`] says of it.
    fn size(&self) -> usize {
        self.key_and_value.len()
    }
}

/// Refuses a key longer than any valid one ([`kv_wire::MAX_KEY_LEN`]).
/// The wire refuses such keys before they reach a store; the stores lay
/// key lengths out in 16 bits, and the engine asserts on longer keys.
pub(crate) fn storable(key: &str) -> Result<(), StoreError> {
    match key.len() <= kv_wire::MAX_KEY_LEN {
        true => Ok(()),
        false => Err(StoreError(
            format!(
                "a key of {} bytes is longer than the {} a key may have",
                key.len(),
                kv_wire::MAX_KEY_LEN
            )
            .into(),
        )),
    }
}

/// Whether a copy held is `key`'s.
fn is(key: &str) -> impl Fn(&Held) -> bool + '_ {
    move |held| held.key_bytes() == key.as_bytes()
}

/// One bucket's copies, placed by foldhash of the key (randomly seeded per
/// store: several times faster than SipHash on short keys, still
/// unpredictable to clients choosing keys).
type Bucket = HashTable<Held>;

/// The in-memory [`Store`]: buckets of hash tables behind read-write locks,
/// and their digests.
#[derive(Debug)]
pub struct MemStore {
    buckets: Vec<RwLock<Bucket>>,
    hasher: foldhash::fast::RandomState,
    digests: BucketDigests,
    keys: AtomicI64,
    bytes: AtomicI64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore {
            buckets: (0..1usize << BUCKET_BITS)
                .map(|_| RwLock::default())
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
            digests: BucketDigests::new(),
            keys: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
        }
    }

    /// Where `key` lives: its bucket, and its place in the bucket's table.
    fn place(&self, key: &str) -> (u64, Slot) {
        (
            Ring::key_hash(key.as_bytes()),
            // The low 32 bits of a well-mixed hash.
            Slot(self.hasher.hash_one(key.as_bytes()) as u32),
        )
    }

    fn find<'b>(&self, bucket: &'b Bucket, key: &str, slot: Slot) -> Option<&'b Held> {
        bucket.find(slot.hash(), is(key))
    }

    // A writer that panicked mid-insert leaves a hash table that is still
    // valid; keep serving rather than poison every later request.
    fn read(&self, bucket: usize) -> RwLockReadGuard<'_, Bucket> {
        self.buckets[bucket]
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, bucket: usize) -> RwLockWriteGuard<'_, Bucket> {
        self.buckets[bucket]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn account(&self, keys: i64, bytes: i64) {
        self.keys.fetch_add(keys, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// [`Store::apply`] on a borrowed copy.
    fn put(&self, key: &str, copy: &Stored) -> Result<Applied, StoreError> {
        self.put_at(key, copy, self.place(key))
    }

    /// Loads the cache lines a put at `hash` takes its locks and counts
    /// in (its bucket's lock, its bucket's digest), without locking: a
    /// load that misses does not wait for the loads before it, where a
    /// put's locked instructions wait for every miss before them. The
    /// lock's poison flag shares the lock's line, and reading it is a
    /// plain load (a prefetch instruction would need `unsafe`).
    fn touch(&self, hash: u64) {
        let b = bucket_of(hash);
        std::hint::black_box(self.buckets[b].is_poisoned());
        self.digests.touch(b);
    }

    /// [`MemStore::put`] of a key already placed.
    fn put_at(
        &self,
        key: &str,
        copy: &Stored,
        (hash, slot): (u64, Slot),
    ) -> Result<Applied, StoreError> {
        storable(key)?;
        let mut bucket = self.write(bucket_of(hash));
        Ok(match bucket.find_mut(slot.hash(), is(key)) {
            Some(held) if held.version > copy.version => Applied::Older { held: held.version },
            Some(held) if held.version == copy.version => Applied::Held,
            Some(held) => {
                let delta = copy.size(key) as i64 - held.size() as i64;
                self.digests.remove(hash, held.version);
                self.digests.add(hash, copy.version);
                held.replace(key, slot, copy);
                drop(bucket);
                self.account(0, delta);
                Applied::Stored
            }
            None => {
                let fresh = Held::new(key, slot, copy);
                self.digests.add(hash, copy.version);
                bucket.insert_unique(slot.hash(), fresh, |h| h.slot.hash());
                drop(bucket);
                self.account(1, copy.size(key) as i64);
                Applied::Stored
            }
        })
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl Store for MemStore {
    fn get(&self, key: &str) -> Option<Stored> {
        let (hash, slot) = self.place(key);
        self.find(&self.read(bucket_of(hash)), key, slot)
            .map(Held::stored)
    }

    fn held_version(&self, key: &str) -> Option<Version> {
        let (hash, slot) = self.place(key);
        self.find(&self.read(bucket_of(hash)), key, slot)
            .map(|h| h.version)
    }

    fn apply(&self, key: &str, copy: Stored) -> Result<Applied, StoreError> {
        self.put(key, &copy)
    }

    /// Copies a peer sent are borrowed, not cloned: a clone of a value
    /// fresh from a frame allocates (its bytes become shared). A chunk's
    /// lock and digest lines are loaded together before its puts, so
    /// their misses overlap instead of each waiting in turn.
    fn apply_many(&self, copies: &[(String, Stored)]) -> Vec<Result<Applied, StoreError>> {
        const CHUNK: usize = 32;
        let mut outcomes = Vec::with_capacity(copies.len());
        for chunk in copies.chunks(CHUNK) {
            let mut places = [(0, Slot(0)); CHUNK];
            for (place, (key, _)) in places.iter_mut().zip(chunk) {
                *place = self.place(key);
                self.touch(place.0);
            }
            for ((key, copy), place) in chunk.iter().zip(places) {
                outcomes.push(self.put_at(key, copy, place));
            }
        }
        outcomes
    }

    fn persisted(&self) -> Persisted {
        Persisted::Done
    }

    fn remove_if(&self, key: &str, version: Version) -> bool {
        let (hash, slot) = self.place(key);
        let mut bucket = self.write(bucket_of(hash));
        match bucket.find_entry(slot.hash(), is(key)) {
            Ok(held) if held.get().version == version => {
                let (gone, _) = held.remove();
                self.digests.remove(hash, version);
                drop(bucket);
                self.account(-1, -(gone.size() as i64));
                true
            }
            _ => false,
        }
    }

    fn scan(&self, range: HashRange, visit: &mut dyn FnMut(&str, Version)) {
        for (b, whole) in buckets_of(range) {
            let bucket = self.read(b);
            for held in bucket.iter() {
                if whole || range.contains(Ring::key_hash(held.key_bytes())) {
                    visit(held.key(), held.version);
                }
            }
        }
    }

    fn digest(&self, range: HashRange) -> Digest {
        self.digests.over(range, |b| {
            let mut digest = Digest::default();
            for held in self.read(b).iter() {
                let hash = Ring::key_hash(held.key_bytes());
                if range.contains(hash) {
                    digest.add(hash, held.version);
                }
            }
            digest
        })
    }

    fn purge_tombstones(&self, before: Version) -> usize {
        let mut purged = 0;
        for b in 0..self.buckets.len() {
            let mut bucket = self.write(b);
            let before_len = bucket.len();
            let mut freed = 0i64;
            bucket.retain(|held| {
                let expired = held.tombstone && held.version < before;
                if expired {
                    freed += held.size() as i64;
                    self.digests
                        .remove(Ring::key_hash(held.key_bytes()), held.version);
                }
                !expired
            });
            let gone = before_len - bucket.len();
            drop(bucket);
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

/// Runs `test` on a fresh store of each kind: the contract is the same.
#[cfg(test)]
pub(crate) fn each_store(test: impl Fn(&dyn Store)) {
    test(&MemStore::new());
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = crate::disk::DiskStore::open(
        dir.path(),
        "w1",
        crate::disk::SyncPolicy::Never,
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    test(&disk);
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
        each_store(|store| {
            let orders = [[1, 2, 3], [3, 2, 1], [2, 3, 1], [1, 3, 2]];
            for (n, order) in orders.iter().enumerate() {
                let key = format!("k{n}");
                for &hlc in order {
                    let value = ["a", "b", "c"][hlc as usize - 1];
                    store.apply(&key, copy(hlc, Some(value))).unwrap();
                }
                assert_eq!(store.get(&key), Some(copy(3, Some("c"))), "{order:?}");
            }
        });
    }

    #[test]
    fn an_overwrite_of_any_size_holds_the_new_copy_and_counts_its_bytes() {
        // The same size (in place in memory), longer, shorter, tombstones
        // and empty values in both directions.
        let copies = [
            (1, Some("abc")),
            (2, Some("xyz")),
            (3, Some("longer")),
            (4, Some("s")),
            (5, None),
            (6, Some("")),
            (7, None),
            (8, Some("q")),
        ];
        each_store(|store| {
            for (hlc, value) in copies {
                store.apply("k", copy(hlc, value)).unwrap();
                assert_eq!(store.get("k"), Some(copy(hlc, value)), "{hlc}");
                assert_eq!(store.stats(), (1, copy(hlc, value).size("k")), "{hlc}");
            }
        });
    }

    #[test]
    fn a_batch_applies_like_one_copy_after_another_even_with_a_key_twice() {
        // Each batch against the same copies applied one at a time on a
        // store of the same kind: outcomes, copies, digest and counts agree.
        let batches: Vec<Vec<(&str, Stored)>> = vec![
            vec![("a", copy(2, Some("a2"))), ("b", copy(1, None))],
            vec![
                ("a", copy(3, Some("a3"))),
                ("a", copy(5, Some("a5"))),
                ("a", copy(4, Some("a4"))),
                ("c", copy(1, Some("c1"))),
            ],
            vec![
                ("a", copy(5, Some("a5"))),
                ("b", copy(2, Some("b2"))),
                ("b", copy(2, Some("b2"))),
                ("c", copy(0, Some("old"))),
            ],
        ];
        each_store_pair(|batched, single| {
            for batch in &batches {
                let owned: Vec<(String, Stored)> = batch
                    .iter()
                    .map(|(k, c)| (k.to_string(), c.clone()))
                    .collect();
                let one_by_one: Vec<_> = batch
                    .iter()
                    .map(|(k, c)| single.apply(k, c.clone()))
                    .collect();
                assert_eq!(batched.apply_many(&owned), one_by_one, "{batch:?}");
                for key in ["a", "b", "c"] {
                    assert_eq!(batched.get(key), single.get(key), "{key}");
                    assert_eq!(batched.held_version(key), single.held_version(key));
                }
                assert_eq!(batched.stats(), single.stats());
                assert_eq!(
                    batched.digest(HashRange::ALL),
                    single.digest(HashRange::ALL)
                );
            }
            assert_eq!(batched.get("a"), Some(copy(5, Some("a5"))));
        });
    }

    #[test]
    fn copies_and_versions_in_order_read_a_range_from_the_cursor_on_in_hash_order() {
        each_store(|store| {
            for i in 0..3000u64 {
                let value = (i % 7 != 0).then_some("value");
                store
                    .apply(&format!("key:{i}"), copy(i + 1, value))
                    .unwrap();
            }
            let mut held: Vec<(u64, String)> = Vec::new();
            store.scan(HashRange::ALL, &mut |key, _| {
                held.push((Ring::key_hash(key.as_bytes()), key.to_string()));
            });
            held.sort();
            let ring = Ring::with_vnodes(["a", "b", "c"], 4);
            let mut ranges: Vec<HashRange> = ring.arcs().into_iter().map(|(r, _)| r).collect();
            ranges.push(HashRange::ALL);
            for range in ranges {
                let inside: Vec<&(u64, String)> = (held.iter())
                    .filter(|(h, _)| (range.start..=range.end).contains(h))
                    .collect();
                let before = held.iter().find(|(h, _)| *h < range.start);
                let after = held.iter().find(|(h, _)| *h > range.end);
                let cursors = [
                    None,
                    inside.get(10).copied(),
                    inside.last().copied(),
                    before,
                    after,
                ];
                for cursor in cursors {
                    let cursor = cursor.map(|(h, k)| (*h, k.as_str()));
                    let expected: Vec<(String, Stored)> = (inside.iter())
                        .filter(|(h, k)| cursor.is_none_or(|c| (*h, k.as_str()) > c))
                        .map(|(_, k)| (k.clone(), store.get(k).unwrap()))
                        .collect();
                    let mut got = Vec::new();
                    store.copies_in_order(range, cursor, &mut |key, copy| {
                        got.push((key.to_string(), copy));
                        true
                    });
                    assert_eq!(got, expected, "{range:?} after {cursor:?}");
                    // Stopping early stops there.
                    let mut first = Vec::new();
                    store.copies_in_order(range, cursor, &mut |key, copy| {
                        first.push((key.to_string(), copy));
                        first.len() < 5
                    });
                    assert_eq!(first, expected[..expected.len().min(5)]);
                    // The versions alone, the same way.
                    let versions: Vec<(String, Version)> = (expected.iter())
                        .map(|(k, c)| (k.clone(), c.version))
                        .collect();
                    let mut got = Vec::new();
                    store.versions_in_order(range, cursor, &mut |key, version| {
                        got.push((key.to_string(), version));
                        got.len() < 7
                    });
                    assert_eq!(got, versions[..versions.len().min(7)], "{range:?}");
                    let mut all = Vec::new();
                    store.versions_in_order(range, cursor, &mut |key, version| {
                        all.push((key.to_string(), version));
                        true
                    });
                    assert_eq!(all, versions, "{range:?} after {cursor:?}");
                }
            }
        });
    }

    /// Runs `test` on two fresh stores of each kind.
    fn each_store_pair(test: impl Fn(&dyn Store, &dyn Store)) {
        test(&MemStore::new(), &MemStore::new());
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let [a, b] = dirs.each_ref().map(|dir| {
            crate::disk::DiskStore::open(
                dir.path(),
                "w1",
                crate::disk::SyncPolicy::Never,
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(60),
            )
            .unwrap()
            .0
        });
        test(&a, &b);
    }

    #[test]
    fn apply_reports_replays_and_older_copies() {
        each_store(|store| {
            assert_eq!(store.apply("k", copy(5, Some("x"))), Ok(Applied::Stored));
            assert_eq!(store.apply("k", copy(5, Some("x"))), Ok(Applied::Held));
            assert_eq!(
                store.apply("k", copy(4, Some("old"))),
                Ok(Applied::Older { held: v(5) })
            );
        });
    }

    #[test]
    fn a_key_too_long_to_store_is_refused_and_nothing_changes() {
        // Longer than any valid key (the wire refuses them first): the
        // store refuses it too rather than hold a key it cannot describe.
        let long = "k".repeat(70_000);
        each_store(|store| {
            store.apply("short", copy(1, Some("x"))).unwrap();
            let before = (store.stats(), store.digest(HashRange::ALL));
            assert!(store.apply(&long, copy(2, Some("y"))).is_err());
            assert_eq!(store.get(&long), None);
            assert_eq!((store.stats(), store.digest(HashRange::ALL)), before);
        });
    }

    #[test]
    fn a_tombstone_keeps_older_values_out_until_purged() {
        each_store(|store| {
            store.apply("k", copy(1, Some("x"))).unwrap();
            store.apply("k", copy(2, None)).unwrap();
            assert_eq!(
                store.apply("k", copy(1, Some("x"))),
                Ok(Applied::Older { held: v(2) })
            );
            assert_eq!(store.get("k"), Some(copy(2, None)));
            assert_eq!(store.purge_tombstones(v(2)), 0, "not older than the cutoff");
            assert_eq!(store.purge_tombstones(v(3)), 1);
            assert_eq!(store.get("k"), None);
            assert_eq!(store.stats(), (0, 0));
        });
    }

    #[test]
    fn remove_if_spares_a_newer_write() {
        each_store(|store| {
            store.apply("k", copy(1, Some("x"))).unwrap();
            store.apply("k", copy(2, Some("y"))).unwrap();
            assert!(!store.remove_if("k", v(1)));
            assert!(store.remove_if("k", v(2)));
            assert_eq!(store.get("k"), None);
        });
    }

    #[test]
    fn remove_many_if_removes_each_key_still_at_its_version_once() {
        each_store(|store| {
            let keys: Vec<String> = (0..3000).map(|i| format!("key:{i}")).collect();
            for key in &keys {
                store.apply(key, copy(1, Some("x"))).unwrap();
            }
            // Every third key written again since; one key twice in the
            // list; one never written.
            for key in keys.iter().step_by(3) {
                store.apply(key, copy(2, Some("newer"))).unwrap();
            }
            let mut listed: Vec<(&str, Version)> =
                keys.iter().map(|k| (k.as_str(), v(1))).collect();
            listed.insert(2, ("key:1", v(1)));
            listed.push(("never", v(1)));
            assert_eq!(store.remove_many_if(&listed), 2000);
            for (i, key) in keys.iter().enumerate() {
                let expected = (i % 3 == 0).then(|| copy(2, Some("newer")));
                assert_eq!(store.get(key), expected, "{key}");
            }
            let left: usize = keys
                .iter()
                .step_by(3)
                .map(|k| k.len() + "newer".len())
                .sum();
            assert_eq!(store.stats(), (1000, left));
            assert_eq!(
                store.digest(HashRange::ALL),
                scanned_digest(store, HashRange::ALL)
            );
            assert_eq!(
                store.remove_many_if(&listed),
                0,
                "nothing left at version 1"
            );
        });
    }

    #[test]
    fn stats_count_keys_and_bytes_and_a_scan_of_everything_sees_everything() {
        each_store(|store| {
            for i in 0..1000 {
                store
                    .apply(&format!("key{i}"), copy(1, Some("0123456789")))
                    .unwrap();
            }
            store.apply("key0", copy(2, Some("01234"))).unwrap();
            let expected_bytes: usize = (0..1000)
                .map(|i| format!("key{i}").len() + 10)
                .sum::<usize>()
                - 5;
            assert_eq!(store.stats(), (1000, expected_bytes));
            let mut seen = 0;
            store.scan(HashRange::ALL, &mut |_, _| seen += 1);
            assert_eq!(seen, 1000);
        });
    }

    /// The digest of `range` computed the slow way, from a scan.
    fn scanned_digest(store: &dyn Store, range: HashRange) -> Digest {
        let mut d = Digest::default();
        store.scan(range, &mut |key, version| {
            let hash = Ring::key_hash(key.as_bytes());
            assert!(range.contains(hash), "{key} scanned outside {range:?}");
            d.add(hash, version);
        });
        d
    }

    #[test]
    fn digests_follow_writes_removals_and_purges_exactly() {
        let ring = Ring::with_vnodes(["w1", "w2", "w3", "w4"], 256);
        let arcs: Vec<HashRange> = ring.arcs().into_iter().map(|(r, _)| r).collect();
        let check = |store: &dyn Store| {
            for range in arcs.iter().chain([&HashRange::ALL]) {
                assert_eq!(
                    store.digest(*range),
                    scanned_digest(store, *range),
                    "{range:?}"
                );
            }
            let total: u64 = arcs.iter().map(|r| store.digest(*r).count).sum();
            assert_eq!(total as usize, store.stats().0, "arcs partition the store");
        };
        each_store(|store| {
            for i in 0..20_000 {
                store
                    .apply(&format!("key:{i}"), copy(1, Some("v")))
                    .unwrap();
            }
            check(store);
            for i in (0..20_000).step_by(3) {
                store.apply(&format!("key:{i}"), copy(2, None)).unwrap();
            }
            for i in (0..20_000).step_by(7) {
                store
                    .apply(&format!("key:{i}"), copy(3, Some("w")))
                    .unwrap();
            }
            check(store);
            for i in (0..20_000).step_by(5) {
                let key = format!("key:{i}");
                let version = store.get(&key).map(|c| c.version).unwrap_or_default();
                store.remove_if(&key, version);
            }
            store.purge_tombstones(v(3));
            check(store);
            let other = MemStore::new();
            let mut keys = Vec::new();
            store.scan(HashRange::ALL, &mut |k, _| keys.push(k.to_string()));
            for k in &keys {
                other.apply(k, store.get(k).unwrap()).unwrap();
            }
            assert_eq!(other.digest(HashRange::ALL), store.digest(HashRange::ALL));
            other.apply("key:1", copy(9, Some("newer"))).unwrap();
            assert_ne!(other.digest(HashRange::ALL), store.digest(HashRange::ALL));
        });
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A sparse store (most pages of buckets empty, as in a new
        /// cluster) digests any range as a scan of it would: ranges that
        /// start and end anywhere, across pages, inside one bucket.
        #[test]
        fn a_sparse_store_digests_any_range_as_a_scan_would(
            keys in proptest::collection::vec(0u32..5_000, 0..60),
            bounds in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u64..1 << 56), 1..20),
        ) {
            let mut ranges: Vec<HashRange> = bounds
                .iter()
                .map(|&(start, len)| HashRange { start, end: start.saturating_add(len) })
                .collect();
            // Ranges that end or start exactly at a key's hash.
            for k in keys.iter().take(5) {
                let h = Ring::key_hash(format!("key:{k}").as_bytes());
                ranges.push(HashRange { start: h, end: h.saturating_add(1 << 40) });
                ranges.push(HashRange { start: h.saturating_sub(1 << 50), end: h });
            }
            each_store(|store| {
                for (i, k) in keys.iter().enumerate() {
                    store.apply(&format!("key:{k}"), copy(i as u64 + 1, Some("v"))).unwrap();
                }
                for range in &ranges {
                    assert_eq!(store.digest(*range), scanned_digest(store, *range), "{range:?}");
                }
            });
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Batches of many keys, each maybe several times with versions in
        /// any order, tombstones and a key too long to store among them:
        /// applied as a batch, they do what they do one copy after another
        /// (a store may take a batch's copies in any order it likes, but
        /// a key's own copies in the order given).
        #[test]
        fn any_batch_applies_like_one_copy_after_another(
            batches in proptest::collection::vec(
                proptest::collection::vec((0usize..13, 0u64..8, proptest::prelude::any::<bool>()), 0..40),
                1..4,
            ),
        ) {
            let long = "k".repeat(70_000);
            let key = |k: usize| if k == 12 { long.clone() } else { format!("key:{k}") };
            each_store_pair(|batched, single| {
                for batch in &batches {
                    let owned: Vec<(String, Stored)> = batch
                        .iter()
                        .map(|&(k, hlc, gone)| (key(k), copy(hlc, (!gone).then_some("v"))))
                        .collect();
                    let one_by_one: Vec<_> = owned
                        .iter()
                        .map(|(k, c)| single.apply(k, c.clone()))
                        .collect();
                    assert_eq!(batched.apply_many(&owned), one_by_one);
                    for k in 0..12 {
                        assert_eq!(batched.get(&key(k)), single.get(&key(k)), "{k}");
                    }
                    assert_eq!(batched.stats(), single.stats());
                    assert_eq!(batched.digest(HashRange::ALL), single.digest(HashRange::ALL));
                }
            });
        }
    }

    #[test]
    fn a_range_within_one_bucket_or_inverted_is_handled() {
        each_store(|store| {
            store.apply("user123", copy(1, Some("x"))).unwrap();
            let h = Ring::key_hash(b"user123");
            let point = HashRange { start: h, end: h };
            assert_eq!(store.digest(point).count, 1);
            let inverted = HashRange {
                start: h,
                end: h - 1,
            };
            assert_eq!(store.digest(inverted), Digest::default());
            let mut seen = 0;
            store.scan(inverted, &mut |_, _| seen += 1);
            assert_eq!(seen, 0);
        });
    }
}
