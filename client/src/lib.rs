//! The kv client library: a typed async client for kv, used by kvctl and by
//! workers talking to each other.
//!
//! - [`Client`]: learns the topology from the controller, routes each request
//!   straight to the key's primary with the shared ring, and follows
//!   topology changes and failures;
//! - [`connection`]: one pipelined wire-protocol connection — many requests
//!   in flight, answered in any order — and a [`Pool`] of them by address;
//! - [`http`]: JSON over HTTP for the admin APIs;
//! - [`read`]: what a quorum read the client makes itself adds up to;
//! - [`timers`]: coarse timers for the timeouts nearly every call arms and
//!   nearly always cancels.

pub mod client;
pub mod connection;
pub mod http;
mod pending;
pub mod read;
pub mod timers;

pub use client::{Client, ClientError};
pub use connection::{Connection, ConnectionError, Credentials, Pool};
pub use http::{HttpClient, HttpError, Method};
pub use kv_wire::nodes::{Mapping, NodeInfo, Nodes};
