//! Typed errors of the wire crate: callers match on them.

use thiserror::Error;

/// A TCP frame could not be read or written.
#[derive(Debug, Error)]
pub enum WireError {
    /// The peer announced (or we tried to send) a frame over the limit; the
    /// connection must close, since the stream can no longer be framed.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced or encoded length, when known (0 if the framer did not say).
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A complete frame whose body is not a message we understand.
    #[error("malformed frame: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// A message that could not be serialised (a bug, not bad input).
    #[error("cannot encode frame: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// A UDP heartbeat or ack that is not one.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DatagramError {
    /// Shorter than a header or longer than any valid datagram.
    #[error("datagram of {len} bytes is not a valid size")]
    Size {
        /// The datagram's length.
        len: usize,
    },
    /// Not our magic: another protocol, or noise.
    #[error("wrong magic bytes")]
    Magic,
    /// Our magic, a protocol version we do not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The right header with a body that does not decode.
    #[error("malformed body")]
    Malformed,
    /// With a cluster secret: the tag is missing or wrong (a forgery, or a
    /// sender with another secret or none).
    #[error("missing or wrong MAC")]
    Unauthenticated,
}

/// Why one side of a wire connection refuses the other's hello or welcome.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HelloError {
    /// Not our magic number.
    #[error("not a kv wire connection (wrong magic)")]
    Magic,
    /// A protocol version we do not speak.
    #[error(
        "protocol version {0} is not supported; this node speaks {ours}",
        ours = crate::message::PROTOCOL_VERSION
    )]
    Version(u16),
    /// Another cluster's name.
    #[error("cluster {theirs:?} does not match this node's cluster {ours:?}")]
    Cluster {
        /// The hello's cluster.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The server has a cluster secret and the client proved none.
    #[error("this cluster requires its cluster secret: give the client --cluster-secret-file")]
    SecretMissing,
    /// The client proved a secret and the server has none.
    #[error("this node has no cluster secret, but the client has one: give every program the same --cluster-secret-file, or none")]
    SecretUnexpected,
    /// No proof followed the challenge (another frame, a close, silence).
    #[error("no proof of the cluster secret followed the challenge")]
    NoProof,
    /// The client's proof does not match: another secret.
    #[error("wrong proof of the cluster secret: the client's secret differs from this node's")]
    SecretWrong,
    /// The server's welcome proves no secret although the client proved one.
    #[error("the server did not prove the cluster secret")]
    ServerUnproven,
    /// The server's proof does not match.
    #[error("the server's proof of the cluster secret is wrong: its secret differs, or it is not a member of this cluster")]
    ServerWrong,
}

impl HelloError {
    /// Whether this is about the cluster secret (as opposed to names and
    /// versions), for metrics and logs.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            HelloError::SecretMissing
                | HelloError::SecretUnexpected
                | HelloError::NoProof
                | HelloError::SecretWrong
                | HelloError::ServerUnproven
                | HelloError::ServerWrong
        )
    }

    /// A short word for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HelloError::Magic => "magic",
            HelloError::Version(_) => "version",
            HelloError::Cluster { .. } => "cluster",
            HelloError::SecretMissing => "missing",
            HelloError::SecretUnexpected => "unexpected",
            HelloError::NoProof => "no_proof",
            HelloError::SecretWrong => "wrong",
            HelloError::ServerUnproven => "server_unproven",
            HelloError::ServerWrong => "server_wrong",
        }
    }
}

/// A key that breaks the contract.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// The empty key.
    #[error("key must not be empty")]
    Empty,
    /// Over [`crate::MAX_KEY_LEN`].
    #[error("key is {len} bytes; the limit is {} bytes", crate::MAX_KEY_LEN)]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
}
