//! Just enough of the Redis protocol (RESP2) for `kvctl bench --protocol
//! redis`: send a command, read a status, error, integer or bulk reply.
//! (The `redis` crate would bring `url` and its Unicode tables for three
//! reply types; the comparison needs nothing more.)
//!
//! A connection is a caller's own ([`Resp`]: it writes a command and reads
//! the reply), or shared by many callers ([`Pipelined`]: a writer task sends
//! what they queued in one write, a reader task hands the replies back in
//! order, as kv's own client shares its connections).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Status(String),
    /// `-ERR ...`.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$n` data, or nil.
    Bulk(Option<Vec<u8>>),
}

/// A caller's way to Redis: a connection of its own, or a share of one.
pub enum Redis {
    /// The caller's own.
    Own(Resp),
    /// Shared with other callers.
    Shared(Arc<Pipelined>),
}

impl Redis {
    /// Sends one command and waits for its reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        match self {
            Redis::Own(resp) => resp.command(args).await,
            Redis::Shared(pipelined) => pipelined.command(args).await,
        }
    }
}

/// One connection to Redis, a caller's own.
pub struct Resp {
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
    line: String,
}

impl Resp {
    /// Connects, with `TCP_NODELAY`.
    pub async fn connect(addr: &str) -> io::Result<Resp> {
        Ok(Resp {
            stream: BufReader::new(connect(addr).await?),
            out: Vec::new(),
            line: String::new(),
        })
    }

    /// Sends one command and reads its reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.out.clear();
        encode(&mut self.out, args);
        self.stream.get_mut().write_all(&self.out).await?;
        read_reply(&mut self.stream, &mut self.line).await
    }
}

/// A reply on its way to the caller that sent the command.
type Waiter = oneshot::Sender<io::Result<Reply>>;

/// The callers waiting for replies, in the order their commands went out;
/// `None` once the connection broke (a waiter dropped fails its caller).
type Waiting = Arc<Mutex<Option<VecDeque<Waiter>>>>;

/// One connection to Redis shared by many callers: commands sent together
/// go out in one write, and replies come back in the order sent.
pub struct Pipelined {
    commands: mpsc::UnboundedSender<(Vec<u8>, Waiter)>,
}

impl Pipelined {
    /// Connects, with `TCP_NODELAY`, and starts the writer and reader.
    pub async fn connect(addr: &str) -> io::Result<Pipelined> {
        let (read, mut write) = connect(addr).await?.into_split();
        let (commands, mut queue) = mpsc::unbounded_channel::<(Vec<u8>, Waiter)>();
        let waiting: Waiting = Arc::new(Mutex::new(Some(VecDeque::new())));
        let replies = waiting.clone();
        tokio::spawn(async move {
            let (mut read, mut line) = (BufReader::new(read), String::new());
            loop {
                let reply = read_reply(&mut read, &mut line).await;
                let failed = reply.is_err();
                let mut waiting = replies.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(waiter) = waiting.as_mut().and_then(VecDeque::pop_front) {
                    let _ = waiter.send(reply);
                }
                if failed {
                    *waiting = None;
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some((command, waiter)) = queue.recv().await {
                // Let the callers already runnable queue theirs too.
                tokio::task::yield_now().await;
                out.extend_from_slice(&command);
                let mut waiters = vec![waiter];
                while let Ok((command, waiter)) = queue.try_recv() {
                    out.extend_from_slice(&command);
                    waiters.push(waiter);
                }
                match waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    Some(waiting) => waiting.extend(waiters),
                    None => return,
                }
                if write.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        });
        Ok(Pipelined { commands })
    }

    /// Sends one command and waits for its reply.
    pub async fn command(&self, args: &[&[u8]]) -> io::Result<Reply> {
        let mut command = Vec::new();
        encode(&mut command, args);
        let (waiter, reply) = oneshot::channel();
        let lost = || io::Error::new(io::ErrorKind::BrokenPipe, "the redis connection closed");
        self.commands.send((command, waiter)).map_err(|_| lost())?;
        reply.await.map_err(|_| lost())?
    }
}

async fn connect(addr: &str) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `args` as a RESP array of bulk strings, onto `out`.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// The next reply on `stream` (`line` is scratch space).
async fn read_reply(
    stream: &mut (impl AsyncBufRead + Unpin),
    line: &mut String,
) -> io::Result<Reply> {
    line.clear();
    if stream.read_line(line).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "redis closed the connection",
        ));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply {line:?}"),
        )
    };
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    match kind {
        "+" => Ok(Reply::Status(rest.to_string())),
        "-" => Ok(Reply::Error(rest.to_string())),
        ":" => rest.parse().map(Reply::Integer).map_err(|_| bad()),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let mut data = vec![0; len as usize + 2];
            stream.read_exact(&mut data).await?;
            data.truncate(len as usize);
            Ok(Reply::Bulk(Some(data)))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server that answers each `GET key` with the key, in order, and
    /// reads whatever arrived before answering any of it.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = vec![0; 4096];
            while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                buf.extend_from_slice(&chunk[..n]);
                let mut out = Vec::new();
                // Commands are `*2 $3 GET $n key`: 5 lines each.
                while let Some(cut) = nth_line_end(&buf, 5) {
                    let text = String::from_utf8_lossy(&buf[..cut]).to_string();
                    let key = text.lines().nth(4).unwrap();
                    out.extend_from_slice(format!("${}\r\n{key}\r\n", key.len()).as_bytes());
                    buf.drain(..cut);
                }
                stream.write_all(&out).await.unwrap();
            }
        });
        addr
    }

    fn nth_line_end(buf: &[u8], n: usize) -> Option<usize> {
        let mut ends = buf.windows(2).enumerate().filter(|(_, w)| w == b"\r\n");
        ends.nth(n - 1).map(|(i, _)| i + 2)
    }

    #[tokio::test]
    async fn callers_sharing_a_connection_each_get_their_own_reply() {
        let shared = Arc::new(Pipelined::connect(&echo_server().await).await.unwrap());
        let callers = (0..200).map(|i| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let key = format!("key{i}");
                let reply = shared.command(&[b"GET", key.as_bytes()]).await.unwrap();
                assert_eq!(reply, Reply::Bulk(Some(key.into_bytes())));
            })
        });
        for caller in callers.collect::<Vec<_>>() {
            caller.await.unwrap();
        }
    }
}
