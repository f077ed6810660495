//! The durable [`Store`]: copies in fjall, an embedded LSM engine with a
//! journal, in a data dir that belongs to one worker.
//!
//! Layout: one fjall keyspace, each copy under `xxh3(key)` (8 bytes, big
//! endian) followed by the key, so a ring arc is one ordered range scan;
//! the value is the version (hlc and node, 8 bytes each, big endian), a tag
//! byte (0: tombstone, 1: value) and the value's bytes. In memory, per
//! bucket of the 2^16 of the hash circle: its digest and what it holds of
//! each copy (two hashes of the key, version, size, kind: 40 bytes a copy,
//! no value), made by one scan at open and kept exact under the bucket's
//! lock on every change. So comparing an arc with a co-owner reads nothing
//! from the engine, and neither does deciding a write (newer, a replay,
//! older) or versioning one: a write is one journal append, and a batch of
//! copies from a peer one append for all of them.
//!
//! Durability follows `--sync`. Every write is handed to the OS before it
//! returns, so a killed process (`kill -9`, an OOM kill) loses
//! nothing that was acknowledged in any mode; what the modes change is a
//! power loss or a kernel crash. `always`: a copy counts (towards W=2, or
//! as confirmed to a peer) only after an fsync that covers it, which a
//! thread of its own runs for every write made so far at once (group
//! commit). `interval`: an fsync every `--sync-every` (as Redis
//! `appendfsync everysec`). `never`: the OS writes back when it likes.
//!
//! The dir holds `worker-id` (whose data this is: another id is refused),
//! `LOCK` (held while a worker runs: a second process is refused),
//! `engine/` (fjall's files) and, after a worker left with every copy
//! confirmed by its owners, `LEFT` (when; see [`mark_left`]). fjall cuts a
//! torn tail off its journal when it opens (a batch whose end never reached
//! the disk) and keeps everything before it; any other damage stops the
//! worker with a message saying how to recover.

use crate::store::{
    bucket_of, Applied, BucketDigests, Persisted, Store, StoreError, Stored, BUCKET_BITS,
};
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use kv_wire::{Digest, HashRange, Ring, Version};
use std::fs::File;
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Bytes before a copy's value: hlc, node, tag.
const HEADER: usize = 17;
/// The longest journal tail a crash can tear: the writes since the last
/// fsync (a fraction of a second of them with `--sync interval`). A longer
/// cut means damage further in, which stops the worker instead.
const TORN_TAIL_MAX: u64 = 8 * 1024 * 1024;
const TOMBSTONE: u8 = 0;
/// The most threads a data dir is read with when it opens.
const MAX_LOAD_THREADS: usize = 8;
/// How often a sealed journal that outlived its writes is looked for
/// ([`Journals`]).
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// The keyspace's memtable (see `open`).
const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;
/// How often a failing engine is logged.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);
/// Copies removed per engine batch ([`Store::remove_many_if`]): a batch
/// holds its buckets' locks while it commits, so writers wait for one
/// batch at most.
const REMOVE_BATCH: usize = 1024;
const VALUE: u8 = 1;

/// When writes reach the disk (`--sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncPolicy {
    /// fsync before a copy counts: nothing acknowledged is lost even to a
    /// power cut.
    Always,
    /// fsync every `--sync-every`: a power cut loses at most that much.
    Interval,
    /// Never fsync: the OS writes back when it likes.
    Never,
}

/// What the store keeps in memory of each copy: enough to decide a write
/// (version, size, kind) and to digest any range, without reading the
/// engine; 40 bytes a copy. A copy is known by its key's ring hash and a
/// second, independent 64-bit hash of the key: two keys are taken for one
/// only if both collide (2^-128), and the engine itself keys by the whole
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    hash: u64,
    check: u64,
    version: Version,
    size: u32,
    tombstone: bool,
}

impl Held {
    /// A copy of `key` (whose ring hash is `hash`) at `version`, `size`
    /// bytes of key and value.
    fn new(hash: u64, key: &[u8], version: Version, size: usize, tombstone: bool) -> Held {
        Held {
            hash,
            check: key_check(key),
            version,
            size: u32::try_from(size).unwrap_or(u32::MAX),
            tombstone,
        }
    }

    fn of(hash: u64, key: &str, copy: &Stored) -> Held {
        let tombstone = copy.value.is_none();
        Held::new(
            hash,
            key.as_bytes(),
            copy.version,
            copy.size(key),
            tombstone,
        )
    }
}

/// The second hash of a key (see [`Held`]).
fn key_check(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, 0x6b76_6368_6563_6b31)
}

/// One bucket's copies as the store knows them in memory, sorted by hash
/// and check: a lookup is a binary search, so its cost grows with the log
/// of the bucket (a store of 10 million copies holds ~150 a bucket) rather
/// than with the bucket.
#[derive(Debug, Default)]
struct Summary {
    held: Vec<Held>,
}

impl Summary {
    /// Where the key with this hash and check is, or would go.
    fn position(&self, hash: u64, check: u64) -> Result<usize, usize> {
        self.held
            .binary_search_by(|h| (h.hash, h.check).cmp(&(hash, check)))
    }

    /// What is held of the key with this hash and check.
    fn find(&self, hash: u64, check: u64) -> Option<Held> {
        self.position(hash, check).ok().map(|i| self.held[i])
    }

    /// Records `now` in place of what was held of its key, in the bucket's
    /// digest too; returns what it replaced.
    fn replace(&mut self, digests: &BucketDigests, now: Held) -> Option<Held> {
        digests.add(now.hash, now.version);
        match self.position(now.hash, now.check) {
            Ok(i) => {
                let before = std::mem::replace(&mut self.held[i], now);
                digests.remove(before.hash, before.version);
                Some(before)
            }
            Err(i) => {
                self.held.insert(i, now);
                None
            }
        }
    }

    /// Forgets `gone` if it is what is held of its key.
    fn remove(&mut self, digests: &BucketDigests, gone: Held) {
        if let Ok(i) = self.position(gone.hash, gone.check) {
            if self.held[i] == gone {
                self.held.remove(i);
                digests.remove(gone.hash, gone.version);
            }
        }
    }

    /// The digest of this bucket's copies inside `range`.
    fn within(&self, range: HashRange) -> Digest {
        let mut d = Digest::default();
        for h in &self.held {
            if range.contains(h.hash) {
                d.add(h.hash, h.version);
            }
        }
        d
    }
}

/// The summaries of the buckets a batch touches, locked together
/// ([`DiskStore::lock_all`]).
struct Locked<'s> {
    ids: Vec<usize>,
    guards: Vec<MutexGuard<'s, Summary>>,
}

