//! Hostile wire clients: a frame declared at 4 GiB, garbage, a half-sent
//! frame left to stall, a thousand idle connections. Each is refused or cut
//! off, and a well-behaved client is served throughout.
#![allow(clippy::unwrap_used)]

use bytes::{BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use kv_testkit::inproc::*;
use kv_wire::message::Hello;
use kv_wire::{ClientFrame, FrameCodec, ServerFrame};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedRead};

/// A cluster whose first worker closes wire connections idle for 1 s.
async fn cluster() -> Cluster {
    let controller = start_controller().await;
    let mut cluster = Cluster {
        controller,
        workers: Vec::new(),
        secret: None,
        configure: |_| {},
    };
    let w = start_worker_with("worker1", &cluster.controller, |c| {
        c.wire_idle_timeout = Duration::from_secs(1)
    })
    .await;
    cluster.workers.push(w);
    cluster.add("worker2").await;
    cluster.settled().await;
    cluster
}

/// Reads what the server says until it closes: the refusal's reason.
async fn refusal(stream: TcpStream) -> String {
    let mut frames = FramedRead::new(stream, FrameCodec::<ServerFrame, ClientFrame>::default());
    let mut reason = String::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        while let Some(frame) = frames.next().await {
            match frame {
                Ok(ServerFrame::Refused(r)) => reason = r.reason,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the connection");
    reason
}

async fn greeted(cluster: &Cluster) -> Framed<TcpStream, FrameCodec<ServerFrame, ClientFrame>> {
    let stream = TcpStream::connect(cluster.workers[0].wire).await.unwrap();
    let mut conn = Framed::new(stream, FrameCodec::default());
    conn.send(ClientFrame::Hello(Hello::new("kv", "hostile")))
        .await
        .unwrap();
    assert!(matches!(
        conn.next().await,
        Some(Ok(ServerFrame::Welcome(_)))
    ));
    conn
}

async fn still_serves(cluster: &Cluster, key: &str) {
    let (status, reply) = http("PUT", &cluster.workers[0].url("/kv"), put_body(key, "fine")).await;
    assert_eq!(status, 200, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declared_at_4_gib_is_refused_from_its_header() {
    let cluster = cluster().await;
    // Before the hello...
    let mut stream = TcpStream::connect(cluster.workers[0].wire).await.unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(refusal(stream).await.contains("exceeds"));
    // ...and after it.
    let conn = greeted(&cluster).await;
    let mut stream = conn.into_inner();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    stream.write_all(&[0; 1000]).await.unwrap();
    assert!(refusal(stream).await.contains("exceeds"));
    still_serves(&cluster, "after-4gib").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_wrong_cluster_are_refused_with_a_reason() {
    let cluster = cluster().await;
    let mut stream = TcpStream::connect(cluster.workers[0].wire).await.unwrap();
    let mut frame = BytesMut::new();
    frame.put_u32(4);
    frame.put_slice(&[0xc1; 4]);
    stream.write_all(&frame).await.unwrap();
    assert!(refusal(stream).await.contains("unreadable hello"));

    let stream = TcpStream::connect(cluster.workers[0].wire).await.unwrap();
    let mut conn = Framed::new(stream, FrameCodec::<ServerFrame, ClientFrame>::default());
    conn.send(ClientFrame::Hello(Hello::new("other", "hostile")))
        .await
        .unwrap();
    assert!(refusal(conn.into_inner()).await.contains("does not match"));

    let mut stream = greeted(&cluster).await.into_inner();
    stream.write_all(&frame).await.unwrap();
    assert!(refusal(stream).await.contains("bad frame"));
    still_serves(&cluster, "after-garbage").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_frame_is_cut_off_after_the_idle_timeout() {
    let cluster = cluster().await;
    let mut stream = greeted(&cluster).await.into_inner();
    stream.write_all(&100u32.to_be_bytes()).await.unwrap();
    stream.write_all(&[0x92; 10]).await.unwrap();
    let started = Instant::now();
    assert!(refusal(stream).await.contains("no complete frame"));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut off early: {:?}",
        started.elapsed()
    );
    still_serves(&cluster, "after-stall").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_do_not_keep_a_client_out() {
    let cluster = cluster().await;
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(TcpStream::connect(cluster.workers[0].wire).await.unwrap());
    }
    still_serves(&cluster, "among-the-silent").await;
    // Without a hello they are all closed after the hello timeout.
    for mut s in silent {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(PATIENCE, async {
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was kept open");
    }
    cluster.shutdown().await;
}

/// A client with more writes in flight than a worker can coordinate at
/// once (`MAX_COORDINATING` keys): the writes past that, over the wire or
/// HTTP, wait their turn, shown in `/metrics`, instead of piling work onto
/// the runtime ahead of the replication batches those writes wait for;
/// copies sent to the worker, and a read sent behind the writes on their
/// own connection, are still answered meanwhile.
#[tokio::test]
async fn writes_past_the_coordination_budget_wait_their_turn_while_copies_are_answered() {
    use kv_testkit::fake::{Controller, FakeWorker};
    use kv_wire::message::Consistency;
    use kv_wire::{Entry, Request, Response};
    use std::sync::Arc;

    // Nobody goes DOWN while this one-threaded test is busy with the flood.
    let controller = Controller::start_configured(|c| {
        c.grace = Duration::ZERO;
        c.down_after = Duration::from_secs(600);
    })
    .await;
    let at = elsewhere("controller", controller.addr);
    // The writes it coordinates wait on its replicas for ten minutes.
    let worker = start_worker_with("worker1", &at, |c| {
        c.write_timeout = Duration::from_secs(600)
    })
    .await;
    eventually("worker1 ready", || async {
        (worker.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    // Its two replicas take copies and never confirm them.
    let _hung = [
        FakeWorker::start(&controller, "hung1").await,
        FakeWorker::start(&controller, "hung2").await,
    ];
    eventually("worker1 routes by a topology of all three", || async {
        let (_, mapping) = controller.get("/mapping?key=any").await;
        let workers = mapping["workers"].as_array().unwrap().len();
        let epoch = mapping["epoch"].as_u64().unwrap();
        (workers == 3 && worker.metric("kv_worker_epoch").await == epoch).then_some(())
    })
    .await;

    let budget = kv_worker::node::MAX_COORDINATING;
    let conn = Arc::new(worker.wire().await);
    // Three times the budget: a third of the keys are worker1's to
    // coordinate, and they hang, holding every turn.
    let items = (0..3 * budget)
        .map(|i| (format!("key:{i}"), "v".into()))
        .collect();
    let flood = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call(Request::PutMany { items }).await }
    });
    let late = tokio::spawn({
        let conn = conn.clone();
        async move {
            let request = Request::Put {
                key: "late".into(),
                value: "v".into(),
            };
            conn.call(request).await
        }
    });
    // And an HTTP write of a key worker1 coordinates (the primary of).
    let mut keys = (0..).map(|i| format!("http:{i}"));
    let mine = loop {
        let key = keys.next().unwrap();
        let (_, mapping) = controller.get(&format!("/mapping?key={key}")).await;
        if mapping["workers"][0] == "worker1" {
            break key;
        }
    };
    let url = worker.url("/kv");
    let body = put_body(&mine, "v");
    let http_write = tokio::spawn(async move { http("PUT", &url, body).await });
    eventually(
        "a wire write and an HTTP write waiting for their turn",
        || async { (worker.metric("kv_worker_coordination_waiting").await == 2).then_some(()) },
    )
    .await;

    // A peer's copy is answered all the same, on another connection.
    let copy = Entry {
        key: "from-a-peer".into(),
        version: kv_wire::Version {
            hlc: kv_testkit::fake::now_ms() << 16,
            node: 7,
        },
        value: Some("copy".into()),
    };
    let request = Request::Replicate {
        entries: vec![copy],
    };
    let reply = worker.wire().await.call(request).await.unwrap();
    assert!(
        matches!(reply, Response::Replicated { applied: 1, .. }),
        "{reply:?}"
    );
    assert!(!flood.is_finished() && !late.is_finished() && !http_write.is_finished());
    // A read behind them on their connection is answered meanwhile.
    let read = Request::Get {
        key: "late".into(),
        consistency: Consistency::Local,
    };
    let reply = conn.call(read).await.unwrap();
    assert!(matches!(reply, Response::Value(_)), "{reply:?}");
    assert!(!flood.is_finished() && !late.is_finished() && !http_write.is_finished());
    // An HTTP client that hangs up while its write waits is no longer
    // counted as waiting (its handler is dropped mid-wait).
    http_write.abort();
    eventually("the hung-up HTTP write to leave the count", || async {
        (worker.metric("kv_worker_coordination_waiting").await == 1).then_some(())
    })
    .await;
    // ...while the flood still holds every turn: nobody got one.
    assert!(!flood.is_finished() && !late.is_finished());
    flood.abort();
    late.abort();
}
