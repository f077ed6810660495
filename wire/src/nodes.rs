//! The JSON of the controller's `GET /nodes` and `GET /mapping?key=`: the
//! controller writes these types and clients read them, so the contract
//! of SPEC has one definition.

use crate::register::Status;
use crate::{Member, Topology};
use serde::{Deserialize, Serialize};

/// How a DOWN worker went, as `/nodes` says in `"reason"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// It left (or went silent while leaving).
    Left,
    /// It stopped sending heartbeats.
    Silent,
}

impl Reason {
    /// The reason as `/nodes` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Left => "left",
            Reason::Silent => "silent",
        }
    }
}

/// A worker as `/nodes` and `/mapping` list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Worker id.
    pub id: String,
    /// Host.
    pub host: String,
    /// HTTP port.
    pub port: u16,
    /// Wire port.
    pub wire_port: u16,
    /// Incarnation.
    pub generation: u64,
    /// UP, SUSPECT, LEAVING or DOWN.
    pub status: Status,
    /// RFC 3339 time of the last heartbeat.
    pub last_heartbeat: String,
    /// Milliseconds since the last heartbeat.
    pub last_heartbeat_ms_ago: u64,
    /// Why it is DOWN, when the controller knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

impl NodeInfo {
    /// The worker as the ring and the wire know it.
    pub fn member(&self) -> Member {
        Member {
            id: self.id.clone(),
            host: self.host.clone(),
            port: self.port,
            wire_port: self.wire_port,
            generation: self.generation,
        }
    }
}

/// The controller's `/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nodes {
    /// Topology epoch.
    pub epoch: u64,
    /// Every registered worker, sorted by id.
    pub nodes: Vec<NodeInfo>,
}

impl Nodes {
    /// The topology these workers make: UP and SUSPECT ones in the ring,
    /// LEAVING ones leaving it (they still answer), DOWN ones nowhere.
    pub fn topology(&self) -> Topology {
        let with = |keep: fn(Status) -> bool| {
            self.nodes
                .iter()
                .filter(|n| keep(n.status))
                .map(NodeInfo::member)
                .collect()
        };
        Topology {
            epoch: self.epoch,
            members: with(Status::is_live),
            leaving: with(|s| s == Status::Leaving),
            down: self
                .nodes
                .iter()
                .filter(|n| n.reason == Some(Reason::Silent))
                .map(|n| n.id.clone())
                .collect(),
            fresh: Vec::new(),
        }
    }
}

/// The controller's `/mapping?key=`: where a key lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// The key, echoed.
    pub key: String,
    /// The epoch of the topology mapped by.
    pub epoch: u64,
    /// The key's primary.
    pub primary: NodeInfo,
    /// Its replicas (fewer than two while fewer than three workers live).
    pub replicas: Vec<NodeInfo>,
    /// The owners' ids, primary first.
    pub workers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::View;

    fn node(id: &str, status: Status) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            host: "10.0.0.1".into(),
            port: 8001,
            wire_port: 9001,
            generation: 3,
            status,
            last_heartbeat: "2026-12-04T10:00:00.000Z".into(),
            last_heartbeat_ms_ago: 12,
            reason: (status == Status::Down).then_some(Reason::Left),
        }
    }

    #[test]
    fn nodes_read_and_write_the_json_of_spec() {
        let json = serde_json::json!({"epoch": 7, "nodes": [
            {"id": "w1", "host": "10.0.0.1", "port": 8001, "wire_port": 9001, "generation": 3,
             "status": "UP", "last_heartbeat": "2026-12-04T10:00:00.000Z", "last_heartbeat_ms_ago": 12},
            {"id": "w2", "host": "10.0.0.1", "port": 8001, "wire_port": 9001, "generation": 3,
             "status": "DOWN", "last_heartbeat": "2026-12-04T10:00:00.000Z", "last_heartbeat_ms_ago": 12,
             "reason": "left"},
        ]});
        let nodes: Nodes = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            nodes.nodes,
            vec![node("w1", Status::Up), node("w2", Status::Down)]
        );
        assert_eq!(
            serde_json::to_value(&nodes).unwrap(),
            json,
            "no reason written for UP"
        );
        let bad = serde_json::json!({"epoch": 7, "nodes": [{"id": "w1", "status": "ALIVE"}]});
        assert!(serde_json::from_value::<Nodes>(bad).is_err());
    }

    #[test]
    fn the_topology_of_nodes_rings_the_live_and_names_the_leaving_and_the_silent() {
        let silent = NodeInfo {
            reason: Some(Reason::Silent),
            ..node("e", Status::Down)
        };
        let nodes = Nodes {
            epoch: 9,
            nodes: vec![
                node("a", Status::Up),
                node("b", Status::Suspect),
                node("c", Status::Leaving),
                node("d", Status::Down),
                silent,
            ],
        };
        let view = View::new(nodes.topology());
        assert_eq!(view.epoch(), 9);
        let ids = |ms: &[Member]| ms.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&view.topology.members), ["a", "b"]);
        assert_eq!(ids(&view.topology.leaving), ["c"]);
        assert_eq!(view.topology.down, ["e"], "d left: not down");
        for key in ["k1", "k2", "k3"] {
            let owners: Vec<_> = view.owners(key).iter().map(|m| m.id.clone()).collect();
            assert_eq!(owners.len(), 2, "{key}");
            assert!(owners.iter().all(|id| id == "a" || id == "b"));
        }
    }
}
