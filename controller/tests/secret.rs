//! The controller with a cluster secret: registrations without proof of
//! it, with a wrong proof or a replayed one are refused and change nothing;
//! forged and replayed heartbeats keep no dead worker alive and get no ack.
#![allow(clippy::unwrap_used)]

use kv_testkit::fake::*;
use kv_wire::heartbeat::{Datagram, Heartbeat};
use kv_wire::ClusterSecret;
use std::time::Duration;

fn secret(text: &str) -> ClusterSecret {
    ClusterSecret::new(text.as_bytes()).unwrap()
}

async fn metrics(c: &Controller) -> String {
    let (_, text) = http_raw("GET", &c.url("/metrics"), Default::default()).await;
    String::from_utf8(text.to_vec()).unwrap()
}

fn refusals(text: &str, what: &str, reason: &str) -> u64 {
    let prefix =
        format!("kv_controller_auth_refusals_total{{what=\"{what}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().unwrap())
}

async fn node_ids(c: &Controller) -> Vec<String> {
    let (_, nodes) = c.get("/nodes").await;
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn registrations_without_a_valid_fresh_proof_are_refused_and_change_nothing() {
    let s = secret("controller-secret-0123");
    let c = Controller::start_with(Duration::ZERO, Some(s.clone())).await;
    let register = |proof: Option<String>, body: &'static str| {
        let url = c.url("/register");
        async move {
            let (status, reply) =
                http_authorized("POST", &url, body.into(), proof.as_deref()).await;
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            (
                status,
                reply["error"].as_str().unwrap_or_default().to_string(),
            )
        }
    };
    let body = r#"{"id":"w1","host":"127.0.0.1","port":1,"wire_port":2}"#;

    let (status, error) = register(None, body).await;
    assert_eq!(status, 401);
    assert!(
        error.contains("requires proof of its cluster secret"),
        "{error}"
    );

    let wrong = secret("not-the-secret-0123").prove_request(
        kv_wire::auth::Signed::Register,
        body.as_bytes(),
        now_ms(),
    );
    let (status, error) = register(Some(wrong.header_value()), body).await;
    assert_eq!(
        (status, error.contains("secrets differ")),
        (401, true),
        "{error}"
    );

    // A proof is for its body only: another worker's registration cannot
    // borrow it.
    let proof = s
        .prove_request(kv_wire::auth::Signed::Register, body.as_bytes(), now_ms())
        .header_value();
    let other = r#"{"id":"w2","host":"127.0.0.1","port":1,"wire_port":2}"#;
    assert_eq!(register(Some(proof.clone()), other).await.0, 401);

    // Too old a proof (a recording) is refused even with the right secret.
    let old = s.prove_request(
        kv_wire::auth::Signed::Register,
        body.as_bytes(),
        now_ms() - 120_000,
    );
    assert_eq!(register(Some(old.header_value()), body).await.0, 401);
    assert_eq!(register(Some("Basic dzE6eA==".into()), body).await.0, 401);
    assert!(
        node_ids(&c).await.is_empty(),
        "a refused registration registered"
    );

    // The genuine one registers, once: replayed, it is refused.
    let (status, error) = register(Some(proof.clone()), body).await;
    assert_eq!(status, 200, "{error}");
    let (status, error) = register(Some(proof), body).await;
    assert_eq!(status, 401);
    assert!(error.contains("replay"), "{error}");
    assert_eq!(node_ids(&c).await, ["w1"]);
    let (_, nodes) = c.get("/nodes").await;
    assert_eq!(
        nodes["nodes"][0]["generation"], 1,
        "the replay made a new generation"
    );

    let text = metrics(&c).await;
    for (reason, n) in [
        ("missing", 1),
        ("wrong", 2),
        ("stale", 1),
        ("malformed", 1),
        ("replayed", 1),
    ] {
        assert_eq!(refusals(&text, "register", reason), n, "{reason}\n{text}");
    }
    c.stop().await;
}

#[tokio::test]
async fn a_controller_without_a_secret_refuses_a_registration_that_proves_one() {
    let c = Controller::start(Duration::ZERO).await;
    let body = r#"{"id":"w1","host":"127.0.0.1","port":1,"wire_port":2}"#;
    let proof = secret("worker-secret-0123456")
        .prove_request(kv_wire::auth::Signed::Register, body.as_bytes(), now_ms())
        .header_value();
    let (status, reply) =
        http_authorized("POST", &c.url("/register"), body.into(), Some(&proof)).await;
    assert_eq!(status, 401);
    let reply = String::from_utf8(reply.to_vec()).unwrap();
    assert!(reply.contains("has no cluster secret"), "{reply}");
    assert!(node_ids(&c).await.is_empty());
    c.stop().await;
}

#[tokio::test]
async fn a_controller_without_a_secret_names_sealed_heartbeats_in_its_metrics() {
    let c = Controller::start(Duration::ZERO).await;
    let w = FakeWorker::start(&c, "worker1").await;
    let sealed = Heartbeat {
        member: w.member,
        generation: 1,
        seq: 1_000,
        epoch_seen: 0,
    }
    .seal(Some(&secret("worker-secret-0123456")));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&sealed, c.addr).unwrap();
    eventually("the sealed heartbeat to be counted", || async {
        (refusals(&metrics(&c).await, "heartbeat", "unexpected") == 1).then_some(())
    })
    .await;
    c.stop().await;
}

