//! The floor of kv's message pattern: a cluster of relays that store
//! nothing and only pass kv's messages.
//!
//! Each relay process speaks just enough of the Redis protocol for `kvctl
//! bench --protocol redis` and `redis-benchmark`, so the very loop that
//! drives Redis in `bench/compare-redis` drives it too. It takes a client's
//! command as a kv worker takes a request it coordinates, and sends what the
//! worker would send:
//!
//! - `GET`: one request to a second owner, the answer when it replies (a
//!   quorum read, R=2: its own copy and one more);
//! - `SET`: the key and value to two other owners, the answer at the first
//!   acknowledgement (W=2 of three copies; the third is not waited for).
//!
//! The owners are the next two of the other relays from the key's hash, so
//! the work spreads over all of them as a ring spreads it. Peer links are
//! pipelined and gather what a turn of the event loop queued into one
//! write, as kv's replication links do; every relay runs on a one-thread
//! runtime, as `kvctl local` runs its workers. It keeps no data, checks no
//! version, writes no log: whatever a relay costs, kv cannot cost less with
//! the same messages on the same runtime, so its throughput bounds kv's on
//! this machine. `bench/compare-redis` runs four of them.
//!
//! `cargo run --release -p kvctl --example relay -- --nodes 4 --me 0
//! --base-port 19000` serves clients on 19000 (19000 + me) and peers on
//! 19100 + me.

use bytes::{Buf, BytesMut};
use clap::Parser;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// A relay: one of `nodes`, number `me`.
#[derive(Debug, Parser)]
struct Args {
    /// Relays in the cluster (at least 3: an owner and two more).
    #[arg(long, default_value_t = 4)]
    nodes: u16,
    /// This relay's number, from 0.
    #[arg(long)]
    me: u16,
    /// Relay i serves clients on base + i and peers on base + 100 + i.
    #[arg(long, default_value_t = 19000)]
    base_port: u16,
}

/// A request waiting for a peer's acknowledgement.
type Ack = oneshot::Receiver<()>;

/// A pipelined link to one peer: requests go in as frames, acknowledgements
/// come back in the same order.
struct Link {
    queue: mpsc::UnboundedSender<(Vec<u8>, oneshot::Sender<()>)>,
}

impl Link {
    /// Queues `payload` for the peer; the receiver fires at its ack.
    fn send(&self, payload: &[u8]) -> Ack {
        let (tx, rx) = oneshot::channel();
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        // A closed link leaves the ack unanswered: the caller sees it dropped.
        let _ = self.queue.send((frame, tx));
        rx
    }

    /// Connects to `port` (retrying while the peer starts) and runs the link.
    fn open(port: u16) -> Link {
        let (queue, mut requests) = mpsc::unbounded_channel::<(Vec<u8>, oneshot::Sender<()>)>();
        tokio::spawn(async move {
            let stream = loop {
                match TcpStream::connect(("127.0.0.1", port)).await {
                    Ok(stream) => break stream,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            stream
                .set_nodelay(true)
                .expect("a connected socket takes TCP_NODELAY");
            let (mut read, mut write) = stream.into_split();
            let waiting = Arc::new(Mutex::new(VecDeque::<oneshot::Sender<()>>::new()));
            let acks = waiting.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = read.read(&mut buf).await {
                    let mut acks = acks.lock().expect("no panics under this lock");
                    for _ in 0..n {
                        if let Some(ack) = acks.pop_front() {
                            let _ = ack.send(());
                        }
                    }
                }
            });
            let mut out = Vec::new();
            while let Some((frame, ack)) = requests.recv().await {
                // Let the rest of this turn's requests queue, then send them
                // in one write (kv's links do the same).
                tokio::task::yield_now().await;
                let mut batch = vec![ack];
                out.extend_from_slice(&frame);
                while let Ok((frame, ack)) = requests.try_recv() {
                    out.extend_from_slice(&frame);
                    batch.push(ack);
                }
                waiting
                    .lock()
                    .expect("no panics under this lock")
                    .extend(batch);
                if write.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        });
        Link { queue }
    }
}

/// A peer's side of a link: one ack byte per complete frame, in order, one
/// write per read.
async fn serve_peer(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut acks = Vec::new();
    while let Ok(1..) = stream.read_buf(&mut buf).await {
        let mut frames = 0;
        while buf.len() >= 4 {
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            buf.advance(4 + len);
            frames += 1;
        }
        acks.clear();
        acks.resize(frames, b'+');
        if stream.write_all(&acks).await.is_err() {
            return;
        }
    }
}

/// A command read: where its arguments are, and how many bytes it took.
#[derive(Debug, PartialEq, Eq)]
struct Command {
    args: Vec<Range<usize>>,
    len: usize,
}

/// The complete RESP command at the start of `buf`, or `None` if it is not
/// all there yet. A command that is not an array of bulk strings is an
/// error.
fn command(buf: &[u8]) -> Result<Option<Command>, String> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&buf[at..at + end], at + end + 2))
    }
    fn number(kind: u8, text: &[u8]) -> Result<usize, String> {
        match text.split_first() {
            Some((&k, digits)) if k == kind => std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| format!("bad length {:?}", String::from_utf8_lossy(text))),
            _ => Err(format!("expected {:?}", kind as char)),
        }
    }
    let Some((head, mut at)) = line(buf, 0) else {
        return Ok(None);
    };
    let count = number(b'*', head)?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((head, start)) = line(buf, at) else {
            return Ok(None);
        };
        let len = number(b'$', head)?;
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        args.push(start..start + len);
        at = start + len + 2;
    }
    Ok(Some(Command { args, len: at }))
}

