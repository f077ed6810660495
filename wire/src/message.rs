//! The messages of the TCP wire protocol.
//!
//! The side that connects (kvctl, a peer worker, the controller's bus) sends
//! [`ClientFrame`]s; the side that listens answers with [`ServerFrame`]s. A
//! connection opens with a [`Hello`] answered by a [`Welcome`] (or a
//! [`Refusal`] and a close); after that every request carries an id chosen by
//! the client and its response echoes it, so many requests can be in flight
//! on one connection and be answered in any order.

use crate::{Ring, Version};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identifies the kv wire protocol in a [`Hello`] ("KVW1").
pub const HELLO_MAGIC: u32 = 0x4B56_5731;
/// The wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Frames sent by the connecting side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Must be the first frame.
    Hello(Hello),
    /// A request; `id` is echoed in its response.
    Request {
        /// Chosen by the client, unique among its requests in flight.
        id: u64,
        /// What is asked.
        body: Request,
    },
}

/// Frames sent by the listening side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The hello was accepted.
    Welcome(Welcome),
    /// The answer to the request with this `id`.
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        body: Response,
    },
    /// The connection is refused (bad hello, or a frame that cannot be
    /// understood); the server closes it after this frame.
    Refused(Refusal),
}

/// Opens a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`HELLO_MAGIC`].
    pub magic: u32,
    /// Must be [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The cluster's name; a worker refuses clients of another cluster.
    pub cluster: String,
    /// Who is connecting, for logs (a worker id, "controller", "kvctl").
    pub from: String,
}

impl Hello {
    /// A hello from `from` for `cluster`, with this build's magic and version.
    pub fn new(cluster: impl Into<String>, from: impl Into<String>) -> Hello {
        Hello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            cluster: cluster.into(),
            from: from.into(),
        }
    }

    /// Why a server speaking `cluster` must refuse this hello, if it must.
    pub fn check(&self, cluster: &str) -> Result<(), Refusal> {
        if self.magic != HELLO_MAGIC {
            Err(Refusal::new("not a kv wire connection (wrong magic)"))
        } else if self.version != PROTOCOL_VERSION {
            Err(Refusal::new(format!(
                "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
                self.version
            )))
        } else if self.cluster != cluster {
            Err(Refusal::new(format!(
                "cluster {:?} does not match this node's cluster {cluster:?}",
                self.cluster
            )))
        } else {
            Ok(())
        }
    }
}

/// Accepts a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's node id.
    pub node: String,
    /// The topology epoch the server knows.
    pub epoch: u64,
}

/// Why a connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What was wrong and what to do about it.
    pub reason: String,
}

impl Refusal {
    /// A refusal with this reason.
    pub fn new(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
        }
    }
}

/// Whose copy a read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// The receiving worker's own copy (tombstones included, for peers).
    Local,
    /// The newest of [`crate::READ_QUORUM`] owners' copies.
    Quorum,
}

/// What a client or peer asks of a worker (or the controller of a worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Read a key.
    Get {
        /// The key.
        key: String,
        /// Whose copy.
        consistency: Consistency,
    },
    /// Write a key at W=2; any worker accepts it and routes it to the primary.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
    },
    /// Delete a key at W=2 (writes a tombstone).
    Delete {
        /// The key.
        key: String,
    },
    /// Bulk load: many puts in one frame, each acknowledged at W=2 on its
    /// own; answered by [`Response::PutMany`] in the same order.
    PutMany {
        /// `(key, value)` pairs.
        items: Vec<(String, Bytes)>,
    },
    /// Peer replication and rebalancing: store each entry whose version is
    /// newer than the local one. Idempotent.
    Replicate {
        /// The entries, values or tombstones.
        entries: Vec<Entry>,
    },
    /// Rebalancing: "I hold these versions"; answered by
    /// [`Response::Wanted`] with the ones the receiver lacks (missing or
    /// older), so only those values travel and holders learn which of
    /// their copies are confirmed elsewhere.
    Offer {
        /// `(key, version)` pairs.
        items: Vec<(String, Version)>,
    },
    /// The controller publishes a new topology.
    Topology(Topology),
}

