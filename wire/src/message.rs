//! The messages of the TCP wire protocol.
//!
//! The side that connects (kvctl, a peer worker, the controller's bus) sends
//! [`ClientFrame`]s; the side that listens answers with [`ServerFrame`]s. A
//! connection opens with a [`Hello`] answered by a [`Welcome`] (or a
//! [`Refusal`] and a close); after that every request carries an id chosen by
//! the client and its response echoes it, so many requests can be in flight
//! on one connection and be answered in any order.
//!
//! With a cluster secret the handshake has two more steps: the hello carries
//! a nonce of the client's, the server answers with a [`Challenge`] (a
//! nonce of its own), the client sends a [`ClientFrame::Proof`] over both,
//! and the welcome proves the secret back. Each side learns that the other
//! holds the secret, neither sends it, and no proof is good for another
//! connection. The server proves itself only to a client that proved itself
//! first, so a stranger never gets a tag to guess the secret against.
//! Without a secret the handshake is just hello and welcome.

use crate::auth::{ClusterSecret, Nonce, Purpose, Tag};
use crate::error::HelloError;
use crate::{Digest, HashRange, Ring, Version};
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
    /// The answer to a [`Challenge`]: proof of the cluster secret.
    Proof(Tag),
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
    /// With a cluster secret: the answer to a hello, asking for proof.
    Challenge(Challenge),
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

/// The server's nonce for the client to prove the cluster secret over.
/// Fresh for every connection, so no proof can be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Random.
    pub nonce: Nonce,
}

impl Challenge {
    /// A challenge with a fresh random nonce.
    pub fn new() -> Challenge {
        Challenge {
            nonce: crate::auth::random_nonce(),
        }
    }
}

impl Default for Challenge {
    fn default() -> Self {
        Challenge::new()
    }
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
    /// With a cluster secret: the client's nonce. It says the client will
    /// prove the secret, and the server's proof covers it, so the client
    /// knows that proof is fresh.
    pub nonce: Option<Nonce>,
}

impl Hello {
    /// A hello from `from` for `cluster`, with this build's magic and
    /// version, without a secret.
    pub fn new(cluster: impl Into<String>, from: impl Into<String>) -> Hello {
        Hello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            cluster: cluster.into(),
            from: from.into(),
            nonce: None,
        }
    }

    /// This hello from a holder of `secret`, if some: it carries a fresh
    /// nonce and will be followed by a proof.
    pub fn with_secret(mut self, secret: Option<&ClusterSecret>) -> Hello {
        self.nonce = secret.map(|_| crate::auth::random_nonce());
        self
    }

    /// Why a server of `cluster`, holding `secret` (or none), must refuse
    /// this hello, if it must (before any proof).
    pub fn check(&self, cluster: &str, secret: Option<&ClusterSecret>) -> Result<(), HelloError> {
        if self.magic != HELLO_MAGIC {
            return Err(HelloError::Magic);
        }
        if self.version != PROTOCOL_VERSION {
            return Err(HelloError::Version(self.version));
        }
        if self.cluster != cluster {
            return Err(HelloError::Cluster {
                theirs: self.cluster.clone(),
                ours: cluster.to_string(),
            });
        }
        match (secret, self.nonce) {
            (Some(_), None) => Err(HelloError::SecretMissing),
            (None, Some(_)) => Err(HelloError::SecretUnexpected),
            _ => Ok(()),
        }
    }

    /// What both proofs cover: cluster, sender, the server's node id (for
    /// the server's proof; empty for the client's) and both nonces.
    fn parts<'a>(&'a self, node: &'a str, challenge: &'a Challenge) -> [&'a [u8]; 5] {
        let client_nonce: &[u8] = self.nonce.as_ref().map_or(&[], |n| n);
        [
            self.cluster.as_bytes(),
            self.from.as_bytes(),
            node.as_bytes(),
            &challenge.nonce,
            client_nonce,
        ]
    }

    /// The client's proof, answering `challenge`.
    pub fn proof(&self, challenge: &Challenge, secret: &ClusterSecret) -> Tag {
        secret.tag(Purpose::Client, &self.parts("", challenge))
    }

    /// Whether `proof` is this hello's client's proof for `challenge`
    /// (compared in constant time).
    pub fn check_proof(
        &self,
        challenge: &Challenge,
        proof: &Tag,
        secret: &ClusterSecret,
    ) -> Result<(), HelloError> {
        if secret.verify(Purpose::Client, &self.parts("", challenge), proof) {
            Ok(())
        } else {
            Err(HelloError::SecretWrong)
        }
    }

    /// The welcome a server named `node` answers this (admitted) hello
    /// with: after a challenge, it proves the secret back.
    pub fn welcome(
        &self,
        node: impl Into<String>,
        epoch: u64,
        proved: Option<(&Challenge, &ClusterSecret)>,
    ) -> Welcome {
        let node = node.into();
        let proof = proved
            .map(|(challenge, secret)| secret.tag(Purpose::Server, &self.parts(&node, challenge)));
        Welcome { node, epoch, proof }
    }

    /// Whether the client that sent this hello must refuse `welcome`: with
    /// a secret, the server must have challenged it and proved the secret.
    pub fn check_welcome(
        &self,
        welcome: &Welcome,
        challenge: Option<&Challenge>,
        secret: Option<&ClusterSecret>,
    ) -> Result<(), HelloError> {
        let Some(secret) = secret else {
            return Ok(());
        };
        let (Some(challenge), Some(theirs)) = (challenge, &welcome.proof) else {
            return Err(HelloError::ServerUnproven);
        };
        if secret.verify(
            Purpose::Server,
            &self.parts(&welcome.node, challenge),
            theirs,
        ) {
            Ok(())
        } else {
            Err(HelloError::ServerWrong)
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
    /// With a cluster secret: the server's proof of it.
    pub proof: Option<Tag>,
}

/// Why a connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What was wrong and what to do about it.
    pub reason: String,
    /// Whether the same client may succeed later (the server is busy), as
    /// opposed to a refusal of who it is (another cluster, no secret).
    #[serde(default)]
    pub retry: bool,
}