impl Locked<'_> {
    /// Loads, for every bucket locked, the copies a binary search probes
    /// first: loads that depend on nothing before them, so their cache
    /// misses overlap, where each search would wait for its own in turn
    /// (the first probe's miss was two thirds of a batch's time in the
    /// summaries during a durable bulk load).
    fn warm(&self) {
        for summary in &self.guards {
            let held = &summary.held;
            for eighth in 1..8 {
                if let Some(h) = held.get(held.len() * eighth / 8) {
                    std::hint::black_box(h.hash);
                }
            }
        }
    }

    /// The summary of the bucket of `hash`, one of those locked.
    fn at(&mut self, hash: u64) -> &mut Summary {
        let i = (self.ids.binary_search(&bucket_of(hash))).unwrap_or_else(|i| i);
        &mut self.guards[i]
    }
}

/// Why a data dir cannot be used. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The dir or a file in it cannot be created or read.
    #[error("cannot use the data dir {path}: {source}; check that it exists, is writable by this user and has space")]
    Io {
        /// The file or dir.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Another process holds the dir.
    #[error("the data dir {dir} is in use by another process (it holds {dir}/LOCK): stop it, or give this worker another --data-dir")]
    Locked {
        /// The dir.
        dir: PathBuf,
    },
    /// The dir holds another worker's data.
    #[error("the data dir {dir} holds the data of worker {found:?}, not {id:?}: start it with --id {found}, or move the dir away to start {id} empty (the cluster refills it)")]
    OtherWorker {
        /// The dir.
        dir: PathBuf,
        /// The id recorded in it.
        found: String,
        /// The id this worker was started with.
        id: String,
    },
    /// The engine's files are damaged beyond a torn tail.
    #[error("the store in {path} is damaged ({reason}): move {dir} away and start the worker again; it rejoins empty and the cluster refills it")]
    Damaged {
        /// The engine's dir, or the file found damaged.
        path: PathBuf,
        /// The data dir.
        dir: PathBuf,
        /// What the engine said.
        reason: String,
    },
}

/// What a data dir held when it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Opened {
    /// Copies (tombstones included).
    pub keys: usize,
    /// The newest version among them: the worker's clock moves past it, so
    /// a restarted worker never issues a version older than its own.
    pub newest: Version,
}

/// What [`DiskStore::load_part`] found in its part.
#[derive(Debug, Default)]
struct Loaded {
    keys: i64,
    bytes: i64,
    tombstones: i64,
    newest: Version,
}

/// The durable store (see the module docs).
pub struct DiskStore {
    dir: PathBuf,
    db: Database,
    copies: Keyspace,
    buckets: Vec<Mutex<Summary>>,
    digests: BucketDigests,
    keys: AtomicI64,
    bytes: AtomicI64,
    tombstones: AtomicI64,
    syncer: Arc<Syncer>,
    /// When an engine failure was last logged (Unix ms).
    last_failure_log: AtomicU64,
    /// The last write failed, and why: what `/readyz` says until a write
    /// succeeds again.
    failing: Mutex<Option<String>>,
    /// Whether `failing` holds a reason.
    is_failing: AtomicBool,
    /// Held for as long as the store is open.
    _lock: File,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore").field("dir", &self.dir).finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The engine's keys of the copies whose hashes are in `range`.
fn bounds(range: HashRange) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let start = Bound::Included(range.start.to_be_bytes().to_vec());
    let end = match range.end.checked_add(1) {
        Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
        None => Bound::Unbounded,
    };
    (start, end)
}

/// Part `i` of the hash circle cut into `n` parts of (nearly) equal size.
fn part(i: usize, n: usize) -> HashRange {
    let at = |i: usize| ((i as u128) << 64) / n as u128;
    HashRange {
        start: at(i) as u64,
        end: (at(i + 1) - 1) as u64,
    }
}

fn encode_key(hash: u64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&hash.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn encode_copy(copy: &Stored) -> Vec<u8> {
    let value = copy.value.as_deref().unwrap_or_default();
    let mut v = Vec::with_capacity(HEADER + value.len());
    v.extend_from_slice(&copy.version.hlc.to_be_bytes());
    v.extend_from_slice(&copy.version.node.to_be_bytes());
    v.push(if copy.value.is_some() {
        VALUE
    } else {
        TOMBSTONE
    });
    v.extend_from_slice(value);
    v
}

/// What a stored pair says without copying it: the key's hash, the
/// version, and whether it is a tombstone; or why it is not a pair.
fn decode_header(key: &[u8], value: &[u8]) -> Result<(u64, Version, bool), String> {
    if key.len() < 8 || value.len() < HEADER {
        return Err(format!(
            "an entry of {} + {} bytes is too short",
            key.len(),
            value.len()
        ));
    }
    let u64_at = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(a)
    };
    let version = Version {
        hlc: u64_at(value, 0),
        node: u64_at(value, 8),
    };
    match value[16] {
        TOMBSTONE => Ok((u64_at(key, 0), version, true)),
        VALUE => Ok((u64_at(key, 0), version, false)),
        tag => Err(format!("unknown tag {tag}")),
    }
}

/// A stored pair back: (hash, key, copy), or why it is not one.
fn decode(key: &[u8], value: Bytes) -> Result<(u64, String, Stored), String> {
    let (hash, version, tombstone) = decode_header(key, &value)?;
    let name = std::str::from_utf8(&key[8..])
        .map_err(|_| "a key is not UTF-8".to_string())?
        .to_string();
    let value = (!tombstone).then(|| value.slice(HEADER..));
    Ok((hash, name, Stored { version, value }))
}

