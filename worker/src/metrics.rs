//! The worker's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

/// An operation and its outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    /// put, delete, get, get_quorum, get_owner, replicate, offer, topology.
    pub op: &'static str,
    /// ok, not_found, error, quorum, not_owner...
    pub outcome: &'static str,
}

/// A refusal for want of the cluster secret (or with a wrong one).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    /// What was refused: hello (a wire connection) or ack (a heartbeat ack).
    pub what: &'static str,
    /// Why: missing, wrong, unexpected, replayed...
    pub reason: &'static str,
}

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
    /// Requests served, by operation and outcome.
    pub requests: Family<Op, Counter>,
    /// Copies sent to replicas.
    pub replicated_entries: Counter,
    /// Bytes of copies sent to replicas.
    pub replicated_bytes: Counter,
    /// Replication batches that failed (and were retried).
    pub replication_failures: Counter,
    /// Copies queued for owners the current topology leaves out.
    pub hints: Counter,
    /// Hints dropped because the peer's replication budget was spent.
    pub hints_dropped: Counter,
    /// Rebalances completed.
    pub rebalances: Counter,
    /// Copies moved by rebalancing: pulled into this worker, or handed
    /// off from it.
    pub rebalance_keys: Counter,
    /// Bytes of keys and values moved by rebalancing.
    pub rebalance_bytes: Counter,
    /// Keys dropped after their new owners confirmed them.
    pub rebalance_dropped: Counter,
    /// Anti-entropy rounds completed.
    pub ae_rounds: Counter,
    /// Arcs compared with a co-owner by anti-entropy rounds.
    pub ae_arcs_compared: Counter,
    /// Of those, arcs whose digests differed.
    pub ae_arcs_differing: Counter,
    /// Of those, arcs found being written, left to a later round.
    pub ae_arcs_busy: Counter,
    /// Copies anti-entropy rounds repaired here (pulled) or handed off.
    pub ae_keys_repaired: Counter,
    /// Duration of the last anti-entropy round, in milliseconds.
    pub ae_last_ms: Gauge,
    /// Arcs this worker owns that it has not yet verified against every
    /// co-owner since the last topology change (0: fully replicated, as
    /// far as this worker knows).
    pub arcs_unverified: Gauge,
    /// Keys held here that this worker does not own and whose owners have
    /// not all confirmed them yet.
    pub handoff_pending: Gauge,
    /// Duration of the last rebalance, in milliseconds.
    pub rebalance_last_ms: Gauge,
    /// Requests waiting for a turn to coordinate their keys (see
    /// `node::MAX_COORDINATING`): above zero, the worker is saturated and
    /// its clients are queueing.
    pub coordination_waiting: Gauge,
    /// Keys held, tombstones included.
    pub keys: Gauge,
    /// Bytes of keys and values held.
    pub bytes: Gauge,
    /// The topology epoch held.
    pub epoch: Gauge,
    /// Threads of the runtime this worker runs on (`--threads`).
    pub runtime_threads: Gauge,
    /// Wire hellos and heartbeat acks refused for the cluster secret.
    pub auth_refusals: Family<Refused, Counter>,
    /// Client operations served: puts (bulk items included), deletes and
    /// quorum reads, whatever their outcome.
    pub ops: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kv_worker");
        let m = Metrics {
            requests: Family::default(),
            replicated_entries: Counter::default(),
            replicated_bytes: Counter::default(),
            replication_failures: Counter::default(),
            hints: Counter::default(),
            hints_dropped: Counter::default(),
            rebalances: Counter::default(),
            rebalance_keys: Counter::default(),
            rebalance_bytes: Counter::default(),
            rebalance_dropped: Counter::default(),
            ae_rounds: Counter::default(),
            ae_arcs_compared: Counter::default(),
            ae_arcs_differing: Counter::default(),
            ae_arcs_busy: Counter::default(),
            ae_keys_repaired: Counter::default(),
            ae_last_ms: Gauge::default(),
            arcs_unverified: Gauge::default(),
            handoff_pending: Gauge::default(),
            rebalance_last_ms: Gauge::default(),
            coordination_waiting: Gauge::default(),
            keys: Gauge::default(),
            bytes: Gauge::default(),
            epoch: Gauge::default(),
            runtime_threads: Gauge::default(),
            auth_refusals: Family::default(),
            ops: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests served, by operation and outcome",
            m.requests.clone(),
        );
        registry.register(
            "replicated_entries",
            "Copies sent to replicas",
            m.replicated_entries.clone(),
        );
        registry.register(
            "replicated_bytes",
            "Bytes of copies sent to replicas",
            m.replicated_bytes.clone(),
        );
        registry.register(
            "replication_failures",
            "Replication batches that failed and were retried",
            m.replication_failures.clone(),
        );
        registry.register(
            "hints",
            "Copies queued for owners the current topology leaves out",
            m.hints.clone(),
        );
        registry.register(
            "hints_dropped",
            "Hints dropped because the peer's replication budget was spent",
            m.hints_dropped.clone(),
        );
        registry.register("rebalances", "Rebalances completed", m.rebalances.clone());
        registry.register(
            "rebalance_keys",
            "Copies moved by rebalancing: pulled into this worker, or handed off from it",
            m.rebalance_keys.clone(),
        );
        registry.register(
            "rebalance_bytes",
            "Bytes of keys and values moved by rebalancing",
            m.rebalance_bytes.clone(),
        );
        registry.register(
            "rebalance_dropped",
            "Keys dropped after their new owners confirmed them",
            m.rebalance_dropped.clone(),
        );
        registry.register(
            "anti_entropy_rounds",
            "Anti-entropy rounds completed",
            m.ae_rounds.clone(),
        );
        registry.register(
            "anti_entropy_arcs_compared",
            "Arcs compared with a co-owner by anti-entropy rounds",
            m.ae_arcs_compared.clone(),
        );
        registry.register(
            "anti_entropy_arcs_differing",
            "Arcs compared by anti-entropy whose digests differed",
            m.ae_arcs_differing.clone(),
        );
        registry.register(
            "anti_entropy_arcs_busy",
            "Arcs that differed because they were being written during an anti-entropy round, left to a later round",
            m.ae_arcs_busy.clone(),
        );
        registry.register(
            "anti_entropy_keys_repaired",
            "Copies anti-entropy repaired: pulled here, or handed off to their owners",
            m.ae_keys_repaired.clone(),
        );
        registry.register(
            "anti_entropy_last_duration_ms",
            "Duration of the last anti-entropy round",
            m.ae_last_ms.clone(),
        );
        registry.register(
            "arcs_unverified",
            "Arcs this worker owns not yet verified against every co-owner since the last topology change (0: fully replicated)",
            m.arcs_unverified.clone(),
        );
        registry.register(
            "handoff_pending_keys",
            "Keys held here that this worker does not own, not yet confirmed by all their owners",
            m.handoff_pending.clone(),
        );
        registry.register(
            "coordination_waiting",
            "Requests waiting for a turn to coordinate their keys (above zero: saturated, clients queue)",
            m.coordination_waiting.clone(),
        );
        registry.register(
            "rebalance_last_duration_ms",
            "Duration of the last rebalance",
            m.rebalance_last_ms.clone(),
        );
        registry.register("keys", "Keys held, tombstones included", m.keys.clone());
        registry.register("bytes", "Bytes of keys and values held", m.bytes.clone());
        registry.register("epoch", "Topology epoch held", m.epoch.clone());
        registry.register(
            "runtime_threads",
            "Threads of the runtime this worker runs on (--threads; default: the CPUs it may use)",
            m.runtime_threads.clone(),
        );
        registry.register(
            "auth_refusals",
            "Wire hellos and heartbeat acks refused for the cluster secret, by what and why",
            m.auth_refusals.clone(),
        );
        registry.register(
            "client_ops",
            "Client operations served: puts (bulk items included), deletes and quorum reads",
            m.ops.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one request.
    pub fn count(&self, op: &'static str, outcome: &'static str) {
        self.count_many(op, outcome, 1);
    }

    /// Counts `n` requests with the same outcome (a bulk write's items):
    /// one labelled lookup for all of them, not one each.
    pub fn count_many(&self, op: &'static str, outcome: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.requests.get_or_create(&Op { op, outcome }).inc_by(n);
        if matches!(op, "put" | "delete" | "get_quorum") {
            self.ops.inc_by(n);
        }
    }

    /// Counts one answer to a client that reads R owners' own copies
    /// itself; the read counts as a client operation once, at the key's
    /// primary (it asks the first replica too).
    pub fn own_copy(&self, found: bool, primary: bool) {
        let outcome = if found { "ok" } else { "not_found" };
        self.count("get_owner", outcome);
        if primary {
            self.ops.inc();
        }
    }

    /// Counts a replicated batch.
    pub fn replicated(&self, entries: usize, bytes: usize) {
        self.replicated_entries.inc_by(entries as u64);
        self.replicated_bytes.inc_by(bytes as u64);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `metrics`' text that start with `name`, sorted (a
    /// family's series come in no set order).
    fn lines(metrics: &Metrics, name: &str) -> Vec<String> {
        let mut lines: Vec<String> = (metrics.render().lines())
            .filter(|l| l.starts_with(name))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_bulk_writes_items_count_as_many_requests_and_client_operations() {
        let metrics = Metrics::new();
        metrics.count("put", "ok");
        metrics.count_many("put", "ok", 511);
        // No items failed: no series for them.
        metrics.count_many("put", "error", 0);
        metrics.count_many("get", "ok", 2);
        assert_eq!(
            lines(&metrics, "kv_worker_requests_total"),
            [
                r#"kv_worker_requests_total{op="get",outcome="ok"} 2"#,
                r#"kv_worker_requests_total{op="put",outcome="ok"} 512"#,
            ]
        );
        // Local reads are not client operations.
        assert_eq!(
            lines(&metrics, "kv_worker_client_ops_total"),
            ["kv_worker_client_ops_total 512"]
        );
    }
}
