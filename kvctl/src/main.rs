//! kvctl: the kv command line.

mod bench;
mod http1;
mod load;
mod local;
mod out;
mod resp;
mod status;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use kv_client::{Client, Credentials};
use kv_wire::ClusterSecret;
use out::outln;
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kvctl",
    version,
    about = "The kv command line: read and write keys, bulk load, benchmark, and run a local cluster",
    after_help = "Start a cluster on this machine with `kvctl local`, then try `kvctl put user123 hello` and `kvctl mapping user123`."
)]
struct Cli {
    /// The controller's URL.
    #[arg(
        long,
        env = "KV_CONTROLLER",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    controller: String,
    /// The cluster's name, checked by every worker in the wire hello.
    #[arg(long, env = "KV_CLUSTER", default_value = "kv", global = true)]
    cluster: String,
    /// A file holding the cluster secret, if the cluster has one: wire
    /// connections prove it (`kvctl local` gives it to every node).
    #[arg(
        long,
        env = "KV_CLUSTER_SECRET_FILE",
        value_name = "FILE",
        global = true
    )]
    cluster_secret_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The cluster the command talks to.
struct Target {
    controller: String,
    cluster: String,
    secret_file: Option<PathBuf>,
}

impl Target {
    /// The secret, read from its file, if one was named.
    fn secret(&self) -> Result<Option<ClusterSecret>> {
        self.secret_file
            .as_deref()
            .map(ClusterSecret::read)
            .transpose()
            .map_err(Into::into)
    }

    /// What kvctl proves when it connects to workers, as `from`.
    fn credentials(&self, from: &str) -> Result<Credentials> {
        Ok(Credentials::new(&self.cluster, from).with_secret(self.secret()?))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a controller and 4 workers on this machine, each its own process,
    /// on the demo ports; Ctrl-C stops them all.
    ///
    /// Each node runs on its share of the cores (`--threads`: cores / 5, at
    /// least 1) unless KV_THREADS says otherwise.
    Local(local::Args),
    /// List the workers the controller knows.
    Nodes {
        /// Print the controller's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The cluster at a glance, like `nodetool status`: every worker's
    /// status, keys, bytes, share of the ring, epoch, readiness, ops/s and
    /// rebalance, and the latest events (from the controller's `/cluster`).
    Status {
        /// Redraw every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Print the controller's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which workers own a key: primary first.
    Mapping {
        /// The key.
        key: String,
        /// Print the controller's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a key (acknowledged at two copies).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read a key from a quorum of its owners; prints the value.
    Get {
        /// The key.
        key: String,
        /// Print JSON with the version.
        #[arg(long)]
        json: bool,
    },
    /// Delete a key (a tombstone, acknowledged at two copies).
    Del {
        /// The key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bulk-load keys from a file or generated ones, batched and pipelined.
    Load(load::Args),
    /// Closed-loop benchmark over the wire protocol, HTTP, or Redis (or of wire handshakes).
    Bench(bench::Args),
    /// Runs one node of `kvctl local` (internal).
    #[command(hide = true)]
    Node {
        /// Which node.
        role: local::Role,
        /// Its flags (those of `kv-controller` or `kv-worker`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    kv_alloc::configure();
    let cli = Cli::parse();
    // A node's runtime is sized by its own `--threads`, so its flags are
    // read before the runtime is built (and again to run it).
    let threads = match &cli.command {
        Command::Node { role, args } => local::NodeConfig::parse(*role, args)?.threads(),
        _ => None,
    };
    let (runtime, sizing) =
        kv_service::runtime::for_flag(threads).context("cannot start the async runtime")?;
    runtime.block_on(run(cli, sizing))
}

async fn run(cli: Cli, sizing: kv_service::runtime::Sizing) -> Result<()> {
    let target = Target {
        controller: cli.controller,
        cluster: cli.cluster,
        secret_file: cli.cluster_secret_file,
    };
    match cli.command {
        Command::Local(args) => {
            // Checked here, so a bad secret stops kvctl before any node starts.
            target.secret()?;
            local::run(args, &target.cluster, target.secret_file.as_deref()).await
        }
        Command::Node { role, args } => {
            local::node(local::NodeConfig::parse(role, &args)?, sizing).await
        }
        Command::Load(args) => load::run(&connect(&target).await?, args).await,
        Command::Bench(args) => {
            bench::run(&target.controller, target.credentials("kvctl-bench")?, args).await
        }
        Command::Nodes { json } => {
            let nodes = connect(&target).await?.nodes().await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                outln!("epoch {}", nodes.epoch);
                outln!(
                    "{:<16} {:<8} {:<16} {:>6} {:>6} {:>5} {:>10}",
                    "ID",
                    "STATUS",
                    "HOST",
                    "HTTP",
                    "WIRE",
                    "GEN",
                    "SILENT_MS"
                );
                for n in &nodes.nodes {
                    outln!(
                        "{:<16} {:<8} {:<16} {:>6} {:>6} {:>5} {:>10}",
                        n.id,
                        n.status,
                        n.host,
                        n.port,
                        n.wire_port,
                        n.generation,
                        n.last_heartbeat_ms_ago
                    );
                }
            }
            Ok(())
        }
        Command::Status { watch, json } => status::run(&target.controller, watch, json).await,
        Command::Mapping { key, json } => {
            let mapping = connect(&target).await?.mapping(&key).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&mapping)?);
            } else {
                let name = |n: &kv_client::NodeInfo| format!("{} ({}:{})", n.id, n.host, n.port);
                let replicas: Vec<String> = mapping.replicas.iter().map(name).collect();
                outln!(
                    "{key}: primary {}, replicas {} (epoch {})",
                    name(&mapping.primary),
                    replicas.join(", "),
                    mapping.epoch
                );
            }
            Ok(())
        }
        Command::Put { key, value, json } => {
            let version = connect(&target)
                .await?
                .put(&key, Bytes::from(value))
                .await?;
            print_written(&key, version, json, "stored");
            Ok(())
        }
        Command::Del { key, json } => {
            let version = connect(&target).await?.delete(&key).await?;
            print_written(&key, version, json, "deleted");
            Ok(())
        }
        Command::Get { key, json } => match connect(&target).await?.get(&key).await? {
            Some((value, version)) => {
                if json {
                    let text = String::from_utf8_lossy(&value);
                    outln!(
                        "{}",
                        json!({ "key": key, "value": text, "version": version.to_string() })
                    );
                } else {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(&value)?;
                    out.write_all(b"\n")?;
                }
                Ok(())
            }
            None => bail!("key not found: {key}"),
        },
    }
}

fn print_written(key: &str, version: kv_wire::Version, json: bool, what: &str) {
    if json {
        outln!(
            "{}",
            json!({ "key": key, "version": version.to_string(), what: true })
        );
    } else {
        outln!("{what} {key} at version {version}");
    }
}

async fn connect(target: &Target) -> Result<Client> {
    let controller = &target.controller;
    Client::connect(controller, target.credentials("kvctl")?)
        .await
        .with_context(|| {
            format!("cannot reach the cluster at {controller} (is it running? try `kvctl local`)")
        })
}