impl DiskStore {
    /// Opens (or creates) the data dir `dir` for worker `id`: checks whose
    /// it is, locks it, drops what a worker left with longer than
    /// `keep_left` ago (see [`mark_left`]), recovers the engine (cutting a
    /// torn journal tail), and scans every copy once for the digests and
    /// counts.
    pub fn open(
        dir: &Path,
        id: &str,
        policy: SyncPolicy,
        every: Duration,
        keep_left: Duration,
    ) -> Result<(DiskStore, Opened), OpenError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        claim(dir, id)?;
        let engine = dir.join("engine");
        let damaged = |e: fjall::Error| OpenError::Damaged {
            path: engine.clone(),
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        };
        let marker = dir.join("DAMAGED");
        if let Ok(reason) = std::fs::read_to_string(&marker) {
            return Err(OpenError::Damaged {
                path: marker,
                dir: dir.to_path_buf(),
                reason: reason.trim().to_string(),
            });
        }
        back_from_leaving(dir, &engine, keep_left)?;
        let ends = journal_ends(&engine);
        // Each write batch is handed to the OS as it commits (measured:
        // cheaper than waking a thread to do it for a group of writes), so
        // only `always` waits for anything.
        // One background thread for flushes and compactions: with two,
        // fjall's first one hands every compaction to the second and spins
        // re-queueing it while the second works (measured: an eighth of a
        // worker's CPU during a bulk load), and a worker shares its cores
        // with its peers anyway.
        let started = std::time::Instant::now();
        let db = Database::builder(&engine)
            .worker_threads(1)
            .open()
            .map_err(damaged)?;
        if let Err((journal, reason)) = check_torn_tails(ends) {
            // fjall has cut the journal already: the marker keeps the
            // worker from serving what is left until someone looks.
            let _ = std::fs::write(&marker, format!("{}: {reason}\n", journal.display()));
            return Err(OpenError::Damaged {
                path: journal,
                dir: dir.to_path_buf(),
                reason,
            });
        }
        // A smaller memtable than fjall's 64 MiB: its journal is what a
        // restart replays before serving, so this bounds the restart time.
        let copies = db
            .keyspace("copies", || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(damaged)?;
        let store = DiskStore {
            dir: dir.to_path_buf(),
            syncer: Syncer::start(
                ActiveJournal::new(&engine),
                Journals {
                    db: db.clone(),
                    copies: copies.clone(),
                },
                policy,
                every,
                TRIM_EVERY,
            ),
            db,
            copies,
            buckets: (0..1usize << BUCKET_BITS)
                .map(|_| Mutex::default())
                .collect(),
            digests: BucketDigests::new(),
            keys: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
            tombstones: AtomicI64::new(0),
            last_failure_log: AtomicU64::new(0),
            failing: Mutex::new(None),
            is_failing: AtomicBool::new(false),
            _lock: lock,
        };
        let recovered = started.elapsed();
        let opened = store.load().map_err(|reason| OpenError::Damaged {
            path: engine.clone(),
            dir: dir.to_path_buf(),
            reason,
        })?;
        info!(
            dir = %dir.display(),
            keys = opened.keys,
            sync = ?policy,
            engine_ms = recovered.as_millis(),
            scan_ms = (started.elapsed() - recovered).as_millis(),
            "data dir opened"
        );
        Ok((store, opened))
    }