#[tokio::test]
async fn forged_and_replayed_heartbeats_keep_no_dead_worker_alive() {
    let s = secret("controller-secret-0123");
    let c = Controller::start_with(Duration::ZERO, Some(s)).await;
    let mut w = FakeWorker::start(&c, "worker1").await;
    w.topology_where("a topology with worker1", |t| t.members.len() == 1)
        .await;
    // Its sealed heartbeats are acked with sealed acks it can open.
    eventually("an authenticated ack", || async {
        (!w.acks.lock().unwrap().is_empty()).then_some(())
    })
    .await;

    // The worker dies. An attacker keeps it "alive": plain heartbeats,
    // heartbeats sealed with a guessed secret, and the worker's own
    // recorded heartbeats played back.
    w.beating.store(false, std::sync::atomic::Ordering::SeqCst);
    let recorded = w.sent.lock().unwrap().clone();
    let attacker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker.set_nonblocking(true).unwrap();
    let mut seq = 1_000_000;
    eventually("the dead worker to be DOWN despite the forgeries", || {
        seq += 1;
        let forged = Heartbeat {
            member: w.member,
            generation: 1,
            seq,
            epoch_seen: 1,
        };
        attacker.send_to(&forged.encode(), c.addr).unwrap();
        let guessed = forged.seal(Some(&secret("guessed-secret-0123")));
        attacker.send_to(&guessed, c.addr).unwrap();
        for datagram in &recorded {
            attacker.send_to(datagram, c.addr).unwrap();
        }
        let c = &c;
        async move { (c.status("worker1").await.as_deref() == Some("DOWN")).then_some(()) }
    })
    .await;

    let text = metrics(&c).await;
    assert!(refusals(&text, "heartbeat", "missing") > 0, "{text}");
    assert!(refusals(&text, "heartbeat", "wrong") > 0, "{text}");
    assert!(refusals(&text, "heartbeat", "replayed") > 0, "{text}");
    // A second of forgeries got no answer: acks are sent the moment a
    // heartbeat counts, and none did.
    let mut buf = [0u8; 256];
    assert!(
        attacker.recv_from(&mut buf).is_err(),
        "the controller answered a forged or replayed heartbeat"
    );
    c.stop().await;
}

#[tokio::test]
async fn forged_replayed_and_stale_leaves_are_refused_and_change_nothing() {
    let s = secret("controller-secret-0123");
    let c = Controller::start_with(Duration::ZERO, Some(s.clone())).await;
    let worker = FakeWorker::start(&c, "w1").await;
    let generation = worker.generation.load(std::sync::atomic::Ordering::SeqCst);
    let leave = |proof: Option<String>, body: String| {
        let url = c.url("/leave");
        async move {
            let (status, reply) =
                http_authorized("POST", &url, body.into(), proof.as_deref()).await;
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            (status, reply)
        }
    };
    let body = format!(r#"{{"id":"w1","generation":{generation},"done":false}}"#);
    let prove = |secret: &ClusterSecret, what, body: &str| {
        secret
            .prove_request(what, body.as_bytes(), now_ms())
            .header_value()
    };
    use kv_wire::auth::Signed;
    // No proof, another secret's, a registration's proof for this body.
    for proof in [
        None,
        Some(prove(&secret("not-the-secret-0123"), Signed::Leave, &body)),
        Some(prove(&s, Signed::Register, &body)),
    ] {
        let (status, reply) = leave(proof, body.clone()).await;
        assert_eq!(status, 401, "{reply}");
    }
    assert_eq!(c.status("w1").await.as_deref(), Some("UP"));

    // The genuine leave, once: replayed, it is refused.
    let proof = prove(&s, Signed::Leave, &body);
    let (status, reply) = leave(Some(proof.clone()), body.clone()).await;
    assert_eq!(
        (status, &reply["status"]),
        (200, &"LEAVING".into()),
        "{reply}"
    );
    let (status, reply) = leave(Some(proof), body.clone()).await;
    assert_eq!(status, 401);
    assert!(
        reply["error"].as_str().unwrap().contains("replay"),
        "{reply}"
    );

    // Another incarnation's leave ("done", even) changes nothing.
    let stale = format!(
        r#"{{"id":"w1","generation":{},"done":true}}"#,
        generation + 1
    );
    let (status, reply) = leave(Some(prove(&s, Signed::Leave, &stale)), stale).await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(c.status("w1").await.as_deref(), Some("LEAVING"));
    let text = metrics(&c).await;
    assert_eq!(refusals(&text, "leave", "missing"), 1, "{text}");
    assert_eq!(refusals(&text, "leave", "wrong"), 2, "{text}");
    assert_eq!(refusals(&text, "leave", "replayed"), 1, "{text}");
    c.stop().await;
}
