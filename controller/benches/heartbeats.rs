//! Measures the controller as a real process, and prints figures:
//!
//! 1. detection time: from a worker's last heartbeat to DOWN in `/nodes`,
//!    over 20 trials (median and max);
//! 2. heartbeat absorption: 10,000 registered workers at 5 Hz (50,000
//!    heartbeats/s) for 10 s, with the controller's CPU use read from
//!    /proc — and no worker may turn SUSPECT or DOWN meanwhile; run twice,
//!    side by side: without a cluster secret, then with one (every
//!    heartbeat and ack sealed with a MAC), with the ratio of CPU used;
//! 3. the dashboard's `/cluster` with 1,000 registered workers heartbeating:
//!    answer times and the controller's CPU while 10 viewers refresh every
//!    second. The fake workers' wire ports refuse connections, so this is
//!    the controller's side: 1,000 calls gathered and the answer rendered.
//!
//! Run: `cargo bench -p kv-controller --bench heartbeats`
//! (`-- --workers N --rate HZ --seconds S --viewers V --shown W` to change
//! the load).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kv_wire::heartbeat::{Heartbeat, MAX_SEALED_LEN};
use kv_wire::ClusterSecret;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(client: &HttpClient, method: &str, url: &str, body: String) -> (u16, Value) {
    call_proving(client, method, url, body, None).await
}

