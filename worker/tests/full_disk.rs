//! A worker whose data dir fills up: writes it cannot store fail with a
//! clear error, nothing is acknowledged that is not on two owners, and its
//! `/readyz` says the storage fails and what to do.
//!
//! The full disk is a 4 MiB tmpfs mounted for the test, which needs root
//! (CI runs as root); without it the test fails and says so.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;
use std::path::PathBuf;
use std::process::Command;

/// A small tmpfs, unmounted on drop.
struct TinyDisk {
    path: PathBuf,
}

impl TinyDisk {
    fn mount(size: &str) -> TinyDisk {
        let path = std::env::temp_dir().join(format!(
            "kv-full-disk-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs as a full disk, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { path }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_fails_writes_clearly_and_nothing_unstored_is_acknowledged() {
    let disk = TinyDisk::mount("4m");
    let mut cluster = Cluster::start(2).await;
    let dir = disk.path.join("worker3");
    let full = start_worker_with("worker3", &cluster.controller, |c| {
        c.data_dir = Some(dir);
    })
    .await;
    cluster.workers.push(full);
    cluster.settled().await;
    // Three workers: every one owns every key. 1 KiB values fill 4 MiB
    // after a few thousand copies.
    let value = "x".repeat(1024);
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    // Up to 6,000 writes, and no more once 100 have been refused: by then
    // the disk is full and the healthy owners have been taking writes
    // beside it.
    for i in 0..6000 {
        if refused.len() == 100 {
            break;
        }
        let key = format!("fill:{i}");
        let (status, reply) = http(
            "PUT",
            &cluster.worker("worker1").url("/kv"),
            put_body(&key, &value),
        )
        .await;
        match status {
            200 => acked.push(key),
            503 => refused.push(reply["error"].as_str().unwrap_or_default().to_string()),
            other => panic!("{key}: {other} {reply}"),
        }
    }
    println!(
        "FULL DISK | {} writes acknowledged, {} refused",
        acked.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "the 4 MiB disk never filled");
    assert!(
        refused.iter().any(
            |e| e.contains("cannot store writes") && e.contains("worker3")
                || e.contains("No space left")
        ),
        "no refusal says why: {:?}",
        &refused[..refused.len().min(3)]
    );
    assert!(acked.len() > 100, "the healthy workers kept acknowledging");
    // The full worker says so where Kubernetes looks.
    let (status, ready) = cluster.worker("worker3").get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    let why = ready["error"].as_str().unwrap_or_default();
    assert!(why.starts_with("storage failing: the data dir"), "{why}");
    // The engine takes no write after a failed one: the way out is said.
    assert!(
        why.contains("restart the worker once its disk has room"),
        "{why}"
    );
    // Every acknowledged write is on two owners at least, and on its
    // primary: the primary's own copy is one of the two that count.
    let ring = ring(&cluster);
    for key in &acked {
        let mut copies = 0;
        for w in &cluster.workers {
            copies += usize::from(w.local(key).await.as_deref() == Some(value.as_str()));
        }
        assert!(copies >= 2, "{key} acknowledged but on {copies} owners");
        let primary = ring.owners(key.as_bytes(), 3)[0];
        let held = cluster.worker(primary).local(key).await;
        assert_eq!(
            held.as_deref(),
            Some(value.as_str()),
            "{key} acknowledged but not on its primary {primary}"
        );
    }
    cluster.shutdown().await;
}
