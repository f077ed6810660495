//! The cluster secret on the wire: a hello without proof of it, with a
//! wrong one, or replayed from another connection is refused and changes
//! nothing; a server that cannot prove it is not trusted; the right secret
//! is served.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use kv_client::{Connection, ConnectionError, Credentials};
use kv_testkit::inproc::*;
use kv_wire::message::{Challenge, Hello};
use kv_wire::{ClientFrame, FrameCodec, Request, Response, ServerFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

type Client = Framed<TcpStream, FrameCodec<ServerFrame, ClientFrame>>;

/// A raw connection to `addr` that has said `hello`.
async fn said(addr: std::net::SocketAddr, hello: &Hello) -> Client {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut conn = Framed::new(stream, FrameCodec::default());
    conn.send(ClientFrame::Hello(hello.clone())).await.unwrap();
    conn
}

/// The challenge the server answers a hello with.
async fn challenge(conn: &mut Client) -> Challenge {
    match conn.next().await {
        Some(Ok(ServerFrame::Challenge(challenge))) => challenge,
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// Sends a put, then reads what the server says until it closes: it must
/// be a single refusal, whose reason is returned.
async fn put_is_refused(mut conn: Client, key: &str) -> String {
    conn.send(ClientFrame::Request {
        id: 1,
        body: put(key),
    })
    .await
    .unwrap();
    match &until_closed(conn).await[..] {
        [ServerFrame::Refused(r)] => r.reason.clone(),
        other => panic!("expected one refusal, got {other:?}"),
    }
}

/// Every frame the server sends until it closes.
async fn until_closed(mut conn: Client) -> Vec<ServerFrame> {
    let frames = tokio::time::timeout(PATIENCE, async {
        let mut frames = Vec::new();
        while let Some(Ok(frame)) = conn.next().await {
            frames.push(frame);
        }
        frames
    })
    .await;
    frames.expect("the server did not close the connection")
}

fn put(key: &str) -> Request {
    Request::Put {
        key: key.into(),
        value: Bytes::from_static(b"intruded"),
    }
}

async fn metrics(service: &Service) -> String {
    let (_, text) = service.get("/metrics").await;
    text.as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_without_the_secret_with_a_wrong_one_or_replayed_are_refused_and_change_nothing() {
    let secret = test_secret("wire-secret-0123456789");
    let cluster = Cluster::start_with_secret(2, Some(secret.clone())).await;
    let worker = &cluster.workers[0];
    let addr = worker.wire.to_string();

    // No secret: the hello is refused, and the put pipelined behind it is
    // never answered.
    let plain = said(worker.wire, &Hello::new("kv", "intruder")).await;
    let reason = put_is_refused(plain, "intruded-plain").await;
    assert!(reason.contains("requires its cluster secret"), "{reason}");

    // A wrong secret, through the client library.
    let wrong =
        Credentials::new("kv", "intruder").with_secret(Some(test_secret("not-the-secret-0123")));
    let err = Connection::connect(&addr, &wrong, PATIENCE)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectionError::Refused { reason, .. } if reason.contains("differs")),
        "{err}"
    );
    assert!(
        err.is_final(),
        "a wrong secret is not worth retrying: {err:?}"
    );

    // A genuine hello and proof recorded from one connection, replayed on
    // another: the new challenge makes the proof worthless.
    let hello = Hello::new("kv", "test").with_secret(Some(&secret));
    let mut first = said(worker.wire, &hello).await;
    let recorded = hello.proof(&challenge(&mut first).await, &secret);
    first.send(ClientFrame::Proof(recorded)).await.unwrap();
    assert!(matches!(
        first.next().await,
        Some(Ok(ServerFrame::Welcome(_)))
    ));
    let mut replay = said(worker.wire, &hello).await;
    challenge(&mut replay).await;
    replay.send(ClientFrame::Proof(recorded)).await.unwrap();
    let reason = put_is_refused(replay, "intruded-replay").await;
    assert!(reason.contains("wrong proof"), "{reason}");

    // A hello that promises a proof and sends a request instead.
    let mut skipped = said(worker.wire, &hello).await;
    challenge(&mut skipped).await;
    let reason = put_is_refused(skipped, "intruded-skip").await;
    assert!(reason.contains("no proof"), "{reason}");

    // Nothing changed anywhere, and every refusal was counted.
    for w in &cluster.workers {
        for key in ["intruded-plain", "intruded-replay", "intruded-skip"] {
            assert_eq!(w.local(key).await, None, "{key}");
        }
    }
    let text = metrics(worker).await;
    assert!(
        text.contains(r#"kv_worker_auth_refusals_total{what="hello",reason="missing"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kv_worker_auth_refusals_total{what="hello",reason="wrong"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kv_worker_auth_refusals_total{what="hello",reason="no_proof"} 1"#),
        "{text}"
    );

    // The right secret is served.
    let right = Credentials::new("kv", "test").with_secret(Some(secret));
    let conn = Connection::connect(&addr, &right, PATIENCE).await.unwrap();
    let written = conn.call(put("welcome")).await.unwrap();
    assert!(matches!(written, Response::Written { .. }), "{written:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_secret_and_a_worker_without_one_do_not_talk() {
    let cluster = Cluster::start(1).await;
    let proving =
        Credentials::new("kv", "test").with_secret(Some(test_secret("client-secret-0123456789")));
    let err = Connection::connect(&cluster.workers[0].wire.to_string(), &proving, PATIENCE)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectionError::Refused { reason, .. } if reason.contains("has no cluster secret")),
        "{err}"
    );
    cluster.shutdown().await;
}

/// A server that answers every hello with a welcome proving nothing, or
/// proving another secret: a client with the secret refuses both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_does_not_trust_a_server_that_cannot_prove_the_secret() {
    let secret = test_secret("client-secret-0123456789");
    for impostor in [None, Some(test_secret("impostor-secret-0123"))] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut conn = Framed::new(stream, FrameCodec::<ClientFrame, ServerFrame>::default());
            let Some(Ok(ClientFrame::Hello(hello))) = conn.next().await else {
                panic!("no hello");
            };
            let welcome = match &impostor {
                // Welcomes without challenging.
                None => hello.welcome("worker1", 1, None),
                // Challenges, takes any proof, and proves another secret.
                Some(other) => {
                    let challenge = Challenge::new();
                    conn.send(ServerFrame::Challenge(challenge)).await.unwrap();
                    let Some(Ok(ClientFrame::Proof(_))) = conn.next().await else {
                        panic!("no proof");
                    };
                    hello.welcome("worker1", 1, Some((&challenge, other)))
                }
            };
            conn.send(ServerFrame::Welcome(welcome)).await.unwrap();
            // Whatever the client does next, it must not send a request.
            conn.next().await
        });
        let credentials = Credentials::new("kv", "test").with_secret(Some(secret.clone()));
        let err = Connection::connect(&addr, &credentials, PATIENCE)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectionError::Unauthenticated { .. }),
            "{err}"
        );
        let after = server.await.unwrap();
        assert!(
            !matches!(after, Some(Ok(ClientFrame::Request { .. }))),
            "{after:?}"
        );
    }
}