    /// Builds the digests and counts from one scan of everything, split
    /// by hash into a part per core, the parts read at once: the scan is
    /// most of a restart's time before the worker serves (a worker holding
    /// 1,000,000 copies: 0.67 s of its 1.1 s open on one thread).
    fn load(&self) -> Result<Opened, String> {
        let parts =
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_LOAD_THREADS));
        let loaded = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..parts)
                .map(|i| scope.spawn(move || self.load_part(part(i, parts))))
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("a thread reading the data dir panicked".into()))
                })
                .collect::<Result<Vec<Loaded>, String>>()
        })?;
        let mut opened = Opened::default();
        let (mut keys, mut bytes, mut tombstones) = (0, 0, 0);
        for part in loaded {
            keys += part.keys;
            bytes += part.bytes;
            tombstones += part.tombstones;
            opened.newest = opened.newest.max(part.newest);
        }
        self.account(keys, bytes, tombstones);
        opened.keys = keys as usize;
        Ok(opened)
    }

    /// [`DiskStore::load`] of the copies whose hashes are in `range`: one
    /// ordered read, which decodes the copies' headers only (not their
    /// keys or values). Runs before the worker serves anything, so the
    /// buckets' locks are free but at the parts' borders.
    fn load_part(&self, range: HashRange) -> Result<Loaded, String> {
        let mut loaded = Loaded::default();
        for guard in self.copies.range::<Vec<u8>, _>(bounds(range)) {
            let (k, v) = guard.into_inner().map_err(|e| e.to_string())?;
            let (hash, version, tombstone) = decode_header(&k, &v)?;
            let size = k.len() - 8 + v.len() - HEADER;
            let held = Held::new(hash, &k[8..], version, size, tombstone);
            self.bucket(bucket_of(hash)).replace(&self.digests, held);
            loaded.keys += 1;
            loaded.bytes += size as i64;
            loaded.tombstones += i64::from(tombstone);
            loaded.newest = loaded.newest.max(version);
        }
        Ok(loaded)
    }

    // A panic while a bucket's lock was held leaves a digest that is at
    // worst off by the one change; keep serving (anti-entropy copes).
    fn bucket(&self, b: usize) -> MutexGuard<'_, Summary> {
        self.buckets[b].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error for a failed engine call, logged at most once per
    /// [`FAILURE_LOG_EVERY`] (a full disk fails every write).
    fn failed(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        let now = kv_wire::version::unix_ms(std::time::SystemTime::now());
        let last = self.last_failure_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= FAILURE_LOG_EVERY.as_millis() as u64
            && self
                .last_failure_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            error!(dir = %self.dir.display(), error = %e, "the data dir failed to {what} (further failures are not logged for 10 s)");
        }
        StoreError(format!("the data dir {} failed to {what}: {e}", self.dir.display()).into())
    }

    /// [`Store::apply_many`] (and `apply`, a batch of one) on borrowed
    /// copies: one engine batch for all the copies that are newer than
    /// held, handed to the OS in one write; decided from the in-memory
    /// summaries (no engine reads), whose buckets stay locked from the
    /// comparison until the batch is in, so a concurrent write to the same
    /// key waits rather than interleaves.
    ///
    /// The copies are taken in key order (ring hash, then key; a key's
    /// copies in the order given). The engine's memtable is a skiplist:
    /// each insert a neighbour of the last finds its way through nodes
    /// still in the cache, where inserts in arrival order each walk a
    /// random path (a quarter of a durable bulk load's CPU went to that
    /// walk). Measured loading 1,000,000 keys into a durable `kvctl local`,
    /// four rounds each, alternating: 91-98k -> 106-131k keys/s, the
    /// workers' CPU 19.0-20.4 s -> 14.3-17.3 s.
    fn write(&self, copies: &[(&str, &Stored)]) -> Vec<Result<Applied, StoreError>> {
        let hashes: Vec<u64> = copies
            .iter()
            .map(|(key, _)| Ring::key_hash(key.as_bytes()))
            .collect();
        let mut order: Vec<usize> = (0..copies.len()).collect();
        order.sort_unstable_by_key(|&i| (hashes[i], copies[i].0, i));
        let mut locked = self.lock_all(order.iter().map(|&i| hashes[i]));
        // Every place is written below: each index is in `order` once.
        let mut outcomes = vec![Ok(Applied::Held); copies.len()];
        // The copies going to the engine, in key order: per key, the last
        // newer one (a key can come twice in a batch).
        let mut planned: Vec<(Held, usize)> = Vec::with_capacity(copies.len());
        for &i in &order {
            let ((key, copy), hash) = (copies[i], hashes[i]);
            if let Err(e) = crate::store::storable(key) {
                outcomes[i] = Err(e);
                continue;
            }
            let now = Held::of(hash, key, copy);
            let earlier = planned
                .last()
                .filter(|&&(_, j)| copies[j].0 == key)
                .map(|&(latest, _)| latest);
            let held = earlier.or_else(|| locked.at(hash).find(hash, now.check));
            outcomes[i] = Ok(match held {
                Some(h) if h.version > copy.version => Applied::Older { held: h.version },
                Some(h) if h.version == copy.version => Applied::Held,
                _ => {
                    if earlier.is_some() {
                        planned.pop();
                    }
                    planned.push((now, i));
                    Applied::Stored
                }
            });
        }
        if planned.is_empty() {
            return outcomes;
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for &(_, i) in &planned {
            let (key, copy) = copies[i];
            batch.insert(&self.copies, encode_key(hashes[i], key), encode_copy(copy));
        }
        let committed = batch.commit().map_err(|e| match e {
            // fjall refuses every write after one failed (its journal may
            // be torn): reopening the data dir is the way back.
            fjall::Error::Poisoned => self.failed(
                "store a write",
                "the engine takes no more writes after a failed one; restart the worker once its disk has room",
            ),
            e => self.failed("store a write", e),
        });
        // The lock is taken only while failing or on a failure: a healthy
        // write checks one flag.
        if let Err(e) = committed {
            *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            self.is_failing.store(true, Ordering::Relaxed);
            for outcome in &mut outcomes {
                if *outcome == Ok(Applied::Stored) {
                    *outcome = Err(e.clone());
                }
            }
            return outcomes;
        }
        if self.is_failing.load(Ordering::Relaxed) {
            *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.is_failing.store(false, Ordering::Relaxed);
        }
        self.syncer.written();
        let (mut keys, mut bytes, mut tombstones) = (0, 0, 0);
        for (now, _) in planned {
            if let Some(b) = locked.at(now.hash).replace(&self.digests, now) {
                keys -= 1;
                bytes -= i64::from(b.size);
                tombstones -= i64::from(b.tombstone);
            }
            keys += 1;
            bytes += i64::from(now.size);
            tombstones += i64::from(now.tombstone);
        }
        drop(locked);
        self.account(keys, bytes, tombstones);
        outcomes
    }

    /// Locks the buckets of `hashes`, given in ascending order, in that
    /// order (key order is bucket order), so batches never wait on each
    /// other in a cycle (every other caller holds one bucket at a time).
    fn lock_all(&self, hashes: impl Iterator<Item = u64>) -> Locked<'_> {
        let mut ids: Vec<usize> = hashes.map(bucket_of).collect();
        ids.dedup();
        // Each lock is a locked instruction, which waits for every load
        // before it: the locks' and digests' lines are loaded first, with
        // plain loads whose misses overlap (as `MemStore` does).
        for &b in &ids {
            std::hint::black_box(self.buckets[b].is_poisoned());
            self.digests.touch(b);
        }
        let guards = ids.iter().map(|b| self.bucket(*b)).collect();
        let locked = Locked { ids, guards };
        locked.warm();
        locked
    }

    /// [`Store::remove_many_if`] for one engine batch.
    fn remove_batch_if(&self, copies: &[(&str, Version)]) -> usize {
        let hashes: Vec<u64> = (copies.iter())
            .map(|(key, _)| Ring::key_hash(key.as_bytes()))
            .collect();
        let mut order: Vec<usize> = (0..copies.len()).collect();
        order.sort_unstable_by_key(|&i| (hashes[i], copies[i].0));
        order.dedup_by_key(|i| (hashes[*i], copies[*i].0));
        let mut locked = self.lock_all(order.iter().map(|&i| hashes[i]));
        let gone: Vec<(usize, Held)> = (order.into_iter())
            .filter_map(|i| {
                let (key, version) = copies[i];
                let held = locked
                    .at(hashes[i])
                    .find(hashes[i], key_check(key.as_bytes()))?;
                (held.version == version).then_some((i, held))
            })
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for &(i, _) in &gone {
            batch.remove(&self.copies, encode_key(hashes[i], copies[i].0));
        }
        if let Err(e) = batch.commit() {
            self.failed("remove copies", e);
            return 0;
        }
        let (mut bytes, mut tombstones) = (0, 0);
        for &(i, held) in &gone {
            locked.at(hashes[i]).remove(&self.digests, held);
            bytes += i64::from(held.size);
            tombstones += i64::from(held.tombstone);
        }
        drop(locked);
        self.account(-(gone.len() as i64), -bytes, -tombstones);
        gone.len()
    }

    /// What the summary holds of `key`.
    fn held(&self, hash: u64, key: &str) -> Option<Held> {
        self.bucket(bucket_of(hash))
            .find(hash, key_check(key.as_bytes()))
    }

    fn read(&self, hash: u64, key: &str) -> Result<Option<Stored>, StoreError> {
        let k = encode_key(hash, key);
        let Some(v) = self.copies.get(&k).map_err(|e| self.failed("read", e))? else {
            return Ok(None);
        };
        decode(&k, v.into())
            .map(|(_, _, copy)| Some(copy))
            .map_err(|e| self.failed("decode a copy", e))
    }

    fn account(&self, keys: i64, bytes: i64, tombstones: i64) {
        self.keys.fetch_add(keys, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.tombstones.fetch_add(tombstones, Ordering::Relaxed);
    }
}

/// Where the data of each journal file in `engine` ends: after its last
/// non-zero byte (fjall preallocates journals with zeros). Empty when there
/// is no engine yet.
fn journal_ends(engine: &Path) -> Vec<(PathBuf, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 64 * 1024;
    let mut ends = Vec::new();
    for (_, path) in journals(engine) {
        let Ok(mut file) = File::open(&path) else {
            continue;
        };
        let mut at = file.metadata().map_or(0, |m| m.len());
        let mut buf = vec![0u8; CHUNK as usize];
        let end = loop {
            if at == 0 {
                break 0;
            }
            let from = at.saturating_sub(CHUNK);
            let len = (at - from) as usize;
            if file.seek(SeekFrom::Start(from)).is_err()
                || file.read_exact(&mut buf[..len]).is_err()
            {
                break at; // unreadable: claim nothing about it
            }
            if let Some(i) = last_nonzero(&buf[..len]) {
                break from + i as u64 + 1;
            }
            at = from;
        };
        ends.push((path, end));
    }
    ends
}

