//! `kvctl bench` as a process against an in-process cluster: every
//! protocol it drives kv with completes its requests without an error, and
//! its writes are really there.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;
use serde_json::Value;
use std::process::Command;

/// Runs `kvctl bench --json` with `args` and returns what it printed.
fn bench(cluster: &Cluster, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--controller")
        .arg(format!("http://{}", cluster.controller.http))
        .args(["bench", "--json", "--connections", "4"])
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_completes_its_requests_and_its_writes_are_stored() {
    let cluster = Cluster::start(3).await;
    for protocol in ["wire", "http"] {
        // A prefix a URL must escape.
        let prefix = format!("{protocol} &?");
        let writes = tokio::task::block_in_place(|| {
            bench(
                &cluster,
                &[
                    "--protocol",
                    protocol,
                    "--count",
                    "400",
                    "--keys",
                    "4",
                    "--value-size",
                    "48",
                    "--prefix",
                    &prefix,
                ],
            )
        });
        assert_eq!(
            (writes["errors"].as_u64(), writes["ops"].as_u64()),
            (Some(0), Some(400)),
            "{protocol}: {writes}"
        );
        // 400 writes over 4 keys: each key written (the chance of one
        // missed is (3/4)^400), with a 48-byte value.
        for i in 0..4 {
            let key = format!("{prefix}{i}");
            let owners = cluster.mapping(&key).await;
            let query = serde_urlencoded::to_string([("key", &key)]).unwrap();
            let (status, body) = cluster
                .worker(&owners[0])
                .get(&format!("/kv?{query}"))
                .await;
            assert_eq!(
                (status, body["value"].as_str().map(str::len)),
                (200, Some(48)),
                "{protocol}: {key}: {body}"
            );
        }
        let mixed = tokio::task::block_in_place(|| {
            bench(
                &cluster,
                &[
                    "--protocol",
                    protocol,
                    "--count",
                    "400",
                    "--get-percent",
                    "50",
                    "--keys",
                    "8",
                    "--prefix",
                    &prefix,
                ],
            )
        });
        assert_eq!(
            (mixed["errors"].as_u64(), mixed["ops"].as_u64()),
            (Some(0), Some(400)),
            "{protocol}: {mixed}"
        );
    }
    cluster.shutdown().await;
}
