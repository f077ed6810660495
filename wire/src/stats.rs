//! What a worker tells the controller about itself, for `/cluster`, the
//! dashboard and `kvctl status`: sizes, epochs, readiness and the
//! rebalances it is running or has run.

use serde::{Deserialize, Serialize};

/// Completed rebalances a worker remembers (and reports).
pub const RECENT_REBALANCES: usize = 8;

/// A worker's answer to [`crate::Request::Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Copies held, tombstones included.
    pub keys: u64,
    /// Bytes of keys and values held.
    pub bytes: u64,
    /// The topology epoch it holds.
    pub epoch: u64,
    /// The epoch its data matches: that of its last completed sync.
    pub settled_epoch: u64,
    /// Why it is not ready (`/readyz`'s reason), or `None` when it is.
    pub not_ready: Option<String>,
    /// Client operations served since start (puts, deletes, quorum
    /// reads); a rate is the difference of two answers.
    pub ops: u64,
    /// The rebalance running now, if any.
    pub rebalance: Option<Running>,
    /// The last rebalances that ended, oldest first (at most
    /// [`RECENT_REBALANCES`]).
    pub recent: Vec<Finished>,
}

/// A rebalance in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The epoch it works towards.
    pub epoch: u64,
    /// When it began, in ms since the Unix epoch.
    pub started_ms: u64,
    /// Copies still to move, estimated: those the peers' digests show
    /// missing here, plus the keys to hand off not yet confirmed.
    pub keys_to_go: u64,
    /// Their bytes, estimated from the mean size of the copies moved
    /// (or held) so far.
    pub bytes_to_go: u64,
    /// Copies moved so far.
    pub keys_moved: u64,
    /// Bytes moved so far.
    pub bytes_moved: u64,
}

/// A rebalance that ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// The epoch it worked towards.
    pub epoch: u64,
    /// When it ended, in ms since the Unix epoch.
    pub ended_ms: u64,
    /// How long it took, in ms.
    pub took_ms: u64,
    /// Copies moved (pulled here or handed off).
    pub keys: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether every arc was verified and every handoff confirmed.
    pub complete: bool,
    /// What started it: `change`, `retry` or `anti-entropy`.
    pub why: String,
}