impl Refusal {
    /// A refusal with this reason: retrying will not help.
    pub fn new(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            retry: false,
        }
    }

    /// A refusal for now (the server is busy): retrying later may work.
    pub fn busy(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            retry: true,
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
    /// A client that reads [`crate::READ_QUORUM`] owners itself asks each
    /// for its own copy, answered by [`Response::OwnCopy`] (tombstones
    /// included) when the receiving worker owns the key in the topology of
    /// `epoch` and holds its share of it (its rebalance is done). Else (the
    /// epochs differ, a rebalance runs, the key's owners are all DOWN...)
    /// the worker coordinates the read as for [`Consistency::Quorum`]
    /// and answers [`Response::Value`]. Saves a quorum read the hop
    /// through a coordinator in the steady state.
    Owner {
        /// The topology the client routes by.
        epoch: u64,
    },
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
    /// Anti-entropy: the sender's digests of some ranges; answered by
    /// [`Response::Compared`] with the ranges whose digest differs at the
    /// receiver, and the receiver's digest of each.
    Compare {
        /// `(range, the sender's digest of it)`.
        ranges: Vec<(HashRange, Digest)>,
    },
    /// The `(key, version)` pairs held in a range, in `(xxh3(key), key)`
    /// order after `after` (a key from an earlier answer); answered by
    /// [`Response::Listed`], a bounded page at a time.
    List {
        /// The range.
        range: HashRange,
        /// Resume after this key.
        after: Option<String>,
    },
    /// The copies held in a range, values and tombstones, in the order of
    /// [`Request::List`]; answered by [`Response::Entries`], a bounded page
    /// at a time.
    FetchRange {
        /// The range.
        range: HashRange,
        /// Resume after this key.
        after: Option<String>,
    },
    /// The copies held of these keys (those not held are left out);
    /// answered by [`Response::Entries`], which stops early (with `next`
    /// set to the last key sent) when the answer would grow too large.
    Fetch {
        /// The keys.
        keys: Vec<String>,
    },
    /// The controller asks how the worker is doing (for `/cluster`);
    /// answered by [`Response::Stats`].
    Stats,
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
    /// The answer to [`Request::Compare`]: `(index in the request, the
    /// receiver's digest)` of each range whose digests differ.
    Compared(Vec<(u32, Digest)>),
    /// The answer to [`Request::List`]: a page of `(key, version)` pairs;
    /// `next` is where the following page starts (`None`: the last page).
    Listed {
        /// The pairs, in order.
        items: Vec<(String, Version)>,
        /// Ask again after this key for more.
        next: Option<String>,
    },
    /// The answer to [`Request::FetchRange`] and [`Request::Fetch`].
    Entries {
        /// The copies, values and tombstones.
        entries: Vec<Entry>,
        /// Ask again after this key for more (`None`: nothing more).
        next: Option<String>,
    },
    /// The request failed.
    Failed(Failure),
    /// The answer to [`Request::Stats`].
    Stats(Box<crate::stats::WorkerStats>),
    /// The answer to a [`Consistency::Owner`] read: this owner's copy, if
    /// any, tombstones included, for the client to compare with another
    /// owner's.
    OwnCopy(Option<Entry>),
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

impl Entry {
    /// Bytes of key and value (what moving this copy moves).
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// The cluster as the controller publishes it: the live workers (UP or
/// SUSPECT) at an epoch, the workers leaving it, and those DOWN for
/// silence. Every membership change bumps the epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Increases with every change of the live set, the leavers or the
    /// DOWN list.
    pub epoch: u64,
    /// The live workers, sorted by id: the ring.
    pub members: Vec<Member>,
    /// Workers out of the ring that still hold keys while they leave:
    /// owners compare with them too, so a key only leavers hold reaches
    /// its owners before they count as ready.
    #[serde(default)]
    pub leaving: Vec<Member>,
    /// Workers DOWN because they went silent (not because they left), by
    /// id, until the controller forgets them: their copies may hold keys
    /// no live worker has, so a read that finds none of a key whose
    /// owners would all be among them is unavailable, not "not found".
    #[serde(default)]
    pub down: Vec<String>,
    /// Members in a ring for the first time since they registered with
    /// an empty store, by id: they hold nothing, and the workers already
    /// in the ring lose arcs to them and gain none, so a topology that
    /// only adds such members leaves every other worker holding its share.
    #[serde(default)]
    pub fresh: Vec<String>,
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

    /// Everyone the topology names: members, then leavers.
    pub fn everyone(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().chain(&self.leaving)
    }

    /// The ids of every worker the topology names: members, leavers and
    /// the DOWN ones.
    pub fn named_ids(&self) -> impl Iterator<Item = &str> {
        let down = self.down.iter().map(String::as_str);
        self.everyone().map(|m| m.id.as_str()).chain(down)
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
        assert_eq!(ok.check("kv", None), Ok(()));
        let other = ok.check("other", None).unwrap_err();
        assert!(other.to_string().contains("\"kv\""), "{other}");
        let old = Hello {
            version: 0,
            ..ok.clone()
        };
        assert_eq!(old.check("kv", None), Err(HelloError::Version(0)));
        let alien = Hello { magic: 1, ..ok };
        assert_eq!(alien.check("kv", None), Err(HelloError::Magic));
    }

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn with_the_same_secret_both_sides_prove_it() {
        let s = secret("0123456789abcdef");
        let hello = Hello::new("kv", "w1").with_secret(Some(&s));
        assert_eq!(hello.check("kv", Some(&s)), Ok(()));
        let challenge = Challenge::new();
        let proof = hello.proof(&challenge, &s);
        assert_eq!(hello.check_proof(&challenge, &proof, &s), Ok(()));
        let welcome = hello.welcome("w2", 7, Some((&challenge, &s)));
        assert_eq!(
            hello.check_welcome(&welcome, Some(&challenge), Some(&s)),
            Ok(())
        );
        // Without secrets, nothing is proved and nothing is asked.
        let plain = Hello::new("kv", "w1").with_secret(None);
        assert_eq!(plain.nonce, None);
        let welcome = plain.welcome("w2", 7, None);
        assert_eq!(welcome.proof, None);
        assert_eq!(plain.check_welcome(&welcome, None, None), Ok(()));
    }

    #[test]
    fn a_missing_wrong_replayed_or_unexpected_proof_is_refused() {
        let s = secret("0123456789abcdef");
        let other = secret("fedcba9876543210");
        let plain = Hello::new("kv", "w1");
        assert_eq!(plain.check("kv", Some(&s)), Err(HelloError::SecretMissing));
        let proving = Hello::new("kv", "w1").with_secret(Some(&s));
        assert_eq!(proving.check("kv", None), Err(HelloError::SecretUnexpected));
        let challenge = Challenge::new();
        let wrong = proving.proof(&challenge, &other);
        assert_eq!(
            proving.check_proof(&challenge, &wrong, &s),
            Err(HelloError::SecretWrong)
        );
        // A proof made for one connection's challenge fails on another.
        let good = proving.proof(&challenge, &s);
        assert_eq!(
            proving.check_proof(&Challenge::new(), &good, &s),
            Err(HelloError::SecretWrong)
        );
        // A hello that claims another sender keeps a proof that no longer fits.
        let renamed = Hello {
            from: "w9".into(),
            ..proving.clone()
        };
        assert_eq!(
            renamed.check_proof(&challenge, &good, &s),
            Err(HelloError::SecretWrong)
        );
        // Every refusal message is about configuration, never the secret.
        for e in [
            HelloError::SecretMissing,
            HelloError::SecretWrong,
            HelloError::SecretUnexpected,
            HelloError::NoProof,
        ] {
            assert!(e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn a_client_refuses_a_server_that_cannot_prove_the_secret() {
        let s = secret("0123456789abcdef");
        let hello = Hello::new("kv", "w1").with_secret(Some(&s));
        let challenge = Challenge::new();
        // A welcome without a challenge, or without a proof.
        let unproven = hello.welcome("w2", 1, None);
        assert_eq!(
            hello.check_welcome(&unproven, None, Some(&s)),
            Err(HelloError::ServerUnproven)
        );
        assert_eq!(
            hello.check_welcome(&unproven, Some(&challenge), Some(&s)),
            Err(HelloError::ServerUnproven)
        );
        let impostor = hello.welcome("w2", 1, Some((&challenge, &secret("fedcba9876543210"))));
        assert_eq!(
            hello.check_welcome(&impostor, Some(&challenge), Some(&s)),
            Err(HelloError::ServerWrong)
        );
        // A welcome proved for one node is not a proof for another.
        let mut renamed = hello.welcome("w2", 1, Some((&challenge, &s)));
        renamed.node = "w3".into();
        assert_eq!(
            hello.check_welcome(&renamed, Some(&challenge), Some(&s)),
            Err(HelloError::ServerWrong)
        );
        // A client's proof is not a server's, even for the same connection.
        let reflected = Welcome {
            node: String::new(),
            epoch: 1,
            proof: Some(hello.proof(&challenge, &s)),
        };
        assert_eq!(
            hello.check_welcome(&reflected, Some(&challenge), Some(&s)),
            Err(HelloError::ServerWrong)
        );
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
