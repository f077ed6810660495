//! `kvctl local`: the demo cluster on this machine, each node its own OS
//! process running this same binary (`kvctl node controller|worker`), so a
//! single `cargo run` builds everything it needs.
//!
//! Children read their stdin and stop when it closes: however kvctl ends —
//! Ctrl-C, SIGTERM, even `kill -9` — the pipes close and no node is left
//! behind.

use crate::out::outln;
use anyhow::{bail, Context, Result};
use kv_client::HttpClient;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How long the cluster may take to come up.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// `kvctl local` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Workers to start (their ports are 8{i}01 and 8{i}02).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=9))]
    workers: u8,
    /// Folder for the nodes' logs. Default: a new folder under the system's temporary folder.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// The controller's port; worker i listens on base+100*i+1 (HTTP) and
    /// base+100*i+2 (wire).
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u16).range(1..=64535))]
    base_port: u16,
    /// Keep each worker's data in DIR/workerN (durable across restarts of
    /// `kvctl local`); default: in memory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// With --data-dir: `always`, `interval` or `never` (see `kv-worker --help`).
    #[arg(long, value_enum, default_value = "interval", requires = "data_dir")]
    sync: kv_worker::disk::SyncPolicy,
}

struct Node {
    name: String,
    http: u16,
    wire: Option<u16>,
    log: PathBuf,
    child: Child,
}

/// Worker `i`'s HTTP and wire ports: 8101/8102 for worker1 with the
/// default base, and so on.
fn worker_ports(base: u16, i: u8) -> (u16, u16) {
    let base = base + 100 * u16::from(i);
    (base + 1, base + 2)
}

/// Runs the cluster of `cluster` until Ctrl-C or SIGTERM; with a secret
/// file, every node proves that secret.
pub async fn run(args: Args, cluster: &str, secret_file: Option<&Path>) -> Result<()> {
    let exe =
        std::env::current_exe().context("cannot find the kvctl executable to start nodes with")?;
    let logs = match args.logs {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("kvctl-local-{}", std::process::id())),
    };
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("cannot create the log folder {}", logs.display()))?;
    let controller_port = args.base_port;
    let controller_url = format!("http://127.0.0.1:{controller_port}");

    // Flags every node shares.
    let mut common = vec!["--cluster".to_string(), cluster.to_string()];
    if let Some(file) = secret_file {
        // Absolute, so the nodes find it whatever their working folder.
        let file = std::path::absolute(file)
            .with_context(|| format!("cannot resolve {}", file.display()))?;
        common.extend(["--cluster-secret-file".into(), file.display().to_string()]);
    }
    // The nodes share this machine: each gets its share of the cores rather
    // than a runtime per core each (threads contending for CPUs, context
    // switches on every message), unless KV_THREADS says otherwise.
    if std::env::var_os("KV_THREADS").is_none() {
        common.extend(["--threads".into(), threads_per_node().to_string()]);
    }
    let common: Vec<&str> = common.iter().map(String::as_str).collect();

    let mut nodes = Vec::new();
    let listen = format!("127.0.0.1:{controller_port}");
    nodes.push(spawn(
        &exe,
        "controller",
        &[&["controller", "--listen", &listen], &common[..]].concat(),
        controller_port,
        None,
        &logs,
    )?);
    for i in 1..=args.workers {
        let (http, wire) = worker_ports(args.base_port, i);
        let name = format!("worker{i}");
        let (http_addr, wire_addr) = (format!("127.0.0.1:{http}"), format!("127.0.0.1:{wire}"));
        let flags = [
            "worker",
            "--id",
            &name,
            "--listen",
            &http_addr,
            "--wire-listen",
            &wire_addr,
            "--advertise-host",
            "127.0.0.1",
            "--controller",
            &controller_url,
        ];
        let mut flags: Vec<String> = [&flags[..], &common[..]]
            .concat()
            .iter()
            .map(|f| f.to_string())
            .collect();
        if let Some(dir) = &args.data_dir {
            let dir = std::path::absolute(dir.join(&name))
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            flags.extend(["--data-dir".into(), dir.display().to_string()]);
            let sync = clap::ValueEnum::to_possible_value(&args.sync)
                .context("every sync policy has a name")?;
            flags.extend(["--sync".into(), sync.get_name().to_string()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        nodes.push(spawn(&exe, &name, &flags, http, Some(wire), &logs)?);
    }

    let stop = CancellationToken::new();
    tokio::spawn(kv_service::signals::cancel_on_signal(stop.clone()));
    outln!(
        "starting a controller and {} workers (logs in {})...",
        args.workers,
        logs.display()
    );
    tokio::select! {
        ready = wait_ready(&controller_url, &mut nodes, usize::from(args.workers)) => {
            if let Err(e) = ready {
                shutdown(&mut nodes).await;
                return Err(e);
            }
        }
        () = stop.cancelled() => {
            shutdown(&mut nodes).await;
            return Ok(());
        }
    }
    print_table(&nodes);
    let (w1, _) = worker_ports(args.base_port, 1);
    let (w2, _) = worker_ports(args.base_port, 2);
    let c = controller_port;
    outln!(
        "\nReady. Try:\n  curl localhost:{c}/nodes\n  curl \"localhost:{c}/mapping?key=user123\"\n  curl -X PUT localhost:{w1}/kv -H 'Content-Type: application/json' -d '{{\"key\":\"user123\",\"value\":\"hello-k8s\"}}'\n  curl \"localhost:{w2}/kv?key=user123\"\n  kill -9 <pid of a worker>   # the local \"scale to 0\"\nCtrl-C stops everything."
    );
    // Report nodes that exit (a `kill -9` in the demo) until told to stop.
    let mut alive: Vec<bool> = vec![true; nodes.len()];
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                for (node, alive) in nodes.iter_mut().zip(alive.iter_mut()) {
                    if *alive {
                        if let Ok(Some(status)) = node.child.try_wait() {
                            *alive = false;
                            outln!("{} exited: {status}", node.name);
                        }
                    }
                }
            }
        }
    }
    outln!("stopping...");
    shutdown(&mut nodes).await;
    Ok(())
}

