//! The controller's shared state: the membership behind a lock, and the
//! published topology that the bus and `/mapping` read.

use crate::auth::Guard;
use crate::cluster::{Events, Gatherer, What};
use crate::detector::Status;
use crate::membership::{
    HeartbeatOutcome, LeaveError, Membership, NamedTransition, RegisterError, Registered,
    Registration,
};
use crate::metrics::{Metrics, StatusLabel, To};
use crate::Config;
use kv_client::Credentials;
use kv_wire::heartbeat::Heartbeat;
use kv_wire::register::LeaveRequest;
use kv_wire::{Ring, Topology};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::{info, warn};

/// A published topology, and its ring built on first use: the bus never
/// needs the ring, and building it for thousands of workers is not free.
#[derive(Debug, Default)]
pub struct Published {
    /// The topology (epoch 0 and no members before the first publication).
    pub topology: Topology,
    ring: OnceLock<Ring>,
    shares: OnceLock<Vec<f64>>,
    unavailable: OnceLock<f64>,
}

impl Published {
    /// The ring over the topology's members.
    pub fn ring(&self) -> &Ring {
        self.ring.get_or_init(|| self.topology.ring())
    }

    /// Each ring worker's share as primary ([`Ring::primary_shares`]),
    /// worked out once per publication.
    pub fn shares(&self) -> &[f64] {
        self.shares.get_or_init(|| self.ring().primary_shares())
    }

    /// The share of the circle whose owners are all DOWN
    /// ([`kv_wire::View::share_owners_down`]), worked out once per
    /// publication.
    pub fn unavailable(&self) -> f64 {
        *self
            .unavailable
            .get_or_init(|| kv_wire::View::new(self.topology.clone()).share_owners_down())
    }
}

/// State shared by the HTTP handlers, the heartbeat thread and the bus.
pub struct Shared {
    membership: Mutex<Membership>,
    published: watch::Sender<Arc<Published>>,
    /// The controller's metrics.
    pub metrics: Metrics,
    /// Identifies this run of the controller to workers.
    pub incarnation: u64,
    /// How often workers should send heartbeats.
    pub heartbeat_interval: Duration,
    /// Where they send them.
    pub heartbeat_port: u16,
    /// The cluster secret, if any, and the checks made with it.
    pub guard: Guard,
    /// Recent status changes, registrations and epochs, for `/cluster`.
    pub events: Events,
    /// Asks workers for `/cluster`.
    pub gatherer: Gatherer,
}

impl Shared {
    /// Fresh state at start-up.
    pub fn new(config: &Config, heartbeat_port: u16) -> Shared {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Shared {
            membership: Mutex::new(
                Membership::new(config.down_after, config.grace, Instant::now())
                    .forgetting_after(config.forget_after),
            ),
            published: watch::Sender::new(Arc::default()),
            metrics: Metrics::new(),
            // Nanoseconds at start: distinct for every run of the controller.
            incarnation: now.as_nanos() as u64,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_port,
            guard: Guard::new(config.cluster_secret.clone()),
            events: Events::default(),
            gatherer: Gatherer::new(
                Credentials::new(config.cluster.clone(), "controller")
                    .with_secret(config.cluster_secret.clone()),
                config.cluster_refresh,
            ),
        }
    }

    /// Counts a refusal of `peer` for the cluster secret, and logs it
    /// unless that peer was logged in the last minute.
    pub fn refused(&self, peer: IpAddr, what: &'static str, reason: &'static str, detail: &str) {
        self.metrics.refused(what, reason);
        if self.guard.should_log(peer) {
            warn!(%peer, what, reason = detail, "refused: no valid proof of the cluster secret (this peer's next refusals are not logged for a minute)");
        }
    }

    /// The membership, locked. A panic while holding the lock cannot leave
    /// it half-updated in a way worse than the panic itself, so a poisoned
    /// lock is used as is.
    pub fn membership(&self) -> MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows publications.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// The latest publication.
    pub fn published(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// Registers a worker. The next tick publishes the change, so a storm
    /// of registrations costs one epoch per tick, not one per worker.
    pub fn register(&self, reg: Registration) -> Result<Registered, RegisterError> {
        let id = reg.id.clone();
        let registered = self
            .membership()
            .register(reg, Instant::now(), SystemTime::now())?;
        info!(node = %id, member = registered.member, generation = registered.generation, "worker registered");
        self.events.push(What::Registered {
            worker: id,
            generation: registered.generation,
        });
        Ok(registered)
    }

    /// A worker leaves, or has left; returns its status and the epoch. The
    /// next tick publishes the topology without it.
    pub fn leave(&self, leave: &LeaveRequest) -> Result<(Status, u64), LeaveError> {
        let mut m = self.membership();
        if let Some(change) = m.leave(leave, Instant::now())? {
            self.log_change(&m, &change);
        }
        let status = m
            .nodes(Instant::now())
            .into_iter()
            .find(|n| n.worker.member.id == leave.id)
            .map_or(Status::Down, |n| n.status);
        Ok((status, m.epoch()))
    }

    fn log_change(&self, m: &Membership, c: &NamedTransition) {
        let t = c.transition;
        self.metrics
            .transitions
            .get_or_create(&To { to: t.to.as_str() })
            .inc();
        info!(node = %c.id, from = %t.from, to = %t.to, why = %t.why, epoch = m.epoch(), "worker status changed");
        self.events.status(&c.id, t.from, t.to, t.why);
    }

    /// Feeds a heartbeat; returns what it did and the epoch for the ack.
    pub fn heartbeat(&self, hb: &Heartbeat) -> (HeartbeatOutcome, u64) {
        let mut m = self.membership();
        let outcome = m.heartbeat(hb, Instant::now(), SystemTime::now());
        if let crate::detector::Observation::Recovered(transition) = outcome.observation {
            let id = m.id_of(transition.member).unwrap_or_default().to_string();
            self.log_change(&m, &NamedTransition { id, transition });
        }
        (outcome, m.epoch())
    }

    /// Applies what silence has caused by now, and publishes the live set
    /// if it changed since the last tick: a burst of changes (a storm of
    /// registrations) costs one epoch per tick, not one per worker.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut m = self.membership();
        let changes = m.evaluate(now);
        let forgotten = m.forget(now);
        let published = m.publish(now);
        for c in &changes {
            self.log_change(&m, c);
        }
        for id in &forgotten {
            info!(node = %id, "DOWN worker forgotten (--forget-after)");
        }
        if !changes.is_empty() || !forgotten.is_empty() || published.is_some() {
            self.count_workers(&m);
        }
        drop(m);
        if let Some(topology) = published {
            info!(
                epoch = topology.epoch,
                live = topology.members.len(),
                leaving = topology.leaving.len(),
                down = topology.down.len(),
                "topology published"
            );
            self.metrics.epoch.set(topology.epoch as i64);
            self.events.push(What::Epoch {
                epoch: topology.epoch,
                live: topology.members.len(),
                leaving: topology.leaving.len(),
            });
            self.published.send_replace(Arc::new(Published {
                topology,
                ..Published::default()
            }));
        }
    }

    fn count_workers(&self, m: &Membership) {
        for (status, count) in m.counts() {
            let label = StatusLabel {
                status: status.as_str(),
            };
            self.metrics.workers.get_or_create(&label).set(count as i64);
        }
    }
}