/// Where the last byte of `buf` that is not zero is. A journal's
/// preallocated tail is most of it (48 of 64 MiB after a 16 MiB memtable):
/// 64 bytes are OR-ed at a time, which the compiler does in vector
/// registers, before the bytes of the last block that is not all zeros.
fn last_nonzero(buf: &[u8]) -> Option<usize> {
    const BLOCK: usize = 64;
    let block = buf
        .chunks(BLOCK)
        .rposition(|c| c.iter().fold(0, |a, b| a | b) != 0)?;
    let from = block * BLOCK;
    buf[from..].iter().rposition(|b| *b != 0).map(|i| from + i)
}

/// fjall's journals in `engine`, by number (`<n>.jnl`; the highest is the
/// one being written, the others are sealed). Empty when there is none.
fn journals(engine: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(engine) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter_map(|path| {
            let n = path
                .file_name()?
                .to_str()?
                .strip_suffix(".jnl")?
                .parse()
                .ok()?;
            Some((n, path))
        })
        .collect();
    found.sort();
    found
}

/// The journal fjall is appending to, fsynced through a descriptor of our
/// own. fjall's `persist` holds its journal lock for the whole fsync, and
/// every write takes that lock to append, so each fsync would stall every
/// write on the worker; this one stalls none. It covers every write handed
/// to the OS before it: those are in this journal, or in one fjall sealed,
/// and fjall fsyncs a journal (and the dir) as it seals it.
struct ActiveJournal {
    engine: PathBuf,
    open: Option<(u64, File)>,
}

impl ActiveJournal {
    fn new(engine: &Path) -> ActiveJournal {
        ActiveJournal {
            engine: engine.to_path_buf(),
            open: None,
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let Some((n, path)) = journals(&self.engine).pop() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no journal in {}", self.engine.display()),
            ));
        };
        let file = match self.open.take() {
            Some((open, file)) if open == n => file,
            _ => File::open(&path)?,
        };
        // fdatasync: the records and the length, not the file's times.
        let synced = file.sync_data();
        self.open = Some((n, file));
        synced
    }
}

/// Checks each journal whose data fjall cut short while recovering (it cuts
/// at the first record that does not decode). A short cut is a torn tail,
/// the writes in flight when the process or machine died: logged. A cut
/// longer than [`TORN_TAIL_MAX`] is damage further in: the journal and why.
fn check_torn_tails(ends: Vec<(PathBuf, u64)>) -> Result<(), (PathBuf, String)> {
    for (path, end) in ends {
        let len = std::fs::metadata(&path).map_or(end, |m| m.len());
        let cut = end.saturating_sub(len);
        if cut > TORN_TAIL_MAX {
            return Err((
                path,
                format!("{cut} bytes of its journal after byte {len} do not decode, more than a torn write leaves"),
            ));
        }
        if cut > 0 {
            warn!(file = %path.display(), cut_bytes = cut, "a torn tail was cut off the journal (writes that never fully reached the disk before a crash); the rest is intact, and the cluster's other copies bring back what was cut");
        }
    }
    Ok(())
}

/// The file [`mark_left`] writes.
const LEFT: &str = "LEFT";

/// Records in `dir` that its worker left with every copy it held confirmed
/// by the copy's owners: what the dir holds is then a cache of what the
/// cluster holds. A worker that comes back under its id within
/// `keep_left` (a StatefulSet's rolling restart) serves it again and pulls
/// only what changed meanwhile; one that comes back later starts empty, as
/// its copies may miss deletes whose tombstones the others have purged
/// since, and the cluster refills it. A worker that stops any other way
/// (a crash, a drain cut short) keeps its copies whenever it comes back:
/// they may be the only ones.
pub fn mark_left(dir: &Path) -> std::io::Result<()> {
    let now = kv_wire::version::unix_ms(std::time::SystemTime::now());
    let path = dir.join(LEFT);
    let mut file = File::create(&path)?;
    file.write_all(format!("{now}\n").as_bytes())?;
    file.sync_all()?;
    File::open(dir)?.sync_all()
}

/// Acts on a `LEFT` mark in `dir` (see [`mark_left`]) before the engine
/// opens: keeps the copies if the worker left at most `keep_left` ago,
/// else deletes `engine`; then removes the mark, since from now on the
/// worker takes writes. A crash in between leaves the mark, and the next
/// start does the same again.
fn back_from_leaving(dir: &Path, engine: &Path, keep_left: Duration) -> Result<(), OpenError> {
    let path = dir.join(LEFT);
    let mark = match std::fs::read_to_string(&path) {
        Ok(mark) => mark,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path)(e)),
    };
    let now = kv_wire::version::unix_ms(std::time::SystemTime::now());
    // An unreadable mark still says every copy reached its owners.
    let away = mark
        .trim()
        .parse::<u64>()
        .map(|left| now.saturating_sub(left));
    match away {
        Ok(away) if away <= keep_left.as_millis() as u64 => {
            info!(away_ms = away, "back after leaving: serving the copies handed over then; the cluster sends what changed since");
        }
        _ => {
            warn!(away_ms = ?away.ok(), keep_left = %humantime::format_duration(keep_left), "back after leaving too long ago: dropping the copies handed over then (deletes since may be forgotten); the cluster refills this worker");
            match std::fs::remove_dir_all(engine) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(engine)(e)),
                _ => {}
            }
        }
    }
    std::fs::remove_file(&path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Records `id` as the dir's owner, or refuses another.
fn claim(dir: &Path, id: &str) -> Result<(), OpenError> {
    let path = dir.join("worker-id");
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim_end() == id => Ok(()),
        Ok(found) => Err(OpenError::OtherWorker {
            dir: dir.to_path_buf(),
            found: found.trim_end().to_string(),
            id: id.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut file = File::create(&path).map_err(io(&path))?;
            file.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(&path))
        }
        Err(e) => Err(io(&path)(e)),
    }
}

impl Store for DiskStore {
    fn get(&self, key: &str) -> Option<Stored> {
        let hash = Ring::key_hash(key.as_bytes());
        self.held(hash, key)?;
        // A read error is logged by `read`; the key then looks absent here,
        // which costs a pull or a quorum read from another owner, not data.
        self.read(hash, key).ok().flatten()
    }

