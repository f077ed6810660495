//! The seam between a worker's logic and the network: every call it makes
//! to a peer — forwarded writes, replication batches, quorum reads,
//! rebalancing — goes through [`Transport`]. In a worker process that is
//! the pooled wire connections ([`Pool`]); in the simulator (`sim/`) it is
//! an in-memory network with simulated time, loss, delay and partitions.

use kv_client::{ConnectionError, Pool};
use kv_wire::{Member, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A call in flight.
pub type Call<'a> = Pin<Box<dyn Future<Output = Result<Response, ConnectionError>> + Send + 'a>>;

/// How a worker reaches its peers.
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to `peer` and waits for its answer, at most
    /// `timeout` (the transport's own default when `None`).
    fn call<'a>(
        &'a self,
        peer: &'a Member,
        request: Request,
        timeout: Option<Duration>,
    ) -> Call<'a>;
}

impl Transport for Pool {
    fn call<'a>(
        &'a self,
        peer: &'a Member,
        request: Request,
        timeout: Option<Duration>,
    ) -> Call<'a> {
        Box::pin(async move {
            match timeout {
                None => Pool::call(self, peer, request).await,
                Some(timeout) => self.get(peer).await?.call_within(request, timeout).await,
            }
        })
    }
}

/// The wall clock, in milliseconds since the Unix epoch: what versions are
/// stamped from. A function so the simulator can run on simulated time.
pub type Wall = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock.
pub fn system_wall() -> Wall {
    std::sync::Arc::new(system_now_ms)
}

/// The system's wall clock now, in milliseconds since the Unix epoch.
pub fn system_now_ms() -> u64 {
    kv_wire::version::unix_ms(std::time::SystemTime::now())
}
