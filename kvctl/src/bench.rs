//! `kvctl bench`: a closed-loop benchmark. Each of N connections issues one
//! request, waits for its answer, and issues the next; latencies go into an
//! HDR histogram. The same loop drives kv over the wire protocol, kv over
//! HTTP, or Redis (SET, then WAIT for replicas: the W=2 analogue), so the
//! figures compare like with like. Over the wire protocol, each of the N
//! callers has a client of its own (a connection to each worker), or with
//! `--shared-client` all share one, as the tasks of an application do.

use crate::http1::Http1;
use crate::out::outln;
use crate::resp::{Pipelined, Redis, Reply, Resp};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use kv_client::{Client, Connection, Credentials};
use kv_wire::Member;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// kv over the wire protocol, each request sent to the key's primary.
    Wire,
    /// kv over HTTP (`PUT/GET /kv`), sent to the key's primary over a
    /// keep-alive HTTP/1.1 connection per worker.
    Http,
    /// Redis: SET (then WAIT for replicas), or GET.
    Redis,
    /// kv wire connections: each request opens one to the key's primary
    /// (the handshake, where a cluster secret's proofs are made and
    /// checked) and closes it.
    Handshake,
}

/// `kvctl bench` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to benchmark.
    #[arg(long, value_enum, default_value = "wire")]
    protocol: Protocol,
    /// Concurrent connections (each waits for its answer before the next request).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests instead.
    #[arg(long)]
    count: Option<u64>,
    /// Percent of requests that are reads (the rest are writes).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    get_percent: u8,
    /// Bytes per value written.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Distinct keys, chosen uniformly at random.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Key prefix.
    #[arg(long, default_value = "bench:")]
    prefix: String,
    /// Redis address (with --protocol redis); with several, separated by
    /// commas, the connections take them in turn.
    #[arg(long, default_value = "127.0.0.1:6379", value_delimiter = ',')]
    redis: Vec<String>,
    /// Replicas each Redis SET waits for with WAIT (0: no WAIT).
    #[arg(long, default_value_t = 1)]
    redis_wait: u32,
    /// WAIT's timeout, in milliseconds.
    #[arg(long, default_value_t = 100)]
    redis_wait_timeout_ms: u64,
    /// The callers share one client, as the tasks of an application do.
    /// With --protocol wire it keeps one connection to each worker; with
    /// --protocol redis one to each --redis address (only without WAIT,
    /// which blocks the connection it is sent on). The requests in flight
    /// at once share its writes (pipelining). Without it, each caller has a
    /// client, and so connections, of its own.
    #[arg(long)]
    shared_client: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// One connection's way of issuing requests.
enum Conn {
    Wire(Arc<Client>),
    Http(Arc<Client>, Http1),
    Redis(Redis),
    Handshake(Arc<Client>, Credentials),
}

