//! Partitions, on real processes: each worker in a network namespace of
//! its own, cut off by blackhole routes. Reports what the cluster does and
//! checks that no acknowledged write is lost. Needs root (network
//! namespaces): as root, a failure to create them fails the test (CI runs
//! as root, so a broken set-up cannot pass as skipped); as another user it
//! says it skipped.
#![allow(clippy::unwrap_used)]

use kv_testkit::procs::*;
use std::time::{Duration, Instant};

/// Statuses of `victim` seen by the controller while the cut lasts.
async fn watch(cluster: &Cluster, victim: &str, lasting: Duration) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let until = Instant::now() + lasting;
    while Instant::now() < until {
        if let Some((_, status)) = cluster
            .nodes()
            .await
            .into_iter()
            .find(|(id, _)| id == victim)
        {
            if seen.last() != Some(&status) {
                seen.push(status);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// Whether this process runs as root (its real uid is 0).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            Some(uids.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

enum Cut {
    FromPeers,
    FromController,
}

async fn partition(cut: Cut) {
    let _serial = SERIAL.lock().await;
    let net = match Net::create(4) {
        Ok(net) => net,
        Err(why) if is_root() => {
            panic!("running as root, but cannot create network namespaces: {why}")
        }
        Err(why) => {
            println!("skipped: not root, so no network namespaces ({why})");
            return;
        }
    };
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = Cluster::start_in(net, 4).await;
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(500 + rng.u64(..1000))).await;
    let i = rng.usize(1..=4);
    let victim = format!("worker{i}");
    let net = cluster.net.as_ref().unwrap();
    let (label, set) = match cut {
        Cut::FromPeers => (
            "cut from its peers, not the controller",
            Net::cut_from_peers as fn(&Net, usize, bool),
        ),
        Cut::FromController => (
            "cut from the controller, not its peers",
            Net::cut_from_controller as fn(&Net, usize, bool),
        ),
    };
    set(net, i, true);
    let during = watch(&cluster, &victim, Duration::from_secs(4)).await;
    set(net, i, false);
    cluster.wait_all_up(4).await;
    let settled = settle(
        &cluster,
        load,
        &workers(4),
        &format!("{victim} {label} for 4 s"),
        seed,
    )
    .await;
    println!("FAULTS |   the controller saw {victim} as {} during the cut; {} writes were not acknowledged (clients retried or gave up)", during.join(" -> "), settled.failed);
    assert!(
        settled.result.is_ok(),
        "acknowledged writes lost across a partition (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_its_peers_but_not_the_controller_loses_no_acknowledged_write() {
    partition(Cut::FromPeers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_controller_but_not_its_peers_loses_no_acknowledged_write() {
    partition(Cut::FromController).await;
}