fn spawn(
    exe: &PathBuf,
    name: &str,
    flags: &[&str],
    http: u16,
    wire: Option<u16>,
    logs: &std::path::Path,
) -> Result<Node> {
    let log = logs.join(format!("{name}.log"));
    let file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = file.try_clone().context("cannot share the log file")?;
    let mut command = Command::new(exe);
    let child = command
        .arg("node")
        .args(flags)
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Node {
        name: name.to_string(),
        http,
        wire,
        log,
        child,
    })
}

/// Runtime threads per node: the machine's cores shared among the 5 nodes.
fn threads_per_node() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 5).max(1)
}

/// Waits until every worker is UP and holds the topology with all of them.
async fn wait_ready(controller: &str, nodes: &mut [Node], workers: usize) -> Result<()> {
    let http = HttpClient::new();
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        for node in nodes.iter_mut() {
            if let Some(status) = node.child.try_wait()? {
                let tail = std::fs::read_to_string(&node.log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                bail!(
                    "{} exited ({status}) before the cluster was ready; is port {} free?\nlast lines of {}:\n{}",
                    node.name,
                    node.http,
                    node.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        if ready(&http, controller, nodes, workers).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not come up within {READY_WITHIN:?}; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(http: &HttpClient, controller: &str, nodes: &[Node], workers: usize) -> bool {
    let Ok(status) = http.get_json::<Value>(&format!("{controller}/nodes")).await else {
        return false;
    };
    let up = status["nodes"]
        .as_array()
        .map_or(0, |n| n.iter().filter(|n| n["status"] == "UP").count());
    if up != workers {
        return false;
    }
    // Ready as each worker's /readyz says, at the controller's epoch: in the
    // ring with its first sync done. Work started before then races with
    // that sync, which compares every arc while the writes change them
    // (measured: a bulk load started then took up to 40% more CPU).
    for node in nodes.iter().filter(|n| n.wire.is_some()) {
        let url = format!("http://127.0.0.1:{}/readyz", node.http);
        match http.get_json::<Value>(&url).await {
            Ok(ready) if ready["epoch"] == status["epoch"] => {}
            _ => return false,
        }
    }
    true
}

fn print_table(nodes: &[Node]) {
    outln!(
        "\n{:<12} {:>8} {:>6} {:>6}  LOG",
        "NODE",
        "PID",
        "HTTP",
        "WIRE"
    );
    for node in nodes {
        let pid = node.child.id().map_or("-".into(), |p| p.to_string());
        let wire = node.wire.map_or("-".into(), |w| w.to_string());
        outln!(
            "{:<12} {:>8} {:>6} {:>6}  {}",
            node.name,
            pid,
            node.http,
            wire,
            node.log.display()
        );
    }
}

/// Closes every node's stdin (each then drains and exits), waits a little,
/// and kills what is left.
async fn shutdown(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        drop(node.child.stdin.take());
    }
    for node in nodes.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), node.child.wait())
            .await
            .is_err()
        {
            let _ = node.child.kill().await;
        }
    }
}

/// Which node `kvctl node` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Controller,
    Worker,
}

