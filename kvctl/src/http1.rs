//! Just enough of HTTP/1.1 for `kvctl bench --protocol http`: one
//! keep-alive connection per worker, a request written in one go, the
//! answer's head parsed by `httparse` (what hyper parses with) and its body
//! read by `Content-Length`. hyper's pooled client costs a pool checkout and
//! a hand-off to a connection task per request, which the benchmark's
//! client (sharing the cores with the servers) would charge to kv; this is
//! what `wrk` and the Redis side's `resp` do instead.

use std::collections::HashMap;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Response heads larger than this are refused.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed at most.
const MAX_HEADERS: usize = 32;

/// Keep-alive connections to workers by address, used one request at a time.
#[derive(Default)]
pub struct Http1 {
    conns: HashMap<String, Conn>,
    request: Vec<u8>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read past the last answer (none, with one request at a time,
    /// unless the server misbehaves: kept rather than lost).
    buf: Vec<u8>,
}

impl Http1 {
    /// Sends `method path` with `body` (JSON, if not empty) to `addr` and
    /// returns the answer's status and body. A connection that fails is
    /// dropped, and the next request to `addr` opens a new one.
    pub async fn request(
        &mut self,
        addr: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> io::Result<(u16, Vec<u8>)> {
        self.request.clear();
        self.request.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        self.request.extend_from_slice(body);
        let conn = match self.conns.remove(addr) {
            Some(conn) => conn,
            None => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Conn {
                    stream,
                    buf: Vec::new(),
                }
            }
        };
        let (conn, answer) = exchange(conn, &self.request).await?;
        self.conns.insert(addr.to_string(), conn);
        Ok(answer)
    }
}

async fn exchange(mut conn: Conn, request: &[u8]) -> io::Result<(Conn, (u16, Vec<u8>))> {
    conn.stream.write_all(request).await?;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut headers);
        match head.parse(&conn.buf).map_err(invalid)? {
            httparse::Status::Complete(head_len) => {
                let status = head.code.unwrap_or(0);
                let len = content_length(head.headers)?;
                let end = head_len + len;
                while conn.buf.len() < end {
                    read_more(&mut conn).await?;
                }
                let body = conn.buf[head_len..end].to_vec();
                conn.buf.drain(..end);
                return Ok((conn, (status, body)));
            }
            httparse::Status::Partial if conn.buf.len() > MAX_HEAD => {
                return Err(invalid("response head too large"));
            }
            httparse::Status::Partial => read_more(&mut conn).await?,
        }
    }
}

async fn read_more(conn: &mut Conn) -> io::Result<()> {
    conn.buf.reserve(4096);
    if conn.stream.read_buf(&mut conn.buf).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the worker closed the connection",
        ));
    }
    Ok(())
}

fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<usize> {
    let header = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .ok_or_else(|| invalid("an answer without content-length"))?;
    std::str::from_utf8(header.value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| invalid("a content-length that is not a number"))
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each request it reads with `answers[i]`, in
    /// pieces of `piece` bytes.
    async fn server(answers: Vec<&'static str>, piece: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            for answer in answers {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await.unwrap();
                for chunk in answer.as_bytes().chunks(piece) {
                    stream.write_all(chunk).await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_are_read_whole_over_one_connection_whatever_their_pieces() {
        let addr = server(
            vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                "HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}",
            ],
            3,
        )
        .await;
        let mut http = Http1::default();
        let first = http.request(&addr, "PUT", "/kv", b"{}").await.unwrap();
        assert_eq!(first, (200, b"hello".to_vec()));
        let second = http.request(&addr, "GET", "/kv?key=a", b"").await.unwrap();
        assert_eq!(second, (404, b"{}".to_vec()));
    }

    #[tokio::test]
    async fn an_answer_without_a_length_or_cut_short_is_an_error() {
        let addr = server(vec!["HTTP/1.1 200 OK\r\n\r\nhello"], 64).await;
        let err = Http1::default()
            .request(&addr, "GET", "/", b"")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("content-length"), "{err}");

        let addr = server(vec!["HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhel"], 64).await;
        let err = Http1::default()
            .request(&addr, "GET", "/", b"")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
