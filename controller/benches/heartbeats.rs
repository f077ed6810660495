//! Measures the controller as a real process, and prints figures:
//!
//! 1. detection time: from a worker's last heartbeat to DOWN in `/nodes`,
//!    over 20 trials (median and max);
//! 2. heartbeat absorption: 10,000 registered workers at 5 Hz (50,000
//!    heartbeats/s) for 10 s, with the controller's CPU use read from
//!    /proc — and no worker may turn SUSPECT or DOWN meanwhile.
//!
//! Run: `cargo bench -p kv-controller --bench heartbeats`
//! (`-- --workers N --rate HZ --seconds S` to change the load).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kv_wire::heartbeat::{Datagram, Heartbeat};
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
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
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let workers = arg("--workers", 10_000);
    let rate = arg("--rate", 5);
    let seconds = arg("--seconds", 10);
    let trials = arg("--trials", 20);

    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let controller = Process(
        Command::new(env!("CARGO_BIN_EXE_kv-controller"))
            .args(["--listen", &addr.to_string(), "--grace", "0s"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let base = format!("http://{addr}");
    let started = Instant::now();
    while call_ok(&client, &format!("{base}/healthz")).await.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "controller did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. Detection time.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut detections = Vec::new();
    for trial in 0..trials {
        let id = format!("probe{trial}");
        let body = format!(r#"{{"id":"{id}","host":"127.0.0.1","port":1,"wire_port":1}}"#);
        let (_, reg) = call(&client, "POST", &format!("{base}/register"), body).await;
        let hb = Heartbeat {
            member: reg["member"].as_u64().unwrap() as u32,
            generation: reg["generation"].as_u64().unwrap(),
            seq: 0,
            epoch_seen: 0,
        };
        for seq in 0..5 {
            socket
                .send_to(&Heartbeat { seq, ..hb }.encode(), addr)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        socket
            .send_to(&Heartbeat { seq: 5, ..hb }.encode(), addr)
            .unwrap();
        let last = Instant::now();
        loop {
            let (_, nodes) = call(&client, "GET", &format!("{base}/nodes"), String::new()).await;
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
    detections.sort();
    if !detections.is_empty() {
        println!(
            "detection: last heartbeat -> DOWN in /nodes over {} trials: median {:.0} ms, max {:.0} ms (down-after 1000 ms)",
            detections.len(),
            detections[detections.len() / 2].as_secs_f64() * 1e3,
            detections[detections.len() - 1].as_secs_f64() * 1e3
        );
    }

    // 2. Absorption: register the fleet, then send its heartbeats.
    let mut fleet = Vec::with_capacity(workers as usize);
    for i in 0..workers {
        let body = format!(r#"{{"id":"load{i}","host":"127.0.0.1","port":1,"wire_port":1}}"#);
        let (_, reg) = call(&client, "POST", &format!("{base}/register"), body).await;
        fleet.push(Heartbeat {
            member: reg["member"].as_u64().unwrap() as u32,
            generation: reg["generation"].as_u64().unwrap(),
            seq: 0,
            epoch_seen: u64::MAX,
        });
    }
    let sender = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let per_sec = fleet.len() as u64 * rate;
        let start = Instant::now();
        let (mut sent, mut acks) = (0u64, 0u64);
        let mut buf = [0u8; 64];
        let total = per_sec * seconds;
        while sent < total {
            // Pace: send what is due by now, in fleet order, round robin.
            let due = (start.elapsed().as_secs_f64() * per_sec as f64) as u64;
            while sent < due.min(total) {
                let slot = (sent % fleet.len() as u64) as usize;
                let hb = &mut fleet[slot];
                hb.seq += 1;
                let _ = socket.send_to(&hb.encode(), addr);
                sent += 1;
            }
            while socket.recv_from(&mut buf).is_ok() {
                acks += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let drain = Instant::now();
        while drain.elapsed() < Duration::from_millis(300) {
            if socket.recv_from(&mut buf).is_ok() {
                acks += 1;
            }
        }
        (sent, acks, start.elapsed())
    });
    let cpu_before = cpu_seconds(controller.0.id());
    let wall = Instant::now();
    let (sent, acks, took) = tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    let cpu = cpu_seconds(controller.0.id()) - cpu_before;
    let wall = wall.elapsed().as_secs_f64();
    let (_, nodes) = call(&client, "GET", &format!("{base}/nodes"), String::new()).await;
    let unhealthy = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["id"].as_str().unwrap().starts_with("load") && n["status"] != "UP")
        .count();
    println!(
        "absorption: {workers} workers x {rate} Hz for {:.1} s: sent {sent} ({:.0}/s), acked {acks} ({:.1}%), controller CPU {:.2} s = {:.0}% of one core; workers not UP at the end: {unhealthy}",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        acks as f64 * 100.0 / sent as f64,
        cpu,
        cpu * 100.0 / wall
    );
    drop(controller);
}

async fn call_ok(client: &HttpClient, url: &str) -> Option<()> {
    let request = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .ok()?;
    client.request(request).await.ok().map(|_| ())
}
