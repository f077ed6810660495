//! kvctl's library: a typed async client for kv.
//!
//! - [`connection`]: one pipelined wire-protocol connection — many requests
//!   in flight, answered in any order — and a [`Pool`] of them by address.

pub mod connection;

pub use connection::{Connection, ConnectionError, Pool};