/// A node of a local cluster (`kvctl node controller|worker FLAGS`), its
/// flags parsed as `kv-controller` and `kv-worker` parse theirs.
#[derive(Debug)]
pub enum NodeConfig {
    Controller(kv_controller::Config),
    Worker(kv_worker::Config),
}

impl NodeConfig {
    /// Parses `args` as the flags of a `role` node.
    pub fn parse(role: Role, args: &[String]) -> Result<NodeConfig> {
        use clap::Parser;
        Ok(match role {
            Role::Controller => NodeConfig::Controller(kv_controller::Config::try_parse_from(
                std::iter::once("kv-controller").chain(args.iter().map(String::as_str)),
            )?),
            Role::Worker => NodeConfig::Worker(kv_worker::Config::try_parse_from(
                std::iter::once("kv-worker").chain(args.iter().map(String::as_str)),
            )?),
        })
    }

    /// Its `--threads`, which sizes the runtime it runs on.
    pub fn threads(&self) -> Option<std::num::NonZeroUsize> {
        match self {
            NodeConfig::Controller(config) => config.threads,
            NodeConfig::Worker(config) => config.threads,
        }
    }
}

/// Runs one node of a local cluster until its stdin closes (kvctl ended:
/// stop at once) or a signal arrives (a worker leaves on the first, handing
/// its keys over, and stops on the second).
pub async fn node(config: NodeConfig, sizing: kv_service::runtime::Sizing) -> Result<()> {
    kv_service::init_logging();
    kv_service::runtime::log(sizing);
    let stop = kv_worker::Stop::new();
    // A thread of its own, not tokio's stdin: tokio reads stdin on its
    // blocking pool, and a read that never returns would keep the runtime,
    // and so the process, from ending once the node has stopped.
    std::thread::spawn({
        let stop = stop.clone();
        move || {
            use std::io::Read;
            let mut buf = [0u8; 64];
            while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
            stop.now();
        }
    });
    match config {
        NodeConfig::Controller(config) => {
            let now = stop.stopping().clone();
            tokio::spawn(kv_service::signals::cancel_on_signal(now.clone()));
            let listeners = kv_controller::Listeners::bind(config.listen)?;
            kv_controller::run(config, listeners, now).await?;
        }
        NodeConfig::Worker(config) => {
            let listeners = kv_worker::Listeners::bind(config.listen, config.wire_listen)?;
            tokio::spawn(kv_worker::lifecycle::stop_on_signals(stop.clone()));
            kv_worker::run(config, listeners, stop).await?;
        }
    }
    Ok(())
}
