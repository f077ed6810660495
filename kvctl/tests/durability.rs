//! Durable workers (`--data-dir`) on real processes: the whole cluster
//! killed with -9 under writes and started again loses nothing acknowledged
//! and keeps deletes deleted; a worker away for a while (crashed, or left
//! as a StatefulSet's rolling restart makes it) is sent only what changed;
//! a data dir refuses another id and a second process; a key whose owners
//! all died is unavailable, not absent, until they return.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use kv_client::{Client, Credentials};
use kv_testkit::procs::*;
use kv_wire::Ring;
use std::process::Command;
use std::time::{Duration, Instant};

const LOADED: usize = 20_000;
/// Keys written and then deleted before the crash.
const DELETED: usize = 300;

async fn client(cluster: &Cluster) -> Client {
    Client::connect(
        &cluster.controller_url(),
        Credentials::new("kv", "durability"),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_process_under_writes_then_a_restart_with_the_data_dirs_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut cluster = Cluster::start_with(4, &["--data-dir", "{data}"]).await;
    cluster.load(LOADED).await;
    let c = client(&cluster).await;
    for i in 0..DELETED {
        c.put(&format!("gone:{i}"), Bytes::from("soon deleted"))
            .await
            .unwrap();
        c.delete(&format!("gone:{i}")).await.unwrap();
    }
    let load = Load::start(&cluster, seed).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A power cut of the whole cluster, as far as processes can tell.
    let all: Vec<String> = cluster.nodes.keys().cloned().collect();
    for name in &all {
        signal(cluster.nodes[name].pid(), "-9");
    }
    let (history, ops, failed) = load.stop().await;
    cluster.restart("controller").await;
    for w in workers(4) {
        cluster.restart(&w).await;
    }
    cluster.wait_all_up(4).await;
    let result = converge(&cluster, &history, &workers(4)).await;
    report(
        "kill -9 of every process, restarted with their data",
        seed,
        ops,
        &history,
        failed,
        &result,
    );
    assert!(result.is_ok(), "acknowledged writes lost (seed {seed})");
    let ring = Ring::new(workers(4));
    for i in 0..DELETED {
        let key = format!("gone:{i}");
        assert_eq!(c.get(&key).await.unwrap(), None, "{key} came back");
        for owner in ring.owners(key.as_bytes(), 3) {
            assert!(
                cluster.local(owner, &key).await.is_none(),
                "{key} came back on {owner}"
            );
        }
    }
    loaded_keys_intact(
        &cluster,
        &workers(4),
        LOADED,
        &history,
        DELETED,
        "whole-cluster kill -9",
    )
    .await;
    // The restarted processes count from zero: what moved since they started.
    let moved = moved(&cluster, &workers(4)).await;
    println!("DURABILITY | whole-cluster kill -9 | {LOADED} loaded keys, {DELETED} deletes and the writers' history intact; {moved} copies moved after the restart");
}

/// How worker2 goes away for a while.
#[derive(Debug, Clone, Copy)]
enum Away {
    /// `kill -9`, and DOWN.
    Crashed,
    /// SIGTERM: it hands its keys over and exits (a StatefulSet's rolling
    /// restart, which starts it again under its id on its volume).
    Left,
}

/// worker2 goes away `how` for 5 s while 1% of its keys change and 1% are
/// deleted, then comes back with its data dir: it holds every change, and
/// the copies moved on its return (by anyone) are no more than the
/// changes. Once settled, the cluster holds exactly three copies of every
/// key (the copies handed over when it left are dropped by their takers).
async fn away_and_back(how: Away) {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with(4, &["--data-dir", "{data}"]).await;
    cluster.load_replicated(LOADED).await;
    match how {
        Away::Crashed => {
            signal(cluster.nodes["worker2"].pid(), "-9");
            cluster.down("worker2").await;
        }
        Away::Left => {
            signal(cluster.nodes["worker2"].pid(), "-TERM");
            let status = cluster.exited("worker2").await;
            assert!(status.success(), "worker2 exited with {status}");
        }
    }
    let away = Instant::now();
    let ring = Ring::new(workers(4));
    let its: Vec<String> = (0..LOADED)
        .map(|i| format!("key:{i}"))
        .filter(|k| ring.owners(k.as_bytes(), 3).contains(&"worker2"))
        .collect();
    let changed: Vec<String> = its.iter().step_by(100).cloned().collect();
    let deleted: Vec<String> = its.iter().skip(50).step_by(100).cloned().collect();
    let c = client(&cluster).await;
    let value = Bytes::from(vec![b'n'; 100]);
    let items: Vec<(String, Bytes)> = changed.iter().map(|k| (k.clone(), value.clone())).collect();
    for r in c.put_many(&items).await {
        r.unwrap();
    }
    for key in &deleted {
        c.delete(key).await.unwrap();
    }
    let changed_bytes: usize = changed.iter().map(|k| k.len() + value.len()).sum::<usize>()
        + deleted.iter().map(String::len).sum::<usize>();
    // Once the others hold three copies of everything (after a crash,
    // re-replication restores them), what moves is for worker2's return.
    let others: Vec<String> = ["worker1", "worker3", "worker4"].map(String::from).into();
    cluster
        .three_copies("the loaded keys", &others, LOADED as u64)
        .await;
    let bytes = "kv_worker_rebalance_bytes_total";
    let before = metric_sum(&cluster, &others, bytes).await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(away.elapsed())).await;
    cluster.restart("worker2").await;
    cluster.wait_all_up(4).await;
    for key in &changed {
        let (_, got) = cluster.local("worker2", key).await.unwrap();
        assert_eq!(got.as_bytes(), &value[..], "{key} on worker2");
    }
    for key in &deleted {
        let copy = cluster.copy("worker2", key).await.unwrap();
        assert!(
            matches!(copy, Some((_, None))),
            "{key} on worker2: {copy:?}, not the tombstone"
        );
    }
    cluster
        .three_copies("the loaded keys", &workers(4), LOADED as u64)
        .await;
    let pulled = cluster.metric("worker2", bytes).await;
    let moved = pulled + metric_sum(&cluster, &others, bytes).await - before;
    println!(
        "DURABILITY | worker2 {how:?}, away 5 s, {} of its {} keys changed and {} deleted ({changed_bytes} bytes) | {moved} bytes moved on its return ({:.3}x), {pulled} of them pulled by it",
        changed.len(),
        its.len(),
        deleted.len(),
        moved / changed_bytes as f64
    );
    assert!(
        moved <= 1.1 * changed_bytes as f64,
        "{moved} bytes moved on worker2's return, for {changed_bytes} bytes of changes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_with_its_data_dir_after_a_crash_is_sent_only_what_changed() {
    away_and_back(Away::Crashed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_with_its_data_dir_after_leaving_is_sent_only_what_changed() {
    away_and_back(Away::Left).await;
}

/// `kvctl node worker` with `args`, run to its end: (success, output).
fn worker_run(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args([
            "node",
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--wire-listen",
            "127.0.0.1:0",
        ])
        .args(["--controller", &cluster.controller_url()])
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_refuses_another_worker_id_and_a_second_process() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with(1, &["--data-dir", "{data}"]).await;
    let dir = cluster
        .logs
        .join("data")
        .join("worker1")
        .display()
        .to_string();
    let (ok, said) = worker_run(&cluster, &["--id", "worker1", "--data-dir", &dir]);
    assert!(!ok && said.contains("in use by another process"), "{said}");
    signal(cluster.nodes["worker1"].pid(), "-9");
    cluster.exited("worker1").await;
    let (ok, said) = worker_run(&cluster, &["--id", "intruder", "--data-dir", &dir]);
    assert!(
        !ok && said.contains("holds the data of worker \"worker1\"")
            && said.contains("--id worker1"),
        "{said}"
    );
    let file = cluster.logs.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let under_a_file = file.join("data").display().to_string();
    let (ok, said) = worker_run(&cluster, &["--id", "w9", "--data-dir", &under_a_file]);
    assert!(!ok && said.contains("cannot use the data dir"), "{said}");
    drop(cluster);
}

/// Where the data of a preallocated journal file ends (after its last
/// non-zero byte).
fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_after_a_crash_is_cut_off_and_logged_and_nothing_before_it_is_lost() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with(3, &["--data-dir", "{data}", "--sync", "always"]).await;
    let c = client(&cluster).await;
    let items: Vec<(String, Bytes)> = (0..2000)
        .map(|i| (format!("torn:{i}"), Bytes::from(format!("value-{i}"))))
        .collect();
    for r in c.put_many(&items).await {
        r.unwrap();
    }
    signal(cluster.nodes["worker1"].pid(), "-9");
    cluster.exited("worker1").await;
    // A write that died half-way: a batch that starts and never ends,
    // after the last complete one of the newest journal.
    let engine = cluster.logs.join("data/worker1/engine");
    let journal = std::fs::read_dir(&engine)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .max_by_key(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().to_string();
            stem.parse::<u64>().unwrap_or(0)
        })
        .expect("a journal file");
    let mut bytes = std::fs::read(&journal).unwrap();
    let end = data_end(&bytes);
    assert!(
        end > 64,
        "the journal holds no writes: {}",
        journal.display()
    );
    let torn: Vec<u8> = bytes[..48].to_vec();
    bytes.splice(end..(end + torn.len()).min(bytes.len()), torn);
    std::fs::write(&journal, &bytes).unwrap();

    cluster.restart("worker1").await;
    cluster.wait_all_up(3).await;
    let log = std::fs::read_to_string(cluster.logs.join("worker1.log")).unwrap();
    let restarted = log.rsplit("worker listening").nth(1).unwrap_or(&log);
    assert!(
        log.contains("a torn tail was cut off the journal"),
        "the cut was not logged; see {}",
        cluster.logs.display()
    );
    // What the worker itself held when it opened its dir, before any peer
    // could send it anything: every key written before the crash.
    let opened = restarted
        .lines()
        .rev()
        .find(|l| l.contains("data dir opened"))
        .expect("an open line");
    assert!(opened.contains("keys=2000"), "{opened}");
    for i in (0..2000).step_by(97) {
        let key = format!("torn:{i}");
        let (_, value) = cluster.local("worker1", &key).await.unwrap();
        assert_eq!(value, format!("value-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_damaged_far_from_its_end_stops_the_worker_with_the_way_out() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with(3, &["--data-dir", "{data}", "--sync", "always"]).await;
    let c = client(&cluster).await;
    // 24 MB of journal: damage a quarter of the way in leaves more after
    // it than any torn write could.
    for i in 0..24 {
        // Random bytes: the journal compresses what it can.
        let value: Vec<u8> = (0..1 << 20).map(|_| fastrand::u8(..)).collect();
        c.put(&format!("big:{i}"), Bytes::from(value))
            .await
            .unwrap();
    }
    signal(cluster.nodes["worker1"].pid(), "-9");
    cluster.exited("worker1").await;
    let dir = cluster.logs.join("data/worker1");
    let journal = dir.join("engine/0.jnl");
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = data_end(&bytes) / 4;
    for b in &mut bytes[at..at + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&journal, &bytes).unwrap();
    let dir = dir.display().to_string();
    let way_out = format!("move {dir} away");
    let (ok, said) = worker_run(&cluster, &["--id", "worker1", "--data-dir", &dir]);
    assert!(!ok, "a damaged store was served: {said}");
    assert!(
        said.contains("is damaged") && said.contains("0.jnl") && said.contains(&way_out),
        "{said}"
    );
    // And it stays refused until someone moves the dir away.
    let (ok, said) = worker_run(&cluster, &["--id", "worker1", "--data-dir", &dir]);
    assert!(
        !ok && said.contains("is damaged") && said.contains(&way_out),
        "{said}"
    );
}

/// Three of four durable workers killed at once: a key only they held
/// reads at the survivor as unavailable (503, naming them), not as absent,
/// even after a controller restart, and reads again once they are back
/// with their data dirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_owners_all_died_is_unavailable_until_they_return_with_their_data() {
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 1_000;
    let mut cluster = Cluster::start_with(4, &["--data-dir", "{data}"]).await;
    cluster.load_replicated(KEYS).await;
    let ring = Ring::new(workers(4));
    let key = (0..KEYS)
        .map(|i| format!("key:{i}"))
        .find(|k| !ring.owners(k.as_bytes(), 3).contains(&"worker1"))
        .unwrap();
    let (_, value) = cluster.local("worker2", &key).await.unwrap();
    let dead = ["worker2", "worker3", "worker4"];
    for id in dead {
        signal(cluster.nodes[id].pid(), "-9");
    }
    for id in dead {
        cluster.down(id).await;
    }
    let read = async |cluster: &Cluster| quorum_read(cluster, "worker1", &key).await;
    // worker1 hears of the deaths a moment after the controller shows them.
    cluster
        .until("the survivor to answer 503", async || {
            read(&cluster).await.0 == 503
        })
        .await;
    let (_, reply) = read(&cluster).await;
    let error = reply["error"].as_str().unwrap();
    assert!(
        dead.iter().all(|id| error.contains(id)) && error.contains("are all down"),
        "{error}"
    );
    // A controller restarted meanwhile learns of them from the survivor's
    // registration: its first topology lists them DOWN too.
    let epoch = cluster.metric("worker1", "kv_worker_epoch").await;
    signal(cluster.nodes["controller"].pid(), "-9");
    cluster.restart("controller").await;
    cluster
        .until("the restarted controller's first topology", async || {
            cluster.metric("worker1", "kv_worker_epoch").await > epoch
        })
        .await;
    let (status, reply) = read(&cluster).await;
    assert_eq!(status, 503, "after a controller restart: {reply}");
    for id in dead {
        cluster.restart(id).await;
    }
    cluster.wait_all_up(4).await;
    cluster
        .until("the key to read again", async || {
            let (status, reply) = read(&cluster).await;
            status == 200 && reply["value"] == value.as_str()
        })
        .await;
}

/// A quorum read of `key` over HTTP at `worker`: (status, JSON body).
async fn quorum_read(cluster: &Cluster, worker: &str, key: &str) -> (u16, serde_json::Value) {
    let url = format!(
        "{}/kv?key={key}&consistency=quorum",
        cluster.nodes[worker].url()
    );
    let (status, body) = cluster
        .http
        .request("GET".parse().unwrap(), &url, Bytes::new())
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}