impl Conn {
    async fn put(&mut self, key: &str, value: &Bytes, args: &Args) -> Result<()> {
        match self {
            Conn::Handshake(routes, credentials) => handshake(routes, credentials, key).await?,
            Conn::Wire(client) => {
                client.put(key, value.clone()).await?;
            }
            Conn::Http(routes, http) => {
                let addr = primary(routes, key)?.http_addr();
                let body =
                    json!({ "key": key, "value": String::from_utf8_lossy(value) }).to_string();
                let (status, reply) = http.request(&addr, "PUT", "/kv", body.as_bytes()).await?;
                if status != 200 {
                    bail!("{status}: {}", String::from_utf8_lossy(&reply));
                }
            }
            Conn::Redis(redis) => {
                expect_ok(redis.command(&[b"SET", key.as_bytes(), value]).await?)?;
                if args.redis_wait > 0 {
                    let (n, timeout) = (
                        args.redis_wait.to_string(),
                        args.redis_wait_timeout_ms.to_string(),
                    );
                    match redis
                        .command(&[b"WAIT", n.as_bytes(), timeout.as_bytes()])
                        .await?
                    {
                        Reply::Integer(acked) if acked >= i64::from(args.redis_wait) => {}
                        other => {
                            bail!("WAIT: {other:?}: the write did not reach a replica in time")
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn get(&mut self, key: &str) -> Result<()> {
        match self {
            Conn::Handshake(routes, credentials) => handshake(routes, credentials, key).await?,
            Conn::Wire(client) => {
                client.get(key).await?;
            }
            Conn::Http(routes, http) => {
                let addr = primary(routes, key)?.http_addr();
                let query = serde_urlencoded::to_string([("key", key), ("consistency", "quorum")])?;
                let path = format!("/kv?{query}");
                let (status, reply) = http.request(&addr, "GET", &path, b"").await?;
                if status != 200 && status != 404 {
                    bail!("{status}: {}", String::from_utf8_lossy(&reply));
                }
            }
            Conn::Redis(redis) => {
                if let Reply::Error(e) = redis.command(&[b"GET", key.as_bytes()]).await? {
                    bail!("GET: {e}");
                }
            }
        }
        Ok(())
    }
}

/// Opens a wire connection to `key`'s primary, and closes it.
async fn handshake(routes: &Client, credentials: &Credentials, key: &str) -> Result<()> {
    let addr = primary(routes, key)?.wire_addr();
    let conn = Connection::connect(&addr, credentials, HANDSHAKE_TIMEOUT).await?;
    conn.close();
    Ok(())
}

/// How long one handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// `key`'s primary.
fn primary(routes: &Client, key: &str) -> Result<Member> {
    routes.primary(key).context("no live worker")
}

fn expect_ok(reply: Reply) -> Result<()> {
    match reply {
        Reply::Status(_) => Ok(()),
        other => bail!("SET: {other:?}"),
    }
}

/// What one connection measured.
struct Measured {
    latencies: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(controller: &str, credentials: Credentials, args: Args) -> Result<()> {
    let args = Arc::new(args);
    let routes = match args.protocol {
        Protocol::Http | Protocol::Handshake => Some(Arc::new(
            Client::connect(controller, credentials.clone())
                .await
                .with_context(|| format!("cannot reach the cluster at {controller}"))?,
        )),
        _ => None,
    };
    let connect = || async {
        Client::connect(controller, credentials.clone())
            .await
            .map(Arc::new)
            .with_context(|| format!("cannot reach the cluster at {controller}"))
    };
    let (mut shared, mut shared_redis) = (None, Vec::new());
    match (args.protocol, args.shared_client) {
        (_, false) => {}
        (Protocol::Wire, true) => shared = Some(connect().await?),
        (Protocol::Redis, true) if args.redis_wait == 0 => {
            for addr in &args.redis {
                shared_redis.push(Arc::new(
                    Pipelined::connect(addr)
                        .await
                        .with_context(|| format!("cannot reach redis at {addr}"))?,
                ));
            }
        }
        (Protocol::Redis, true) => bail!(
            "--shared-client with --protocol redis needs --redis-wait 0: WAIT blocks the connection it is sent on"
        ),
        (_, true) => bail!("--shared-client is for --protocol wire or redis"),
    }
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections.max(1) {
        conns.push(match args.protocol {
            Protocol::Wire => Conn::Wire(match &shared {
                Some(client) => client.clone(),
                None => connect().await?,
            }),
            Protocol::Http => Conn::Http(routes.clone().context("no routes")?, Http1::default()),
            Protocol::Handshake => {
                Conn::Handshake(routes.clone().context("no routes")?, credentials.clone())
            }
            Protocol::Redis => Conn::Redis(match shared_redis.get(i % args.redis.len()) {
                Some(pipelined) => Redis::Shared(pipelined.clone()),
                None => {
                    let addr = &args.redis[i % args.redis.len()];
                    Redis::Own(
                        Resp::connect(addr)
                            .await
                            .with_context(|| format!("cannot reach redis at {addr}"))?,
                    )
                }
            }),
        });
    }
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + args.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (args, issued) = (args.clone(), issued.clone());
            tokio::spawn(async move {
                let value = Bytes::from(vec![b'v'; args.value_size]);
                let mut m = Measured {
                    latencies: Histogram::new(3).expect("3 significant figures is valid"),
                    errors: 0,
                    first_error: None,
                };
                loop {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if args.count.map_or(Instant::now() >= deadline, |c| n >= c) {
                        break;
                    }
                    let key = format!("{}{}", args.prefix, fastrand::u64(0..args.keys.max(1)));
                    let read = fastrand::u8(0..100) < args.get_percent;
                    let began = Instant::now();
                    let result = if read {
                        conn.get(&key).await
                    } else {
                        conn.put(&key, &value, &args).await
                    };
                    match result {
                        Ok(()) => {
                            let _ = m.latencies.record(began.elapsed().as_micros() as u64);
                        }
                        Err(e) => {
                            m.errors += 1;
                            m.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                m
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let (mut errors, mut first_error) = (0, None);
    for task in tasks {
        let m = task.await.context("a benchmark connection panicked")?;
        all.add(&m.latencies).context("cannot merge latencies")?;
        errors += m.errors;
        first_error = first_error.or(m.first_error);
    }
    let secs = started.elapsed().as_secs_f64();
    let ops = all.len();
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let protocol = format!("{:?}", args.protocol).to_lowercase();
    if args.json {
        outln!(
            "{}",
            json!({
                "protocol": protocol, "connections": args.connections, "shared_client": args.shared_client, "get_percent": args.get_percent,
                "value_size": args.value_size, "seconds": secs, "ops": ops, "ops_per_sec": ops as f64 / secs,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "errors": errors,
            })
        );
    } else {
        outln!(
            "{protocol}: {} connections{}, {}% reads, {} B values: {ops} ops in {secs:.1} s = {:.0} ops/s; latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {errors} errors",
            args.connections,
            if args.shared_client { " (one shared client)" } else { "" },
            args.get_percent,
            args.value_size,
            ops as f64 / secs,
            ms(0.5),
            ms(0.99),
            ms(0.999)
        );
    }
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}
