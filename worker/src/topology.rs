//! The topology as this worker knows it: the current view (what it routes
//! and owns by) and the settled view (where the last completed rebalance
//! left the data, asked too by quorum reads while a rebalance runs).

use kv_wire::Topology;
pub use kv_wire::View;
use std::sync::Arc;
use tokio::sync::watch;

/// The current and settled views.
#[derive(Debug)]
pub struct Topologies {
    current: watch::Sender<Arc<View>>,
    settled: watch::Sender<Arc<View>>,
}

impl Topologies {
    /// No topology yet (epoch 0, no members).
    pub fn new() -> Topologies {
        Topologies {
            current: watch::Sender::new(Arc::default()),
            settled: watch::Sender::new(Arc::default()),
        }
    }

    /// The view to route by.
    pub fn current(&self) -> Arc<View> {
        self.current.borrow().clone()
    }

    /// Follows changes of the current view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.current.subscribe()
    }

    /// Takes `topology` if it is newer than the current one; returns the
    /// epoch held afterwards.
    pub fn offer(&self, topology: Topology) -> u64 {
        let mut held = 0;
        self.current.send_if_modified(|current| {
            held = current.epoch();
            if topology.epoch > held {
                held = topology.epoch;
                *current = Arc::new(View::new(topology));
                true
            } else {
                false
            }
        });
        held
    }

    /// Where the data was when the last rebalance completed.
    pub fn settled(&self) -> Arc<View> {
        self.settled.borrow().clone()
    }

    /// Follows completed rebalances.
    pub fn subscribe_settled(&self) -> watch::Receiver<Arc<View>> {
        self.settled.subscribe()
    }

    /// Records a completed rebalance.
    pub fn settle(&self, view: Arc<View>) {
        self.settled.send_replace(view);
    }
}

impl Default for Topologies {
    fn default() -> Self {
        Topologies::new()
    }
}
