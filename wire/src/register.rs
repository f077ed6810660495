//! The registration contract: what a worker sends to `POST /register` and
//! `POST /leave`, and what the controller answers. Both sides use these types, so the JSON
//! has one definition.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The most bytes of ids a registration names as `peers`: the body stays
/// well under the controller's 64 KiB limit (a cluster of some thousands
/// of workers with long pod names would pass it). The list is a hint;
/// a worker past this names the first of them.
pub const MAX_PEERS_BYTES: usize = 32 * 1024;

/// A worker's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Unique worker id.
    pub id: String,
    /// Host others reach it at.
    pub host: String,
    /// HTTP port.
    pub port: u16,
    /// Wire port.
    pub wire_port: u16,
    /// The last epoch the worker saw, if it ran under a controller before:
    /// a restarted controller continues numbering above it.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The incarnation the worker had, if it ran under a controller before:
    /// a restarted controller keeps it, so its restart moves no data.
    #[serde(default)]
    pub generation: Option<u64>,
    /// The other workers the last topology the worker saw named (live,
    /// leaving or DOWN), if it ran under a controller before: a restarted
    /// controller lists those that never register with it as DOWN, as the
    /// controller before it would have, so a key only they held reads as
    /// unavailable rather than absent. At most [`MAX_PEERS_BYTES`] of ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Whether the worker's store held no copy as it registered (a new or
    /// in-memory worker, not one back with a data dir). The controller
    /// names such workers in the first topology that has them
    /// ([`crate::Topology::fresh`]). Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty: bool,
}

/// The controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    /// The worker id, echoed.
    pub id: String,
    /// The small number to put in heartbeats.
    pub member: u32,
    /// The incarnation this registration starts.
    pub generation: u64,
    /// The controller's epoch.
    pub epoch: u64,
    /// Where heartbeats go (UDP).
    pub heartbeat_port: u16,
    /// How often to send them.
    pub heartbeat_interval_ms: u64,
    /// The controller's incarnation: it changes when the controller restarts.
    pub incarnation: u64,
}

/// A worker's notice that it leaves (on SIGTERM), and later that it left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    /// The worker id.
    pub id: String,
    /// The incarnation that leaves: a leave for an older one changes nothing.
    pub generation: u64,
    /// `false`: it starts handing its keys over (LEAVING). `true`: it is
    /// done and exits (DOWN, reason "left").
    #[serde(default)]
    pub done: bool,
}

/// The controller's answer to a leave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveReply {
    /// The worker id, echoed.
    pub id: String,
    /// Its status now: `LEAVING` or `DOWN`.
    pub status: Status,
    /// The controller's epoch.
    pub epoch: u64,
}

/// A worker's liveness as the controller sees it and `/nodes` shows it.
/// [`Status::is_live`] is the one rule of who is in the ring, for the
/// controller and every client that builds the ring from `/nodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Heard from recently.
    Up,
    /// Silent for a while: still owns its keys.
    Suspect,
    /// Leaving: out of the ring, handing its keys over.
    Leaving,
    /// Silent too long, or left: out of the ring.
    Down,
}

impl Status {
    /// Whether the worker is in the ring (UP or SUSPECT).
    pub fn is_live(self) -> bool {
        matches!(self, Status::Up | Status::Suspect)
    }

    /// Every status, in the order `/metrics` lists them.
    pub const ALL: [Status; 4] = [Status::Up, Status::Suspect, Status::Leaving, Status::Down];

    /// The status as `/nodes` and logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "UP",
            Status::Suspect => "SUSPECT",
            Status::Leaving => "LEAVING",
            Status::Down => "DOWN",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