/// A worker's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The answer to [`Request::Get`]: the entry, if any copy exists.
    /// Client reads never see tombstones (`None` instead); local reads for
    /// peers do, so deletes win over older values.
    Value(Option<Entry>),
    /// A put or delete reached the write quorum.
    Written {
        /// The version the primary gave it.
        version: Version,
        /// Copies that held it when answered (at least 2).
        acks: u8,
    },
    /// One result per item of a [`Request::PutMany`], in order.
    PutMany(Vec<Result<Version, Failure>>),
    /// The entries of a [`Request::Replicate`] are stored, or were older
    /// than what was there.
    Replicated {
        /// How many entries were newer and applied.
        applied: u32,
        /// `(index, held version)` of each entry older than the version the
        /// receiver holds: a write coordinator uses it to issue a newer
        /// version, so an acknowledged write is never shadowed by an older
        /// acknowledged one written through a lagging clock.
        stale: Vec<(u32, Version)>,
    },
    /// The answer to [`Request::Offer`]: indices of the offered items the
    /// receiver lacks; every other item is held at that version or newer.
    Wanted(Vec<u32>),
    /// The topology was taken (or an equal or newer one was already known).
    TopologyAccepted {
        /// The epoch the worker now holds.
        epoch: u64,
    },
    /// The request failed.
    Failed(Failure),
}

/// Why a request failed, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The kind, for programs.
    pub kind: FailureKind,
    /// What was wrong and what to do, for people.
    pub message: String,
}

impl Failure {
    /// A failure of this kind.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Kinds of [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The request breaks the contract (empty key, oversize value...);
    /// retrying it unchanged fails again.
    BadRequest,
    /// Fewer than [`crate::WRITE_QUORUM`] copies (or read quorum) answered
    /// in time: the outcome is unknown; retry.
    Quorum,
    /// The worker is not the key's owner under its topology, whose epoch is
    /// given: refresh the topology and retry.
    NotOwner {
        /// The worker's epoch.
        epoch: u64,
    },
    /// No live worker is known for the key: the cluster is empty or the
    /// worker has no topology yet.
    Unavailable,
    /// The worker is shutting down or overloaded: retry elsewhere or later.
    Busy,
}

/// A stored copy of a key: a value or a tombstone, with its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The write that produced this copy.
    pub version: Version,
    /// The value, or `None` for a tombstone.
    pub value: Option<Bytes>,
}

/// The cluster as the controller publishes it: the live workers (UP or
/// SUSPECT) at an epoch. Every membership change bumps the epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Increases with every change of the live set.
    pub epoch: u64,
    /// The live workers, sorted by id.
    pub members: Vec<Member>,
}

impl Topology {
    /// The ring over this topology's members.
    pub fn ring(&self) -> Ring {
        Ring::new(self.members.iter().map(|m| m.id.clone()))
    }

    /// The member with this id.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// A live worker and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Unique worker id (a pod name in Kubernetes).
    pub id: String,
    /// Host or IP others reach it at.
    pub host: String,
    /// HTTP port.
    pub port: u16,
    /// Wire-protocol port.
    pub wire_port: u16,
    /// Incarnation: bumped each time the id registers again.
    pub generation: u64,
}

impl Member {
    /// `host:wire_port`, for connecting.
    pub fn wire_addr(&self) -> String {
        join_host_port(&self.host, self.wire_port)
    }

    /// `host:port` of its HTTP server.
    pub fn http_addr(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

/// `host:port`, bracketing IPv6 literals.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_from_another_cluster_version_or_protocol_is_refused() {
        let ok = Hello::new("kv", "kvctl");
        assert!(ok.check("kv").is_ok());
        assert!(ok.check("other").unwrap_err().reason.contains("\"kv\""));
        let old = Hello {
            version: 0,
            ..ok.clone()
        };
        assert!(old.check("kv").unwrap_err().reason.contains("version 0"));
        let alien = Hello { magic: 1, ..ok };
        assert!(alien.check("kv").unwrap_err().reason.contains("magic"));
    }

    #[test]
    fn addresses_bracket_ipv6_hosts() {
        let m = Member {
            id: "w".into(),
            host: "::1".into(),
            port: 8001,
            wire_port: 8002,
            generation: 1,
        };
        assert_eq!(m.wire_addr(), "[::1]:8002");
        let m = Member {
            host: "10.0.0.1".into(),
            ..m
        };
        assert_eq!(m.http_addr(), "10.0.0.1:8001");
    }
}
