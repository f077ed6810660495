//! The registration contract: what a worker sends to `POST /register` and
//! `POST /leave`, and what the controller answers. Both sides use these types, so the JSON
//! has one definition.

use serde::{Deserialize, Serialize};

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
    pub status: String,
    /// The controller's epoch.
    pub epoch: u64,
}
