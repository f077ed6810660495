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
