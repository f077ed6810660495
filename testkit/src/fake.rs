//! Test harness: a controller on ephemeral ports, an HTTP helper, and fake
//! workers that register, send heartbeats and take topology pushes.

use futures::{SinkExt, StreamExt};
use kv_controller::{run, Config, Listeners};
use kv_wire::heartbeat::{Heartbeat, HeartbeatAck};
use kv_wire::message::Challenge;
use kv_wire::{ClientFrame, ClusterSecret, FrameCodec, Request, Response, ServerFrame, Topology};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub use crate::{eventually, PATIENCE};

pub struct Controller {
    pub addr: SocketAddr,
    /// The cluster secret it runs with, which its fake workers then use.
    pub secret: Option<ClusterSecret>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Controller {
    pub async fn start(grace: Duration) -> Controller {
        Controller::start_with(grace, None).await
    }

    pub async fn start_with(grace: Duration, secret: Option<ClusterSecret>) -> Controller {
        Controller::start_configured(|c| {
            c.grace = grace;
            c.cluster_secret = secret;
        })
        .await
    }

    /// A controller whose configuration `adjust` changes first.
    pub async fn start_configured(adjust: impl FnOnce(&mut Config)) -> Controller {
        let listeners = Listeners::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listeners.http.local_addr().unwrap();
        let mut config = Config::with_listen(addr);
        adjust(&mut config);
        let secret = config.cluster_secret.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { run(config, listeners, shutdown).await.unwrap() }
        });
        Controller {
            addr,
            secret,
            shutdown,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http("GET", &self.url(path), "").await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    /// The status `/nodes` shows for `id`.
    pub async fn status(&self, id: &str) -> Option<String> {
        let (_, nodes) = self.get("/nodes").await;
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .map(|n| n["status"].as_str().unwrap().to_string())
    }
}

pub use crate::{http, http_authorized, http_raw};

/// A fake worker: registers, sends heartbeats while `beating`, records
/// the topologies pushed to its wire port, and answers nothing else a
/// real worker asks of it (a peer that has hung).
pub struct FakeWorker {
    pub id: String,
    pub wire_port: u16,
    pub member: u32,
    pub generation: Arc<AtomicU64>,
    pub beating: Arc<AtomicBool>,
    /// The epoch reported in heartbeats (what the worker claims to hold).
    pub report_epoch: Arc<AtomicU64>,
    pub topologies: watch::Receiver<Topology>,
    pub pushes: Arc<AtomicU64>,
    pub acks: Arc<Mutex<Vec<HeartbeatAck>>>,
    pub controller: Arc<Mutex<SocketAddr>>,
    /// Every sealed heartbeat sent, for replaying.
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
    pub stop: CancellationToken,
}

impl FakeWorker {
    pub async fn start(controller: &Controller, id: &str) -> FakeWorker {
        let wire = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let wire_port = wire.local_addr().unwrap().port();
        let (tx, topologies) = watch::channel(Topology::default());
        let pushes = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let secret = controller.secret.clone();
        tokio::spawn(serve_wire(
            wire,
            id.to_string(),
            tx,
            pushes.clone(),
            secret.clone(),
            stop.clone(),
        ));
        let reply =
            register_with(controller.addr, id, wire_port, None, None, secret.as_ref()).await;
        assert_eq!(reply.0, 200, "{}", reply.1);
        let reply = reply.1;
        let worker = FakeWorker {
            id: id.to_string(),
            wire_port,
            member: reply["member"].as_u64().unwrap() as u32,
            generation: Arc::new(AtomicU64::new(reply["generation"].as_u64().unwrap())),
            beating: Arc::new(AtomicBool::new(true)),
            report_epoch: Arc::new(AtomicU64::new(u64::MAX)),
            topologies,
            pushes,
            acks: Arc::default(),
            controller: Arc::new(Mutex::new(controller.addr)),
            sent: Arc::default(),
            stop,
        };
        tokio::spawn(beat(worker.beat_state(), secret));
        worker
    }

    /// Waits for a pushed topology satisfying `pred`.
    pub async fn topology_where(
        &mut self,
        what: &str,
        pred: impl Fn(&Topology) -> bool,
    ) -> Topology {
        let wait = self.topologies.wait_for(|t| pred(t));
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("{}: timed out waiting for {what}", self.id))
            .unwrap()
            .clone()
    }
}

pub async fn register(
    controller: SocketAddr,
    id: &str,
    wire_port: u16,
    epoch: Option<u64>,
    generation: Option<u64>,
) -> Value {
    let (status, reply) = register_with(controller, id, wire_port, epoch, generation, None).await;
    assert_eq!(status, 200, "{reply}");
    reply
}

