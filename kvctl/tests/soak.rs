//! A soak on real processes: workers under writes go through a seeded
//! sequence of faults and routine operations, one after another, each
//! starting as soon as the cluster is whole again after the last (every
//! worker UP and ready: in the topology, holding its share). Then the
//! acknowledged-write checker and the loaded keys.
//!
//! The faults: `kill -9` of a worker restarted (at once, as a container
//! restarts in its pod, or once it is DOWN), of two workers at once, of
//! the controller, and of every process at once; a worker paused
//! (SIGSTOP) for up to 4 s; a worker replaced as a rolling restart of a
//! Deployment replaces a pod, or restarted under its id as one of a
//! StatefulSet restarts; a worker joining, and one leaving (scale-down).
//! Durable workers restart on their data dirs and take every fault.
//! Workers in memory restart empty, so they take only the faults that
//! leave two copies of every key. Whenever every worker is ready, the live
//! workers must hold three copies of every key written before the faults:
//! a worker ready before it holds its share fails that check.
//!
//! Sized for CI by default; at the scale users run:
//! `KV_SOAK_KEYS=1000000 KV_SOAK_FAULTS=20 cargo test --release -p kvctl
//! --test soak -- --nocapture` (`KV_FAULT_SEED` replays a schedule;
//! `KV_SOAK_OVERLAP=1` lets the durable cluster's faults overlap).
#![allow(clippy::unwrap_used)]

use kv_testkit::procs::*;
use std::time::{Duration, Instant};

/// Keys loaded before the faults.
fn keys() -> usize {
    env_or("KV_SOAK_KEYS", 30_000)
}

/// Faults in the sequence.
fn faults() -> usize {
    env_or("KV_SOAK_FAULTS", 6)
}

/// Whether durable workers' faults overlap: each begins without waiting
/// for the cluster to be whole again (workers in memory would lose writes
/// that way, rightly).
fn overlap() -> bool {
    env_or("KV_SOAK_OVERLAP", 0) != 0
}

fn env_or(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `kill -9` of a worker, restarted at once (on its data dir, if any).
    Crash,
    /// `kill -9` of a worker, restarted once it is DOWN.
    CrashUntilDown,
    /// `kill -9` of two workers at once, both restarted.
    CrashTwo,
    /// `kill -9` of the controller, restarted.
    Controller,
    /// `kill -9` of every process, all restarted.
    Everything,
    /// A new worker ready, then SIGTERM to an old one (a rolling restart's step).
    Replace,
    /// A new worker.
    Join,
    /// SIGTERM to a worker, not replaced.
    Leave,
    /// SIGTERM to a worker, started again under its id once it exited (a
    /// StatefulSet's rolling restart: the same pod name, the same volume).
    Restart,
    /// SIGSTOP to a worker for 0.5-4 s (a long pause: DOWN, or nearly),
    /// then SIGCONT.
    Pause,
}

impl Fault {
    /// A fault the cluster of `workers` can take: at least three workers
    /// stay (three copies), at most six run (a 2-core machine), and
    /// workers in memory (not `durable`) lose one worker's copies at most.
    fn pick(rng: &mut fastrand::Rng, workers: usize, durable: bool) -> Fault {
        loop {
            let fault = match rng.u32(..10) {
                0 => Fault::Crash,
                1 => Fault::CrashUntilDown,
                2 => Fault::CrashTwo,
                3 => Fault::Controller,
                4 => Fault::Everything,
                5 => Fault::Replace,
                6 => Fault::Join,
                7 => Fault::Leave,
                8 => Fault::Restart,
                _ => Fault::Pause,
            };
            match fault {
                Fault::Join if workers >= 6 => continue,
                Fault::Leave if workers <= 3 => continue,
                Fault::CrashTwo | Fault::Everything if !durable => continue,
                _ => return fault,
            }
        }
    }
}

/// The running workers, by name.
fn running(cluster: &Cluster) -> Vec<String> {
    let mut live: Vec<String> = (cluster.nodes.keys())
        .filter(|n| *n != "controller")
        .cloned()
        .collect();
    live.sort();
    live
}

/// SIGTERM to `id`; waits for it to exit by itself, with success.
async fn leave(cluster: &mut Cluster, id: &str) {
    signal(cluster.nodes[id].pid(), "-TERM");
    let status = cluster.exited(id).await;
    assert!(
        status.success(),
        "{id} exited with {status}; logs in {}",
        cluster.logs.display()
    );
}