/// FNV-1a: which relays own a key.
fn hash(key: &[u8]) -> usize {
    key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) as usize
}

/// What a command waits for before its reply.
enum Reply {
    /// A fixed reply.
    Now(&'static [u8]),
    /// A read's second owner.
    One(Ack, &'static [u8]),
    /// A write's first acknowledgement of two.
    First(Ack, Ack),
}

/// A client connection: every command read at once is sent on before any
/// is waited for, and their replies go out in one write.
async fn serve_client(mut stream: TcpStream, peers: Arc<Vec<Link>>) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (mut replies, mut out) = (Vec::new(), Vec::new());
    while let Ok(1..) = stream.read_buf(&mut buf).await {
        loop {
            let Command { args, len } = match command(&buf) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(e) => {
                    let _ = stream.write_all(format!("-ERR {e}\r\n").as_bytes()).await;
                    return;
                }
            };
            let arg = |i: usize| args.get(i).map(|r| &buf[r.clone()]);
            let name = arg(0).unwrap_or_default().to_ascii_uppercase();
            let owner = |k: usize, key: &[u8]| &peers[(hash(key) + k) % peers.len()];
            replies.push(match (name.as_slice(), arg(1), arg(2)) {
                (b"GET", Some(key), None) => Reply::One(owner(0, key).send(key), b"$-1\r\n"),
                (b"SET", Some(key), Some(value)) => {
                    let mut copy = Vec::with_capacity(key.len() + value.len());
                    copy.extend_from_slice(key);
                    copy.extend_from_slice(value);
                    Reply::First(owner(0, key).send(&copy), owner(1, key).send(&copy))
                }
                (b"PING", ..) => Reply::Now(b"+PONG\r\n"),
                // redis-benchmark asks for its settings first.
                (b"CONFIG", ..) => Reply::Now(b"*0\r\n"),
                _ => Reply::Now(b"-ERR the relay knows GET key and SET key value\r\n"),
            });
            buf.advance(len);
        }
        for reply in replies.drain(..) {
            let answer: &[u8] = match reply {
                Reply::Now(answer) => answer,
                Reply::One(ack, answer) => match ack.await {
                    Ok(()) => answer,
                    Err(_) => b"-ERR a peer link closed\r\n",
                },
                Reply::First(a, b) => match tokio::select! { r = a => r, r = b => r } {
                    Ok(()) => b"+OK\r\n",
                    Err(_) => b"-ERR a peer link closed\r\n",
                },
            };
            out.extend_from_slice(answer);
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

fn main() {
    kv_alloc::configure();
    let args = Args::parse();
    if args.nodes < 3 || args.me >= args.nodes {
        eprintln!("relay: --me must be below --nodes, and --nodes at least 3");
        std::process::exit(2);
    }
    // The runtime a kv node gets for `--threads 1`.
    let one = kv_service::runtime::Sizing {
        threads: 1,
        source: "one, as kvctl local gives each node",
    };
    let runtime = kv_service::runtime::build(one).expect("a runtime of one thread builds");
    runtime.block_on(async move {
        let port = |i: u16| args.base_port + i;
        let clients = TcpListener::bind(("127.0.0.1", port(args.me)))
            .await
            .expect("the client port is free");
        let peer_port = TcpListener::bind(("127.0.0.1", port(100 + args.me)))
            .await
            .expect("the peer port is free");
        tokio::spawn(async move {
            while let Ok((stream, _)) = peer_port.accept().await {
                tokio::spawn(serve_peer(stream));
            }
        });
        let others = (0..args.nodes).filter(|&i| i != args.me);
        let peers = Arc::new(
            others
                .map(|i| Link::open(port(100 + i)))
                .collect::<Vec<_>>(),
        );
        while let Ok((stream, _)) = clients.accept().await {
            tokio::spawn(serve_client(stream, peers.clone()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{command, Command};

    #[test]
    fn commands_are_parsed_only_when_whole() {
        let set = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n";
        let Command { args, len } = command(set).unwrap().unwrap();
        assert_eq!(len, set.len());
        let parts: Vec<&[u8]> = args.iter().map(|r| &set[r.clone()]).collect();
        assert_eq!(parts, [&b"SET"[..], b"k", b"vv"]);
        for cut in 0..set.len() {
            assert_eq!(command(&set[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(command(b"PING\r\n").is_err());
    }
}
