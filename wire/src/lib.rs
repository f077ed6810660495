//! The language every kv process speaks.
//!
//! - [`auth`]: the optional cluster secret and the proofs made with it;
//! - [`message`]: the wire messages exchanged over TCP, with ids so requests
//!   pipeline, and the topology the controller publishes;
//! - [`codec`]: length-framed MessagePack for those messages;
//! - [`digest`]: summaries of the copies held in a range of the hash circle,
//!   compared by anti-entropy;
//! - [`heartbeat`]: the compact UDP heartbeat and its ack;
//! - [`nodes`]: the JSON of the controller's `/nodes` and `/mapping`;
//! - [`register`]: the JSON of the controller's `/register`;
//! - [`ring`]: the consistent-hash ring every process computes identically;
//! - [`stats`]: what a worker reports of itself for the dashboard;
//! - [`version`]: hybrid-logical-clock versions, compared last-writer-wins;
//! - [`view`]: a topology with its ring, which every router looks owners up in.
//!
//! No sockets, tasks or clocks live here: callers bring the I/O and the time
//! (the exceptions: reading a secret's file at start-up, and the OS random
//! source for nonces).

pub mod auth;
pub mod codec;
pub mod digest;
pub mod error;
pub mod heartbeat;
pub mod message;
pub mod nodes;
pub mod register;
pub mod ring;
pub mod stats;
pub mod version;
pub mod view;

pub use auth::ClusterSecret;
pub use codec::FrameCodec;
pub use digest::{Digest, HashRange};
pub use error::{DatagramError, HelloError, KeyError, WireError};
pub use message::{ClientFrame, Entry, Member, Request, Response, ServerFrame, Topology};
pub use ring::Ring;
pub use version::{Clock, Version};
pub use view::{Owners, View};

/// Copies of each key: a primary and two replicas.
pub const REPLICATION_FACTOR: usize = 3;
/// Copies that must hold a write before it is acknowledged.
pub const WRITE_QUORUM: usize = 2;
/// Owners asked by a quorum read.
pub const READ_QUORUM: usize = 2;
/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest value by default (workers take a flag to change it).
pub const DEFAULT_MAX_VALUE_LEN: usize = 1024 * 1024;
/// Largest wire frame by default, checked before a frame is buffered.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Checks a key against the contract: 1 to [`MAX_KEY_LEN`] bytes.
/// (A `&str` is UTF-8 already; callers decoding bytes check that first.)
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    match key.len() {
        0 => Err(KeyError::Empty),
        len if len > MAX_KEY_LEN => Err(KeyError::TooLong { len }),
        _ => Ok(()),
    }
}