/// A registration, proving `secret` if given: the status and the reply.
pub async fn register_with(
    controller: SocketAddr,
    id: &str,
    wire_port: u16,
    epoch: Option<u64>,
    generation: Option<u64>,
    secret: Option<&ClusterSecret>,
) -> (u16, Value) {
    let body = serde_json::json!({"id": id, "host": "127.0.0.1", "port": 1, "wire_port": wire_port, "epoch": epoch, "generation": generation}).to_string();
    let proof = secret.map(|s| {
        s.prove_request(kv_wire::auth::Signed::Register, body.as_bytes(), now_ms())
            .header_value()
    });
    let url = format!("http://{controller}/register");
    let (status, bytes) = http_authorized("POST", &url, body.into(), proof.as_deref()).await;
    (status, serde_json::from_slice(&bytes).unwrap())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What the heartbeat task of a fake worker shares with the test.
struct BeatState {
    member: u32,
    generation: Arc<AtomicU64>,
    beating: Arc<AtomicBool>,
    report_epoch: Arc<AtomicU64>,
    topologies: watch::Receiver<Topology>,
    acks: Arc<Mutex<Vec<HeartbeatAck>>>,
    controller: Arc<Mutex<SocketAddr>>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: CancellationToken,
}

impl FakeWorker {
    fn beat_state(&self) -> BeatState {
        BeatState {
            member: self.member,
            generation: self.generation.clone(),
            beating: self.beating.clone(),
            report_epoch: self.report_epoch.clone(),
            topologies: self.topologies.clone(),
            acks: self.acks.clone(),
            controller: self.controller.clone(),
            sent: self.sent.clone(),
            stop: self.stop.clone(),
        }
    }
}

async fn beat(state: BeatState, secret: Option<ClusterSecret>) {
    let BeatState {
        member,
        generation,
        beating,
        report_epoch,
        topologies,
        acks,
        controller,
        sent,
        stop,
    } = state;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seq = 0;
    let mut buf = [0u8; 128];
    loop {
        if beating.load(Ordering::SeqCst) {
            seq += 1;
            let held = topologies.borrow().epoch;
            let reported = report_epoch.load(Ordering::SeqCst).min(held);
            let hb = Heartbeat {
                member,
                generation: generation.load(Ordering::SeqCst),
                seq,
                epoch_seen: reported,
            };
            let to = *controller.lock().unwrap();
            let datagram = hb.seal(secret.as_ref());
            let _ = socket.send_to(&datagram, to).await;
            sent.lock().unwrap().push(datagram);
        }
        let tick = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                () = &mut tick => break,
                () = stop.cancelled() => return,
                received = socket.recv_from(&mut buf) => {
                    if let Ok((len, _)) = received {
                        let generation = generation.load(Ordering::SeqCst);
                        if let Ok((ack, _)) = HeartbeatAck::open(&buf[..len], secret.as_ref(), member, generation) {
                            acks.lock().unwrap().push(ack);
                        }
                    }
                }
            }
        }
    }
}

async fn serve_wire(
    listener: TcpListener,
    id: String,
    topologies: watch::Sender<Topology>,
    pushes: Arc<AtomicU64>,
    secret: Option<ClusterSecret>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted.unwrap().0,
            () = stop.cancelled() => return,
        };
        let (id, topologies, pushes, secret, stop) = (
            id.clone(),
            topologies.clone(),
            pushes.clone(),
            secret.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut conn = Framed::new(stream, FrameCodec::<ClientFrame, ServerFrame>::default());
            let challenge = Challenge::new();
            let mut hello = None;
            loop {
                let frame = tokio::select! {
                    frame = conn.next() => frame,
                    () = stop.cancelled() => return,
                };
                let Some(Ok(frame)) = frame else { return };
                let reply = match frame {
                    // The handshake, challenging for the secret if there is one.
                    ClientFrame::Hello(h) => {
                        h.check("kv", secret.as_ref()).unwrap();
                        let epoch = topologies.borrow().epoch;
                        let reply = match &secret {
                            Some(_) => ServerFrame::Challenge(challenge),
                            None => ServerFrame::Welcome(h.welcome(&id, epoch, None)),
                        };
                        hello = Some(h);
                        reply
                    }
                    ClientFrame::Proof(proof) => {
                        let (h, s) = (hello.as_ref().unwrap(), secret.as_ref().unwrap());
                        h.check_proof(&challenge, &proof, s).unwrap();
                        let epoch = topologies.borrow().epoch;
                        ServerFrame::Welcome(h.welcome(&id, epoch, Some((&challenge, s))))
                    }
                    ClientFrame::Request {
                        id: rid,
                        body: Request::Topology(t),
                    } => {
                        pushes.fetch_add(1, Ordering::SeqCst);
                        let epoch = t.epoch;
                        topologies.send_if_modified(|held| {
                            let newer = t.epoch > held.epoch;
                            if newer {
                                *held = t;
                            }
                            newer
                        });
                        ServerFrame::Response {
                            id: rid,
                            body: Response::TopologyAccepted { epoch },
                        }
                    }
                    // Nothing else is answered: not how it is doing (to the
                    // controller's /cluster, a worker too slow to answer),
                    // nor what a real worker asks of a peer (copies,
                    // digests: to it, a peer that has hung).
                    ClientFrame::Request { .. } => continue,
                };
                if conn.send(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}
