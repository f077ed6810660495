//! `kvctl bench` as a process against an in-process cluster: every
//! protocol it drives kv with completes its requests without an error, and
//! its writes are really there.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;
use serde_json::Value;
use std::process::Command;

/// Runs `kvctl bench` for 400 requests over `protocol` on keys starting
/// with `prefix`, with `args` besides, and checks that every one succeeded.
fn bench_400(cluster: &Cluster, protocol: &str, prefix: &str, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--controller")
        .arg(format!("http://{}", cluster.controller.http))
        .args(["bench", "--json", "--connections", "4", "--count", "400"])
        .args(["--protocol", protocol, "--prefix", prefix])
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let figures: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    assert_eq!(
        (figures["errors"].as_u64(), figures["ops"].as_u64()),
        (Some(0), Some(400)),
        "{protocol}: {figures}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_completes_its_requests_and_its_writes_are_stored() {
    let cluster = Cluster::start(3).await;
    let each_own: &[&str] = &[];
    for (protocol, clients) in [
        ("wire", each_own),
        ("wire", &["--shared-client"]),
        ("http", each_own),
    ] {
        // A prefix a URL must escape.
        let prefix = format!("{protocol}{} &?", clients.len());
        let writes = [&["--keys", "4", "--value-size", "48"], clients].concat();
        tokio::task::block_in_place(|| bench_400(&cluster, protocol, &prefix, &writes));
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
        let mixed = [&["--keys", "8", "--get-percent", "50"], clients].concat();
        tokio::task::block_in_place(|| bench_400(&cluster, protocol, &prefix, &mixed));
    }
    // Each request a connection opened to its key's primary, and closed.
    tokio::task::block_in_place(|| bench_400(&cluster, "handshake", "h", &[]));
    cluster.shutdown().await;
}