    fn apply(&self, key: &str, copy: Stored) -> Result<Applied, StoreError> {
        let mut outcome = self.write(&[(key, &copy)]);
        outcome
            .pop()
            .unwrap_or_else(|| Err(StoreError("no outcome for a write".into())))
    }

    fn apply_many(&self, copies: &[(String, Stored)]) -> Vec<Result<Applied, StoreError>> {
        let copies: Vec<(&str, &Stored)> = copies.iter().map(|(k, c)| (k.as_str(), c)).collect();
        self.write(&copies)
    }

    fn held_version(&self, key: &str) -> Option<Version> {
        self.held(Ring::key_hash(key.as_bytes()), key)
            .map(|h| h.version)
    }

    fn remove_if(&self, key: &str, version: Version) -> bool {
        let hash = Ring::key_hash(key.as_bytes());
        let mut summary = self.bucket(bucket_of(hash));
        let Some(held) = summary.find(hash, key_check(key.as_bytes())) else {
            return false;
        };
        if held.version != version {
            return false;
        }
        if let Err(e) = self.copies.remove(encode_key(hash, key)) {
            self.failed("remove a copy", e);
            return false;
        }
        summary.remove(&self.digests, held);
        drop(summary);
        self.account(-1, -i64::from(held.size), -i64::from(held.tombstone));
        true
    }

    /// In engine batches: a leaver drops every key it handed off, and one
    /// write to the journal each was most of a durable worker's drain.
    fn remove_many_if(&self, copies: &[(&str, Version)]) -> usize {
        (copies.chunks(REMOVE_BATCH))
            .map(|batch| self.remove_batch_if(batch))
            .sum()
    }

    fn scan(&self, range: HashRange, visit: &mut dyn FnMut(&str, Version)) {
        self.copies_in_order(range, None, &mut |key, copy| {
            visit(key, copy.version);
            true
        });
    }

    fn versions_in_order(
        &self,
        range: HashRange,
        after: Option<(u64, &str)>,
        visit: &mut dyn FnMut(&str, Version) -> bool,
    ) {
        self.copies_in_order(range, after, &mut |key, copy| visit(key, copy.version));
    }

    /// One ordered range read of the engine from the cursor on; stops at
    /// the first engine error (logged), since a scan has no way to report
    /// it.
    fn copies_in_order(
        &self,
        range: HashRange,
        after: Option<(u64, &str)>,
        visit: &mut dyn FnMut(&str, Stored) -> bool,
    ) {
        if !range.is_valid() || after.is_some_and(|(hash, _)| hash > range.end) {
            return;
        }
        let (mut start, end) = bounds(range);
        if let Some((hash, key)) = after.filter(|(hash, _)| *hash >= range.start) {
            start = Bound::Excluded(encode_key(hash, key));
        }
        for guard in self.copies.range::<Vec<u8>, _>((start, end)) {
            match guard
                .into_inner()
                .map_err(|e| e.to_string())
                .and_then(|(k, v)| decode(&k, v.into()))
            {
                Ok((_, key, copy)) => {
                    if !visit(&key, copy) {
                        return;
                    }
                }
                Err(e) => {
                    self.failed("scan", e);
                    return;
                }
            }
        }
    }

    fn digest(&self, range: HashRange) -> Digest {
        self.digests.over(range, |b| self.bucket(b).within(range))
    }

    fn purge_tombstones(&self, before: Version) -> usize {
        if self.tombstones.load(Ordering::Relaxed) <= 0 {
            return 0;
        }
        let mut expired = Vec::new();
        self.copies_in_order(HashRange::ALL, None, &mut |key, copy| {
            if copy.value.is_none() && copy.version < before {
                expired.push((key.to_string(), copy.version));
            }
            true
        });
        let expired: Vec<(&str, Version)> = (expired.iter())
            .map(|(key, version)| (key.as_str(), *version))
            .collect();
        self.remove_many_if(&expired)
    }

    fn stats(&self) -> (usize, usize) {
        let keys = self.keys.load(Ordering::Relaxed).max(0) as usize;
        let bytes = self.bytes.load(Ordering::Relaxed).max(0) as usize;
        (keys, bytes)
    }

    fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn persisted(&self) -> Persisted {
        self.syncer.ticket()
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.syncer.stop();
        if let Err(e) = self.db.persist(PersistMode::SyncAll) {
            error!(dir = %self.dir.display(), error = %e, "the last fsync of the data dir failed");
        }
    }
}

/// How far writes are known to be on disk.
#[derive(Debug, Clone, Default)]
pub struct Synced {
    /// Every write numbered up to this is on disk.
    upto: u64,
    /// An fsync failed for the writes up to this.
    failed_upto: u64,
    error: Option<Arc<str>>,
}

/// A wait for the writes before it to be on disk (see [`Store::persisted`]).
#[derive(Debug)]
pub struct Ticket {
    n: u64,
    synced: watch::Receiver<Synced>,
}

impl Ticket {
    /// Resolves once write `n` is on disk, or its fsync failed.
    pub async fn wait(mut self) -> Result<(), StoreError> {
        let n = self.n;
        let outcome = self
            .synced
            .wait_for(|s| s.failed_upto >= n || s.upto >= n)
            .await
            .map(|s| s.clone());
        match outcome {
            Ok(s) if s.failed_upto >= n => {
                Err(StoreError(s.error.unwrap_or_else(|| {
                    "an fsync of the data dir failed".into()
                })))
            }
            Ok(_) => Ok(()),
            Err(_) => Err(StoreError("the store is closing".into())),
        }
    }
}

/// What the fsync thread is asked for, under the [`Syncer`]'s lock.
#[derive(Debug, Default)]
struct Wanted {
    /// The highest write a ticket waits for.
    upto: u64,
    /// The store is closing.
    stop: bool,
    /// The thread waits for a ticket (or the interval): only then does a
    /// new ticket wake it.
    asleep: bool,
}

/// Keeps the journals a restart replays short. fjall seals its journal
/// once it passes 64 MB, and deletes a sealed one only when the memtable
/// that was being written as it sealed reaches a table: when writes stop
/// before that memtable fills, the sealed journal stays, and a restart
/// reads all of it again (a worker killed after a load of 1,000,000 keys:
/// 74 MB, 0.9-1.5 s of its 2.0-2.4 s from start to ready). Flushing that
/// memtable lets fjall delete it.
struct Journals {
    db: Database,
    copies: Keyspace,
}

