//! The controller's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

/// A label set of one `&'static str` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why a datagram was dropped.
    pub reason: &'static str,
}

/// A status transition's target.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct To {
    /// The new status.
    pub to: &'static str,
}

/// A worker status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// UP, SUSPECT or DOWN.
    pub status: &'static str,
}

/// An outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// "ok" or "error".
    pub outcome: &'static str,
}

/// A refusal for want of the cluster secret (or with a wrong one).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    /// What was refused: heartbeat, register or leave.
    pub what: &'static str,
    /// Why: missing, wrong, unexpected, stale, replayed...
    pub reason: &'static str,
}

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
    /// Heartbeats that counted (known member, current generation).
    pub heartbeats: Counter,
    /// Datagrams dropped, by reason.
    pub dropped: Family<Reason, Counter>,
    /// Status transitions, by target status.
    pub transitions: Family<To, Counter>,
    /// The current epoch.
    pub epoch: Gauge,
    /// Workers by status.
    pub workers: Family<StatusLabel, Gauge>,
    /// Topology pushes to workers, by outcome.
    pub pushes: Family<Outcome, Counter>,
    /// Heartbeats, registrations and leaves refused for the cluster secret.
    pub auth_refusals: Family<Refused, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kv_controller");
        let heartbeats = Counter::default();
        let dropped = Family::default();
        let transitions = Family::default();
        let epoch = Gauge::default();
        let workers = Family::default();
        let pushes = Family::default();
        let auth_refusals = Family::default();
        registry.register("heartbeats", "Heartbeats counted", heartbeats.clone());
        registry.register(
            "dropped_datagrams",
            "Datagrams dropped, by reason",
            dropped.clone(),
        );
        registry.register(
            "transitions",
            "Worker status transitions, by new status",
            transitions.clone(),
        );
        registry.register("epoch", "Current topology epoch", epoch.clone());
        registry.register("workers", "Registered workers by status", workers.clone());
        registry.register(
            "topology_pushes",
            "Topology pushes to workers, by outcome",
            pushes.clone(),
        );
        registry.register(
            "auth_refusals",
            "Heartbeats, registrations and leaves refused for the cluster secret, by what and why",
            auth_refusals.clone(),
        );
        Metrics {
            registry,
            heartbeats,
            dropped,
            transitions,
            epoch,
            workers,
            pushes,
            auth_refusals,
        }
    }

    /// Counts a dropped datagram.
    pub fn drop(&self, reason: &'static str) {
        self.dropped.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a refusal for the cluster secret.
    pub fn refused(&self, what: &'static str, reason: &'static str) {
        self.auth_refusals
            .get_or_create(&Refused { what, reason })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        kv_service::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
