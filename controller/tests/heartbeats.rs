//! Heartbeats over real UDP, failure detection, the topology bus, and a
//! controller restart.
#![allow(clippy::unwrap_used)]

use kv_testkit::fake::*;
use kv_wire::heartbeat::{Datagram, Heartbeat};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn ids(t: &kv_wire::Topology) -> Vec<&str> {
    t.members.iter().map(|m| m.id.as_str()).collect()
}

#[tokio::test]
async fn a_worker_whose_heartbeats_stop_goes_down_and_leaves_the_mapping() {
    let c = Controller::start(Duration::ZERO).await;
    let mut workers = Vec::new();
    for id in ["worker1", "worker2", "worker3", "worker4"] {
        workers.push(FakeWorker::start(&c, id).await);
    }
    let all = workers[0]
        .topology_where("all four workers", |t| t.members.len() == 4)
        .await;

    // Silence the primary of user123.
    let (_, mapping) = c.get("/mapping?key=user123").await;
    let primary = mapping["primary"]["id"].as_str().unwrap().to_string();
    let victim = workers.iter().find(|w| w.id == primary).unwrap();
    victim.beating.store(false, Ordering::SeqCst);
    let silenced = Instant::now();

    eventually("the silent worker to be DOWN", || async {
        (c.status(&primary).await.as_deref() == Some("DOWN")).then_some(())
    })
    .await;
    let detected = silenced.elapsed();
    assert!(
        detected >= Duration::from_millis(800),
        "DOWN after only {detected:?}"
    );

    let (_, mapping) = c.get("/mapping?key=user123").await;
    let owners: Vec<_> = mapping["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 3);
    assert!(
        !owners.contains(&primary.as_str()),
        "{owners:?} still lists {primary}"
    );
    assert!(mapping["epoch"].as_u64() > Some(all.epoch));

    // Every survivor is told, over the bus, without the silent worker.
    for w in workers.iter_mut().filter(|w| w.id != primary) {
        let t = w
            .topology_where("the topology without the silent worker", |t| {
                t.epoch > all.epoch
            })
            .await;
        assert_eq!(t.members.len(), 3);
        assert!(!ids(&t).contains(&primary.as_str()));
    }

    // It comes back: UP, and in the ring again.
    let victim = workers.iter().find(|w| w.id == primary).unwrap();
    victim.beating.store(true, Ordering::SeqCst);
    eventually("the worker to be UP again", || async {
        (c.status(&primary).await.as_deref() == Some("UP")).then_some(())
    })
    .await;
    eventually("the worker to be primary again", || async {
        let (_, mapping) = c.get("/mapping?key=user123").await;
        (mapping["primary"]["id"] == primary.as_str()).then_some(())
    })
    .await;
    c.stop().await;
}

#[tokio::test]
async fn heartbeats_are_acked_with_the_epoch_and_garbage_is_counted_not_fatal() {
    let c = Controller::start(Duration::ZERO).await;
    let mut w = FakeWorker::start(&c, "worker1").await;
    let t = w.topology_where("a topology", |t| t.epoch > 0).await;
    let ack = eventually("an ack at the topology's epoch", || async {
        w.acks
            .lock()
            .unwrap()
            .iter()
            .find(|a| a.epoch == t.epoch)
            .copied()
    })
    .await;
    let (_, health) = c.get("/healthz").await;
    assert_eq!(Some(ack.incarnation), health["incarnation"].as_u64());

    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let forged = Heartbeat {
        member: 999,
        generation: 1,
        seq: 1,
        epoch_seen: 0,
    };
    let stale = Heartbeat {
        member: w.member,
        generation: 0,
        seq: 1,
        epoch_seen: 0,
    };
    for datagram in [
        b"nonsense".to_vec(),
        vec![0; 500],
        b"kH\x09\x90".to_vec(),
        forged.encode(),
        stale.encode(),
    ] {
        socket.send_to(&datagram, c.addr).unwrap();
    }
    let metrics = eventually("the drops to be counted", || async {
        let (_, text) = http_raw("GET", &c.url("/metrics"), Default::default()).await;
        let text = String::from_utf8(text.to_vec()).unwrap();
        [
            "magic",
            "size",
            "version",
            "unknown_member",
            "stale_generation",
        ]
        .iter()
        .all(|r| {
            text.contains(&format!(
                "kv_controller_dropped_datagrams_total{{reason=\"{r}\"}} 1"
            ))
        })
        .then_some(text)
    })
    .await;
    assert!(metrics.contains("kv_controller_heartbeats_total"));
    // Still serving, and the forged heartbeat registered nobody.
    let (_, nodes) = c.get("/nodes").await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);
    c.stop().await;
}

#[tokio::test]
async fn a_worker_that_missed_a_push_is_pushed_again_from_its_heartbeat() {
    let c = Controller::start(Duration::ZERO).await;
    let mut w = FakeWorker::start(&c, "worker1").await;
    // The worker claims to hold epoch 0 whatever it receives: it "lost" it.
    w.report_epoch.store(0, Ordering::SeqCst);
    w.topology_where("a topology", |t| t.epoch > 0).await;
    eventually("a second push of the same epoch", || async {
        (w.pushes.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    // Once it reports the epoch, the pushes stop.
    w.report_epoch.store(u64::MAX, Ordering::SeqCst);
    let settled = w.pushes.load(Ordering::SeqCst);
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < quiet_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.pushes.load(Ordering::SeqCst) <= settled + 1);
    c.stop().await;
}

#[tokio::test]
async fn a_restarted_controller_marks_nobody_down_and_republishes_the_same_members() {
    let grace = Duration::from_secs(2);
    let first = Controller::start(Duration::ZERO).await;
    let mut workers = Vec::new();
    for id in ["worker1", "worker2", "worker3"] {
        workers.push(FakeWorker::start(&first, id).await);
    }
    let before = workers[0]
        .topology_where("all three", |t| t.members.len() == 3)
        .await;
    first.stop().await;

    // A new controller (a new incarnation) where the workers' heartbeats now
    // go; each re-registers as a real worker does when the ack's incarnation
    // changes, presenting its generation and epoch.
    let second = Controller::start(grace).await;
    for w in &workers {
        *w.controller.lock().unwrap() = second.addr;
        let generation = w.generation.load(Ordering::SeqCst);
        let reply = register(
            second.addr,
            &w.id,
            w.wire_port,
            Some(before.epoch),
            Some(generation),
        )
        .await;
        assert_eq!(
            reply["generation"].as_u64(),
            Some(generation),
            "a restart keeps incarnations"
        );
    }
    // Through the grace period and beyond, nobody is DOWN and the topology
    // has the same members and generations at a higher epoch.
    let after = workers[0]
        .topology_where("the new controller's topology", |t| t.epoch > before.epoch)
        .await;
    assert_eq!(
        after
            .members
            .iter()
            .map(|m| (&m.id, m.generation))
            .collect::<Vec<_>>(),
        before
            .members
            .iter()
            .map(|m| (&m.id, m.generation))
            .collect::<Vec<_>>()
    );
    let (_, nodes) = second.get("/nodes").await;
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["status"], "UP", "{n}");
    }
    second.stop().await;
}