impl Journals {
    fn trim(&self) {
        if self.db.journal_count() > 1 {
            if let Err(e) = self.copies.rotate_memtable() {
                warn!(error = %e, "cannot flush the memtable that keeps a sealed journal");
            }
        }
    }
}

/// Numbers writes and runs the fsyncs: at once, for everything written
/// so far, whenever a ticket waits (`always`), or every interval. Every
/// `trim_every` it trims the journals ([`Journals`]).
struct Syncer {
    policy: SyncPolicy,
    written: AtomicU64,
    wanted: Mutex<Wanted>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
    /// Joined when the store closes: the thread holds the engine open.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Syncer {
    fn start(
        mut journal: ActiveJournal,
        journals: Journals,
        policy: SyncPolicy,
        every: Duration,
        trim_every: Duration,
    ) -> Arc<Syncer> {
        let syncer = Arc::new(Syncer {
            policy,
            written: AtomicU64::new(0),
            wanted: Mutex::new(Wanted::default()),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced::default()),
            thread: Mutex::new(None),
        });
        let s = syncer.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-fsync".into())
            .spawn(move || s.run(&mut journal, &journals, every, trim_every));
        match spawned {
            Ok(thread) => *syncer.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread),
            Err(e) => {
                // Without the thread `always` could never acknowledge: tickets
                // then fail rather than wait forever.
                error!(error = %e, "cannot start the fsync thread");
                syncer.synced.send_modify(|s| {
                    s.failed_upto = u64::MAX;
                    s.error = Some("the fsync thread could not start".into());
                });
            }
        }
        syncer
    }

    fn lock(&self) -> MutexGuard<'_, Wanted> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn written(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    fn ticket(&self) -> Persisted {
        if self.policy != SyncPolicy::Always {
            // fjall handed the write to the OS inside `insert`.
            return Persisted::Done;
        }
        let n = self.written.load(Ordering::Acquire);
        let synced = self.synced.subscribe();
        if synced.borrow().upto >= n {
            return Persisted::Done;
        }
        let mut wanted = self.lock();
        if wanted.upto < n {
            wanted.upto = n;
            // A busy thread looks at `upto` before it waits again: waking
            // it would be a system call per write for nothing.
            if wanted.asleep {
                self.wake.notify_one();
            }
        }
        Persisted::Wait(Ticket { n, synced })
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// With `always`, fsyncs everything written so far as soon as a ticket
    /// waits (one fsync for all the writes made meanwhile); with
    /// `interval`, every `every`. Trims the journals every `trim_every`.
    fn run(
        &self,
        journal: &mut ActiveJournal,
        journals: &Journals,
        every: Duration,
        trim_every: Duration,
    ) {
        let mut next_fsync = std::time::Instant::now() + every;
        let mut next_trim = std::time::Instant::now() + trim_every;
        let mut fsynced = 0;
        let mut last_error: Option<String> = None;
        loop {
            let acks_wait = {
                let wanted = self.lock();
                let idle = |w: &mut Wanted| {
                    w.asleep = !w.stop && w.upto <= self.synced.borrow().upto;
                    w.asleep
                };
                let until = match self.policy {
                    SyncPolicy::Interval => next_fsync.min(next_trim),
                    _ => next_trim,
                };
                let left = until.saturating_duration_since(std::time::Instant::now());
                let (mut wanted, _) = self
                    .wake
                    .wait_timeout_while(wanted, left, idle)
                    .unwrap_or_else(|p| p.into_inner());
                // Awake now, also when a timer ended the wait.
                wanted.asleep = false;
                if wanted.stop {
                    return;
                }
                wanted.upto > self.synced.borrow().upto
            };
            if std::time::Instant::now() >= next_trim {
                next_trim = std::time::Instant::now() + trim_every;
                journals.trim();
            }
            // Everything numbered so far was inserted before this load.
            let target = self.written.load(Ordering::Acquire);
            let fsync_due =
                self.policy == SyncPolicy::Interval && std::time::Instant::now() >= next_fsync;
            if fsync_due {
                next_fsync = std::time::Instant::now() + every;
            }
            if !(acks_wait || fsync_due && target > fsynced) {
                continue;
            }
            match journal.sync() {
                Ok(()) => {
                    if last_error.take().is_some() {
                        info!("fsync of the data dir works again");
                    }
                    fsynced = target;
                    self.synced.send_modify(|s| s.upto = s.upto.max(target));
                }
                Err(e) => {
                    let message = format!("an fsync of the data dir failed: {e}");
                    if last_error.as_deref() != Some(message.as_str()) {
                        error!(error = %e, "fsync of the data dir failed: writes are not acknowledged; restart the worker, and move its data dir away if this persists");
                    }
                    self.synced.send_modify(|s| {
                        s.failed_upto = s.failed_upto.max(target);
                        s.error = Some(message.clone().into());
                    });
                    last_error = Some(message);
                    // A failing disk should not spin a core.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(hlc: u64, value: Option<&'static str>) -> Stored {
        Stored {
            version: Version { hlc, node: 1 },
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
        }
    }

    fn open(dir: &Path, id: &str) -> Result<(DiskStore, Opened), OpenError> {
        DiskStore::open(
            dir,
            id,
            SyncPolicy::Always,
            Duration::from_millis(200),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn copies_values_tombstones_digests_and_counts_survive_a_reopen() {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let dir = tmp.path().to_path_buf();
        let (digest, stats) = {
            let (store, opened) = open(&dir, "w1").expect("open");
            assert_eq!(opened, Opened::default());
            for i in 0..5000 {
                store
                    .apply(&format!("key:{i}"), copy(10 + i, Some("value")))
                    .expect("apply");
            }
            for i in (0..5000).step_by(4) {
                store
                    .apply(&format!("key:{i}"), copy(100_000, None))
                    .expect("delete");
            }
            (store.digest(HashRange::ALL), store.stats())
        };
        let (store, opened) = open(&dir, "w1").expect("reopen");
        assert_eq!(opened.keys, 5000);
        assert_eq!(
            opened.newest,
            Version {
                hlc: 100_000,
                node: 1
            }
        );
        assert_eq!(store.stats(), stats);
        assert_eq!(store.digest(HashRange::ALL), digest);
        assert_eq!(store.get("key:1"), Some(copy(11, Some("value"))));
        assert_eq!(store.get("key:4"), Some(copy(100_000, None)));
        assert_eq!(
            store.purge_tombstones(Version {
                hlc: 100_001,
                node: 0
            }),
            1250
        );
        drop(store);
        let (store, opened) = open(&dir, "w1").expect("reopen after purge");
        assert_eq!(opened.keys, 3750);
        assert_eq!(store.get("key:4"), None);
        drop(store);
    }

    #[test]
    fn the_journal_being_written_is_the_highest_numbered_one() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["9.jnl", "10.jnl", "2.jnl", "version", "11.jnl.tmp"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let numbers: Vec<u64> = journals(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(numbers, [2, 9, 10]);
        let mut active = ActiveJournal::new(dir.path());
        active.sync().unwrap();
        assert_eq!(active.open.as_ref().map(|(n, _)| *n), Some(10));
        std::fs::write(dir.path().join("11.jnl"), b"x").unwrap();
        active.sync().unwrap();
        assert_eq!(active.open.as_ref().map(|(n, _)| *n), Some(11));
        assert!(ActiveJournal::new(&dir.path().join("none")).sync().is_err());
    }

    #[test]
    fn a_sealed_journal_does_not_outlive_the_writes_it_holds() {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let engine = tmp.path().join("engine");
        let (store, _) = open(tmp.path(), "w1").expect("open");
        // fjall seals its journal at the first flush after 64 MB: 72 MB of
        // values (a flush every 16 MiB; random, since its journal
        // compresses values), then nothing more.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut value = Bytes::new();
        for i in 0..1100u64 {
            value = Bytes::from(
                std::iter::repeat_with(|| rng.u8(..))
                    .take(64 * 1024)
                    .collect::<Vec<u8>>(),
            );
            let copy = Stored {
                version: Version {
                    hlc: i + 1,
                    node: 1,
                },
                value: Some(value.clone()),
            };
            store.apply(&format!("big:{i}"), copy).expect("apply");
        }
        // The journal was sealed (the active one is numbered past the
        // first) and the sealed one deleted, without a write to fill the
        // memtable that holds its last copies.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let numbers: Vec<u64> = journals(&engine).into_iter().map(|(n, _)| n).collect();
            if numbers.len() == 1 && numbers[0] > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "journals still {numbers:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(store);
        let (store, opened) = open(tmp.path(), "w1").expect("reopen");
        assert_eq!(opened.keys, 1100);
        assert_eq!(store.get("big:1099").and_then(|c| c.value), Some(value));
    }

    #[test]
    fn the_parts_a_dir_is_read_in_cover_the_circle_once() {
        for n in 1..=MAX_LOAD_THREADS {
            assert_eq!(part(0, n).start, 0);
            assert_eq!(part(n - 1, n).end, u64::MAX);
            for i in 1..n {
                assert_eq!(part(i - 1, n).end + 1, part(i, n).start, "{i} of {n}");
            }
        }
    }

    #[test]
    fn a_journal_ends_after_its_last_byte_that_is_not_zero() {
        assert_eq!(last_nonzero(&[0u8; 1000]), None);
        assert_eq!(last_nonzero(&[]), None);
        for at in [0, 1, 63, 64, 65, 500, 999] {
            let mut buf = vec![0u8; 1000];
            buf[at] = 1;
            assert_eq!(last_nonzero(&buf), Some(at));
            assert_eq!(last_nonzero(&buf[..at]), None);
            buf[0] = 2;
            assert_eq!(last_nonzero(&buf), Some(at));
        }
    }

    /// A store in `dir` holding `n` keys, closed.
    fn filled(dir: &Path, n: u64) {
        let (store, _) = open(dir, "w1").expect("open");
        for i in 0..n {
            store
                .apply(&format!("key:{i}"), copy(10 + i, Some("value")))
                .expect("apply");
        }
    }

    #[test]
    fn copies_a_worker_left_with_are_kept_within_the_window_and_dropped_after_it() {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let dir = tmp.path();
        filled(dir, 100);
        mark_left(dir).expect("mark");
        let (store, opened) = open(dir, "w1").expect("back at once");
        assert_eq!((opened.keys, store.stats().0), (100, 100));
        assert!(!dir.join(LEFT).exists(), "the mark outlives its use");
        drop(store);

        // Left two minutes ago, against a window of one.
        let left = kv_wire::version::unix_ms(std::time::SystemTime::now()) - 120_000;
        std::fs::write(dir.join(LEFT), format!("{left}\n")).expect("an old mark");
        let (store, opened) = open(dir, "w1").expect("back late");
        assert_eq!((opened.keys, store.stats().0), (0, 0));
        assert_eq!(store.get("key:1"), None);
        assert!(!dir.join(LEFT).exists());
        store
            .apply("key:1", copy(5, Some("new")))
            .expect("takes writes");
        drop(store);

        // An unreadable mark still says everything was handed over.
        std::fs::write(dir.join(LEFT), "garbage").expect("a bad mark");
        let (store, opened) = open(dir, "w1").expect("back with a bad mark");
        assert_eq!(opened.keys, 0);
        drop(store);

        // No mark (a crash, a drain cut short): everything stays, however
        // long the worker was away.
        filled(dir, 10);
        let (_, opened) = open(dir, "w1").expect("back after a crash");
        assert_eq!(opened.keys, 10);
    }

    #[test]
    fn another_id_and_a_second_opener_are_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let dir = tmp.path().to_path_buf();
        let (store, _) = open(&dir, "worker1").expect("open");
        let second = open(&dir, "worker1").expect_err("a second opener");
        assert!(matches!(second, OpenError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("another process"), "{second}");
        drop(store);
        let other = open(&dir, "worker2").expect_err("another id");
        let message = other.to_string();
        assert!(
            message.contains("\"worker1\"")
                && message.contains("--id worker1")
                && message.contains("move the dir away"),
            "{message}"
        );
        open(&dir, "worker1").expect("its own id, once the first closed");
    }

    #[tokio::test]
    async fn with_sync_always_a_ticket_resolves_after_an_fsync_that_covers_it() {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let dir = tmp.path().to_path_buf();
        let (store, _) = open(&dir, "w1").expect("open");
        let store = Arc::new(store);
        // Many writers at once share fsyncs; every ticket resolves.
        let writers: Vec<_> = (0..64)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        store
                            .apply(&format!("w{w}:{i}"), copy(1, Some("v")))
                            .expect("apply");
                        store.persisted().wait().await.expect("durable");
                    }
                })
            })
            .collect();
        // A ticket whose fsync never comes (a lost wake-up) fails the test
        // rather than hanging it; a minute is ample on a loaded machine.
        let all = async {
            for w in writers {
                w.await.expect("writer");
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("every ticket resolves");
        assert!(store.syncer.synced.borrow().upto >= 64 * 20);
    }
}
