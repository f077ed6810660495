//! `kvctl status [--watch] [--json]`: the controller's `/cluster` in a
//! terminal, like `nodetool status`: a summary line, one row per worker,
//! and the latest events.

use anyhow::{Context, Result};
use indicatif::{DecimalBytes, HumanCount};
use kv_client::HttpClient;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

/// Events printed under the table.
const EVENTS: usize = 8;

/// Prints the cluster once, or every second with `watch` until Ctrl-C.
pub async fn run(controller: &str, watch: bool, json: bool) -> Result<()> {
    let http = HttpClient::new();
    let url = format!("{}/cluster", controller.trim_end_matches('/'));
    loop {
        let cluster: Value = http.get_json(&url).await.with_context(|| {
            format!("cannot read {url} (is the cluster running? try `kvctl local`)")
        })?;
        let text = if json {
            serde_json::to_string_pretty(&cluster)?
        } else {
            render(&cluster)
        };
        let page = if watch {
            // Home the cursor and clear the screen, then redraw.
            format!("\x1b[H\x1b[2J{text}\n(refreshing every second; Ctrl-C to stop)\n")
        } else {
            format!("{text}\n")
        };
        let mut out = std::io::stdout().lock();
        match out.write_all(page.as_bytes()).and_then(|()| out.flush()) {
            // The reader went away (`kvctl status | head`): nothing to say.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.context("cannot write to standard output")?,
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// A JSON count with thousands separators ("" when absent).
fn count(v: &Value) -> String {
    v.as_u64()
        .map_or(String::new(), |n| HumanCount(n).to_string())
}

/// JSON bytes in decimal units ("" when absent).
fn bytes(v: &Value) -> String {
    v.as_u64()
        .map_or(String::new(), |n| DecimalBytes(n).to_string())
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The `/cluster` JSON as a terminal page.
pub fn render(c: &Value) -> String {
    let mut out = String::new();
    let counts = &c["counts"];
    let state = if c["settled"].as_bool() == Some(true) {
        "settled".to_string()
    } else {
        let r = &c["rebalance"];
        let workers = r["workers"].as_u64().unwrap_or(0);
        format!(
            "rebalancing: {workers} worker{} catching up to epoch {}; {} copies moved, about {} ({}) to go",
            if workers == 1 { "" } else { "s" },
            c["epoch"],
            count(&r["keys_moved"]),
            count(&r["keys_to_go"]),
            bytes(&r["bytes_to_go"])
        )
    };
    let _ = writeln!(
        out,
        "epoch {} · {} UP, {} SUSPECT, {} LEAVING, {} DOWN · secret {} · {state}",
        c["epoch"],
        counts["UP"],
        counts["SUSPECT"],
        counts["LEAVING"],
        counts["DOWN"],
        if c["secret"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
    );
    let unavailable = &c["unavailable"];
    if let Some(share) = unavailable["share"].as_f64().filter(|s| *s > 0.0) {
        let down: Vec<&str> = unavailable["down"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        // As the page says it: a sliver is not "0.0%".
        let share = match share < 0.001 {
            true => "under 0.1".to_string(),
            false => format!("{:.1}", 100.0 * share),
        };
        let _ = writeln!(
            out,
            "! {share}% of the ring has all its owners DOWN ({}): a quorum read there of a key no live worker holds answers 503 until they return or are forgotten",
            down.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "{:<12} {:<16} {:<22} {:>12} {:>10} {:>6} {:>7} {:<5} {:>8}  REBALANCE",
        "STATUS", "WORKER", "ADDRESS", "KEYS", "BYTES", "SHARE", "EPOCH", "READY", "OPS/S"
    );
    for w in c["workers"].as_array().into_iter().flatten() {
        let status = match (text(&w["status"]), text(&w["reason"])) {
            (s, "") => s.to_string(),
            (s, reason) => format!("{s}/{reason}"),
        };
        let answered = text(&w["answer"]) == "ok";
        let share = w["share"]
            .as_f64()
            .filter(|s| *s > 0.0)
            .map_or(String::new(), |s| format!("{:.1}%", 100.0 * s));
        let epoch = match (w["applied_epoch"].as_u64(), w["settled_epoch"].as_u64()) {
            (Some(a), Some(s)) if a == s => a.to_string(),
            (Some(a), Some(s)) => format!("{s}->{a}"),
            _ => String::new(),
        };
        let ready = match w["ready"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "",
        };
        let ops = w["ops_per_s"]
            .as_f64()
            .map_or(String::new(), |r| count(&Value::from(r.round() as u64)));
        let rebalance = if !w["rebalance"].is_null() {
            let r = &w["rebalance"];
            format!(
                "to epoch {}: {} moved, ~{} to go",
                r["epoch"],
                count(&r["keys_moved"]),
                count(&r["keys_to_go"])
            )
        } else if !answered && text(&w["status"]) != "DOWN" {
            format!("({})", text(&w["error"]))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<12} {:<16} {:<22} {:>12} {:>10} {:>6} {:>7} {:<5} {:>8}  {rebalance}",
            status,
            text(&w["id"]),
            format!("{}:{}", text(&w["host"]), w["port"]),
            count(&w["keys"]),
            bytes(&w["bytes"]),
            share,
            epoch,
            ready,
            ops,
        );
    }
    let events: Vec<&Value> = c["events"].as_array().into_iter().flatten().collect();
    if !events.is_empty() {
        let _ = writeln!(out, "\nlatest events:");
    }
    for e in events.iter().take(EVENTS) {
        let at = e["at_ms"].as_u64().map_or(String::new(), |ms| {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
            humantime::format_rfc3339_seconds(t).to_string()
        });
        let _ = writeln!(out, "  {at}  {}", describe(e));
    }
    out.trim_end().to_string()
}

fn describe(e: &Value) -> String {
    match text(&e["kind"]) {
        "status" => format!(
            "{}: {} -> {} ({})",
            text(&e["worker"]),
            text(&e["from"]),
            text(&e["to"]),
            text(&e["why"])
        ),
        "registered" => format!(
            "{} registered (generation {})",
            text(&e["worker"]),
            e["generation"]
        ),
        "epoch" => format!(
            "epoch {} published: {} in the ring, {} leaving",
            e["epoch"], e["live"], e["leaving"]
        ),
        "rebalance" => format!(
            "{} rebalanced to epoch {} ({}): {} copies, {} in {} ms{}",
            text(&e["worker"]),
            e["epoch"],
            text(&e["why"]),
            count(&e["keys"]),
            bytes(&e["bytes"]),
            e["took_ms"],
            if e["complete"].as_bool() == Some(false) {
                ", incomplete: retrying"
            } else {
                ""
            }
        ),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cluster_with_a_down_worker_and_a_rebalance_reads_at_a_glance() {
        let cluster = json!({
            "epoch": 7, "secret": true, "settled": false,
            "counts": {"UP": 2, "SUSPECT": 0, "LEAVING": 0, "DOWN": 1},
            "rebalance": {"workers": 1, "keys_to_go": 1500, "bytes_to_go": 150000, "keys_moved": 500},
            "workers": [
                {"id": "worker1", "status": "UP", "host": "10.0.0.1", "port": 8101, "share": 0.5,
                 "answer": "ok", "keys": 1234567, "bytes": 123456789, "applied_epoch": 7,
                 "settled_epoch": 6, "ready": false, "ops_per_s": 1520.4,
                 "rebalance": {"epoch": 7, "keys_to_go": 1500, "bytes_to_go": 150000, "keys_moved": 500, "bytes_moved": 50000}},
                {"id": "worker2", "status": "UP", "host": "10.0.0.2", "port": 8201, "share": 0.5,
                 "answer": "slow", "error": "no answer within 500 ms"},
                {"id": "worker3", "status": "DOWN", "reason": "silent", "host": "10.0.0.3", "port": 8301,
                 "share": 0.0, "answer": "not asked"}
            ],
            "events": [
                {"kind": "status", "at_ms": 0, "worker": "worker3", "from": "UP", "to": "DOWN", "why": "no heartbeat for 1000 ms"}
            ],
            "unavailable": {"down": ["worker3"], "share": 0.25}
        });
        let mut sliver = cluster.clone();
        sliver["unavailable"]["share"] = json!(0.0004);
        assert!(render(&sliver).contains("\n! under 0.1% of the ring"));
        let page = render(&cluster);
        let lines: Vec<&str> = page.lines().collect();
        assert!(lines[0].starts_with("epoch 7 · 2 UP, 0 SUSPECT, 0 LEAVING, 1 DOWN · secret on · rebalancing: 1 worker catching up to epoch 7; 500 copies moved, about 1,500 (150.00 kB) to go"), "{page}");
        assert!(
            lines[1].starts_with("! 25.0% of the ring has all its owners DOWN (worker3): "),
            "{page}"
        );
        // A worker's row, below the summary and the warning.
        let row = |id: &str| {
            lines
                .iter()
                .skip(3)
                .find(|l| l.contains(id))
                .copied()
                .unwrap_or_default()
        };
        let w1 = row("worker1");
        for part in [
            "UP",
            "1,234,567",
            "123.46 MB",
            "50.0%",
            "6->7",
            "no",
            "1,520",
            "to epoch 7: 500 moved, ~1,500 to go",
        ] {
            assert!(w1.contains(part), "{part:?} missing from {w1:?}");
        }
        assert!(
            row("worker2").contains("(no answer within 500 ms)"),
            "{page}"
        );
        assert!(row("worker3").starts_with("DOWN/silent"), "{page}");
        assert!(
            page.contains("worker3: UP -> DOWN (no heartbeat for 1000 ms)"),
            "{page}"
        );
    }
}