/// A request whose body is proved with `secret`, if given.
async fn call_proving(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: String,
    secret: Option<&ClusterSecret>,
) -> (u16, Value) {
    let mut request = hyper::Request::builder().method(method).uri(url);
    if let Some(secret) = secret {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let proof = secret.prove_request(kv_wire::auth::Signed::Register, body.as_bytes(), now);
        request = request.header("authorization", proof.header_value());
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    kv_testkit::cpu_time(&pid.to_string()).as_secs_f64()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A controller process on a free port, ready.
struct Controller {
    process: Process,
    addr: SocketAddr,
    base: String,
}

async fn start_controller(client: &HttpClient, secret_file: Option<&Path>) -> Controller {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kv-controller"));
    command.args(["--listen", &addr.to_string(), "--grace", "0s"]);
    if let Some(file) = secret_file {
        command.arg("--cluster-secret-file").arg(file);
    }
    let process = Process(
        command
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://{addr}");
    let started = Instant::now();
    while call_ok(client, &format!("{base}/healthz")).await.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "controller did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Controller {
        process,
        addr,
        base,
    }
}

/// Registers worker `id`; its first heartbeat, to count up from.
async fn register(
    client: &HttpClient,
    c: &Controller,
    id: &str,
    secret: Option<&ClusterSecret>,
) -> Heartbeat {
    let body = format!(r#"{{"id":"{id}","host":"127.0.0.1","port":1,"wire_port":1}}"#);
    let (status, reg) = call_proving(
        client,
        "POST",
        &format!("{}/register", c.base),
        body,
        secret,
    )
    .await;
    assert_eq!(status, 200, "{reg}");
    Heartbeat {
        member: reg["member"].as_u64().unwrap() as u32,
        generation: reg["generation"].as_u64().unwrap(),
        seq: 0,
        epoch_seen: u64::MAX,
    }
}

#[tokio::main]
async fn main() {
    let workers = arg("--workers", 10_000);
    let rate = arg("--rate", 5);
    let seconds = arg("--seconds", 10);
    let trials = arg("--trials", 20);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // 1. Detection time.
    let c = start_controller(&client, None).await;
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut detections = Vec::new();
    for trial in 0..trials {
        let id = format!("probe{trial}");
        let hb = register(&client, &c, &id, None).await;
        for seq in 1..=5 {
            socket
                .send_to(&Heartbeat { seq, ..hb }.seal(None), c.addr)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        socket
            .send_to(&Heartbeat { seq: 6, ..hb }.seal(None), c.addr)
            .unwrap();
        let last = Instant::now();
        loop {
            let (_, nodes) =
                call(&client, "GET", &format!("{}/nodes", c.base), String::new()).await;
            let down = nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == id.as_str() && n["status"] == "DOWN");
            if down {
                detections.push(last.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    drop(c);
    detections.sort();
    if !detections.is_empty() {
        println!(
            "detection: last heartbeat -> DOWN in /nodes over {} trials: median {:.0} ms, max {:.0} ms (down-after 1000 ms)",
            detections.len(),
            detections[detections.len() / 2].as_secs_f64() * 1e3,
            detections[detections.len() - 1].as_secs_f64() * 1e3
        );
    }

    // 2. Absorption, without and with a cluster secret, side by side.
    let dir = std::env::temp_dir().join(format!("kv-bench-heartbeats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, "bench-secret-0123456789abcdef").unwrap();
    let secret = ClusterSecret::read(&file).unwrap();
    let load = Load {
        workers,
        rate,
        seconds,
    };
    let plain = absorb(&client, &load, None).await;
    let sealed = absorb(&client, &load, Some((&file, &secret))).await;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "absorption with the secret vs without: controller CPU {:.2}x ({:.0}% vs {:.0}% of one core), acked {:.1}% vs {:.1}%",
        sealed.cpu_share / plain.cpu_share,
        sealed.cpu_share * 100.0,
        plain.cpu_share * 100.0,
        sealed.acked_share * 100.0,
        plain.acked_share * 100.0,
    );

    // 3. The dashboard's /cluster.
    let viewers = arg("--viewers", 10);
    let shown = arg("--shown", 1_000);
    viewed(&client, shown, viewers, seconds).await;
}

struct Load {
    workers: u64,
    rate: u64,
    seconds: u64,
}

struct Absorbed {
    /// Controller CPU over wall time.
    cpu_share: f64,
    /// Acks over heartbeats sent.
    acked_share: f64,
}

/// Registers the fleet with a fresh controller, then sends its heartbeats
/// (sealed, with a secret) at the rate for the time; prints and returns
/// what the controller used.
async fn absorb(
    client: &HttpClient,
    load: &Load,
    secret: Option<(&Path, &ClusterSecret)>,
) -> Absorbed {
    let c = start_controller(client, secret.map(|(file, _)| file)).await;
    let secret = secret.map(|(_, s)| s.clone());
    let mut fleet = Vec::with_capacity(load.workers as usize);
    for i in 0..load.workers {
        fleet.push(register(client, &c, &format!("load{i}"), secret.as_ref()).await);
    }
    let (rate, seconds, addr) = (load.rate, load.seconds, c.addr);
    let sender_secret = secret.clone();
    // The sender says when the first second (a full round of heartbeats)
    // has passed and when it has sent everything: status changes between
    // the two are the ones steady load caused.
    let (marks, marked) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        let secret = sender_secret.as_ref();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let per_sec = fleet.len() as u64 * rate;
        let start = Instant::now();
        let (mut sent, mut acks) = (0u64, 0u64);
        let mut buf = [0u8; MAX_SEALED_LEN + 1];
        let total = per_sec * seconds;
        let mut warm = false;
        while sent < total {
            if !warm && start.elapsed() >= Duration::from_secs(1) {
                warm = true;
                let _ = marks.send(());
            }
            // Pace: send what is due by now, in fleet order, round robin.
            let due = (start.elapsed().as_secs_f64() * per_sec as f64) as u64;
            while sent < due.min(total) {
                let slot = (sent % fleet.len() as u64) as usize;
                let hb = &mut fleet[slot];
                hb.seq += 1;
                let _ = socket.send_to(&hb.seal(secret), addr);
                sent += 1;
            }
            while socket.recv_from(&mut buf).is_ok() {
                acks += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let _ = marks.send(());
        let drain = Instant::now();
        while drain.elapsed() < Duration::from_millis(300) {
            if socket.recv_from(&mut buf).is_ok() {
                acks += 1;
            }
        }
        (sent, acks, start.elapsed())
    });
    let pid = c.process.0.id();
    let cpu_before = cpu_seconds(pid);
    let wall = Instant::now();
    let marked = std::sync::Arc::new(std::sync::Mutex::new(marked));
    let next_mark = || {
        let marked = marked.clone();
        tokio::task::spawn_blocking(move || marked.lock().unwrap().recv().is_ok())
    };
    let mut changes = 0;
    if next_mark().await.unwrap() {
        changes = worsened(client, &c).await;
    }
    if next_mark().await.unwrap() {
        changes = worsened(client, &c).await - changes;
    }
    let (sent, acks, took) = tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    let cpu = cpu_seconds(pid) - cpu_before;
    let wall = wall.elapsed().as_secs_f64();
    let (workers, rate) = (load.workers, load.rate);
    println!(
        "absorption{}: {workers} workers x {rate} Hz for {:.1} s: sent {sent} ({:.0}/s), acked {acks} ({:.1}%), controller CPU {:.2} s = {:.0}% of one core; workers turned SUSPECT or DOWN under steady load: {changes}",
        if secret.is_some() { " with a cluster secret" } else { "" },
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        acks as f64 * 100.0 / sent as f64,
        cpu,
        cpu * 100.0 / wall
    );
    Absorbed {
        cpu_share: cpu / wall,
        acked_share: acks as f64 / sent as f64,
    }
}

/// Status changes for the worse so far (to SUSPECT or DOWN), from /metrics.
async fn worsened(client: &HttpClient, c: &Controller) -> u64 {
    let request = hyper::Request::get(format!("{}/metrics", c.base))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.starts_with("kv_controller_transitions_total{to=\"SUSPECT\"}")
                || l.starts_with("kv_controller_transitions_total{to=\"DOWN\"}")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn call_ok(client: &HttpClient, url: &str) -> Option<()> {
    let request = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .ok()?;
    client.request(request).await.ok().map(|_| ())
}

/// Part 3: `/cluster` with `workers` fake workers heartbeating at 5 Hz,
/// and `viewers` viewers asking for it every second for `seconds`.
async fn viewed(client: &HttpClient, workers: u64, viewers: u64, seconds: u64) {
    let c = start_controller(client, None).await;
    let mut fleet = Vec::new();
    for i in 0..workers {
        fleet.push(register(client, &c, &format!("shown{i}"), None).await);
    }
    let addr = c.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beating = stop.clone();
    let sender = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        while !beating.load(std::sync::atomic::Ordering::Relaxed) {
            for hb in &mut fleet {
                hb.seq += 1;
                let _ = socket.send_to(&hb.seal(None), addr);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let url = format!("{}/cluster", c.base);
    // One look first: the ring of 1,000 workers is built on first use.
    let (_, first) = call(client, "GET", &url, String::new()).await;
    let pid = c.process.0.id();
    let cpu_before = cpu_seconds(pid);
    let wall = Instant::now();
    let views = (0..viewers).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let mut times = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for _ in 0..seconds {
                tick.tick().await;
                let started = Instant::now();
                let (status, body) = call(&client, "GET", &url, String::new()).await;
                assert_eq!(status, 200, "{body}");
                times.push(started.elapsed());
            }
            times
        })
    });
    let mut times: Vec<Duration> = Vec::new();
    for view in futures::future::join_all(views).await {
        times.extend(view.unwrap());
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let wall = wall.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    times.sort();
    let up = first["counts"]["UP"].as_u64().unwrap_or(0);
    println!(
        "/cluster with {workers} workers ({up} UP, gathered in {} ms): {viewers} viewers every second for {seconds} s: answer median {:.1} ms, p99 {:.1} ms, max {:.1} ms; controller CPU {cpu:.2} s = {:.0}% of one core (heartbeats included)",
        first["took_ms"],
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() * 99 / 100].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        cpu * 100.0 / wall
    );
}