/// `kill -9` of `ids` (their processes gone once this returns).
fn kill(cluster: &mut Cluster, ids: &[&str]) {
    for id in ids {
        let node = cluster.nodes.get_mut(*id).unwrap();
        signal(node.pid(), "-9");
        node.child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_cluster_under_writes_through_a_sequence_of_faults_loses_nothing() {
    soak(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_in_memory_under_writes_through_a_sequence_of_faults_loses_nothing() {
    soak(false).await;
}

async fn soak(durable: bool) {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let (loaded, faults) = (keys(), faults());
    let mut rng = fastrand::Rng::with_seed(seed);
    let flags: &[&str] = if durable {
        &["--data-dir", "{data}"]
    } else {
        &[]
    };
    let scenario = if durable {
        "soak, durable"
    } else {
        "soak, in memory"
    };
    println!("SOAK | {scenario} | seed {seed}");
    let mut cluster = Cluster::start_with(4, flags).await;
    cluster.load_replicated(loaded).await;
    let load = Load::start(&cluster, seed).await;
    let started = Instant::now();
    let mut next_id = 5;
    let mut done = Vec::new();
    for _ in 0..faults {
        let live = running(&cluster);
        let fault = Fault::pick(&mut rng, live.len(), durable);
        let mut victim = live[rng.usize(..live.len())].clone();
        let at = Instant::now();
        match fault {
            Fault::Crash => {
                kill(&mut cluster, &[&victim]);
                cluster.restart(&victim).await;
            }
            Fault::CrashUntilDown => {
                kill(&mut cluster, &[&victim]);
                cluster.down(&victim).await;
                cluster.restart(&victim).await;
            }
            Fault::CrashTwo => {
                let other = live.iter().find(|w| **w != victim).unwrap().clone();
                kill(&mut cluster, &[&victim, &other]);
                cluster.restart(&victim).await;
                cluster.restart(&other).await;
            }
            Fault::Controller => {
                victim = "controller".into();
                kill(&mut cluster, &["controller"]);
                cluster.restart("controller").await;
            }
            Fault::Everything => {
                victim = "every process".into();
                let mut all = live.clone();
                all.push("controller".into());
                kill(
                    &mut cluster,
                    &all.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                cluster.restart("controller").await;
                for w in &live {
                    cluster.restart(w).await;
                }
            }
            Fault::Replace => {
                let new = format!("worker{next_id}");
                next_id += 1;
                cluster.spawn_worker_as(next_id, &new).await;
                cluster
                    .until(&format!("{new} ready"), async || cluster.ready(&new).await)
                    .await;
                leave(&mut cluster, &victim).await;
            }
            Fault::Join => {
                victim = format!("worker{next_id}");
                next_id += 1;
                cluster.spawn_worker_as(next_id, &victim).await;
            }
            Fault::Leave => leave(&mut cluster, &victim).await,
            Fault::Restart => {
                leave(&mut cluster, &victim).await;
                cluster.restart(&victim).await;
            }
            Fault::Pause => {
                let pid = cluster.nodes[&victim].pid();
                signal(pid, "-STOP");
                tokio::time::sleep(Duration::from_millis(rng.u64(500..4000))).await;
                signal(pid, "-CONT");
            }
        }
        let live = running(&cluster);
        if !(durable && overlap()) {
            cluster.wait_all_up(live.len()).await;
            // Every worker ready holds its share: three copies of every key
            // written before the faults are on the live workers (more while
            // old owners still hold theirs).
            let (copies, least) = (
                cluster.copies(&live).await,
                3 * (loaded + STILL_KEYS) as u64,
            );
            assert!(
                copies >= least,
                "after {fault:?} ({victim}) every worker is ready, but they hold {copies} copies, not the {least} of the keys written before the faults at least: one is ready before it holds its share (seed {seed}); logs in {}",
                cluster.logs.display()
            );
        }
        let line = format!(
            "{fault:?} ({victim}): done {:.1} s after it began",
            at.elapsed().as_secs_f64()
        );
        println!("SOAK | {line}");
        done.push(line);
        // Writes go on a while before the next fault.
        tokio::time::sleep(Duration::from_millis(rng.u64(200..2000))).await;
    }
    let live = running(&cluster);
    println!(
        "SOAK | {scenario} | {faults} faults in {:.1} s, {loaded} loaded keys, workers now {live:?}",
        started.elapsed().as_secs_f64()
    );
    let settled = settle(&cluster, load, &live, scenario, seed).await;
    assert!(
        settled.result.is_ok(),
        "{scenario}: acknowledged writes lost (seed {seed}) after: {done:#?}"
    );
    loaded_keys_intact(&cluster, &live, loaded, &settled.history, 0, scenario).await;
}
