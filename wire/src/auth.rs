//! The cluster secret: proof that a heartbeat, an ack, a registration or a
//! wire connection comes from a member of this cluster.
//!
//! Every proof is an HMAC-SHA256 tag keyed with the secret. Each use has a
//! label of its own mixed into the MAC, so a tag made for one purpose (a
//! wire server's proof, say, which a stranger can make a server produce)
//! is never valid for another (a client's proof). Each part is length-prefixed, so
//! no two different lists of parts feed the MAC the same bytes. The secret
//! itself never leaves the process: only tags over fresh nonces, sequence
//! numbers or timestamps do, so a captured tag cannot be replayed either.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Fewest bytes a secret may have (after trimming whitespace).
pub const MIN_SECRET_LEN: usize = 16;
/// Bytes in a tag: a whole HMAC-SHA256 output.
pub const TAG_LEN: usize = 32;
/// An HMAC-SHA256 tag.
pub type Tag = [u8; TAG_LEN];
/// A random number used once, so a proof cannot be replayed.
pub type Nonce = [u8; 16];

/// What a tag proves; each has its own label in the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A worker's heartbeat.
    Heartbeat,
    /// The controller's answer to one heartbeat.
    Ack,
    /// A worker's `/register` request.
    Register,
    /// A worker's `/leave` request.
    Leave,
    /// The connecting side of a wire connection.
    Client,
    /// The listening side of a wire connection.
    Server,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Heartbeat => b"kv/1/heartbeat",
            Purpose::Ack => b"kv/1/ack",
            Purpose::Register => b"kv/1/register",
            Purpose::Leave => b"kv/1/leave",
            Purpose::Client => b"kv/1/wire-client",
            Purpose::Server => b"kv/1/wire-server",
        }
    }
}

/// Why a secret cannot be used.
#[derive(Debug, Error)]
pub enum SecretError {
    /// The file cannot be read.
    #[error("cannot read the cluster secret file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Too few bytes to be a secret worth the name.
    #[error("the cluster secret is {len} bytes after trimming whitespace; it must be at least {MIN_SECRET_LEN} (try: head -c 32 /dev/urandom | base64)")]
    TooShort {
        /// Its length after trimming.
        len: usize,
    },
}

/// The shared secret of a cluster, ready to make and check tags. Cloning
/// is cheap; `Debug` never shows the secret.
#[derive(Clone)]
pub struct ClusterSecret {
    /// The keyed state, shared: each tag starts from a clone of it, so the
    /// key is hashed once, not per tag.
    key: Arc<Hmac<Sha256>>,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A secret from its bytes, surrounding whitespace trimmed (files made
    /// with `echo` end in a newline; Kubernetes Secrets may too).
    pub fn new(raw: &[u8]) -> Result<ClusterSecret, SecretError> {
        let secret = raw.trim_ascii();
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort { len: secret.len() });
        }
        let key = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .map_err(|_| SecretError::TooShort { len: secret.len() })?;
        Ok(ClusterSecret { key: Arc::new(key) })
    }

    /// Reads a secret file.
    pub fn read(path: &Path) -> Result<ClusterSecret, SecretError> {
        let raw = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ClusterSecret::new(&raw)
    }

    /// For clap's `value_parser`: reads the file a flag names, so a bad
    /// secret stops a program before it starts.
    pub fn from_flag(path: &str) -> Result<ClusterSecret, String> {
        ClusterSecret::read(Path::new(path)).map_err(|e| e.to_string())
    }

    fn mac(&self, purpose: Purpose, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::clone(&self.key);
        for part in std::iter::once(purpose.label()).chain(parts.iter().copied()) {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The tag of `parts` for `purpose`.
    pub(crate) fn tag(&self, purpose: Purpose, parts: &[&[u8]]) -> Tag {
        self.mac(purpose, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `parts` for `purpose` (compared in
    /// constant time, so timing tells a forger nothing).
    pub(crate) fn verify(&self, purpose: Purpose, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(purpose, parts).verify_slice(tag).is_ok()
    }

    /// Proof that `body` is a `what` request by a holder of the secret,
    /// made at `now_ms` (milliseconds since the Unix epoch).
    pub fn prove_request(&self, what: Signed, body: &[u8], now_ms: u64) -> RequestProof {
        let nonce = random_nonce();
        let tag = self.tag(what.purpose(), &[&now_ms.to_be_bytes(), &nonce, body]);
        RequestProof {
            ts_ms: now_ms,
            nonce,
            tag,
        }
    }

    /// Checks a request's proof: the tag first (so a stranger learns
    /// nothing else), then that it was made within [`PROOF_WINDOW`] of
    /// `now_ms`. Replays within the window are for the caller to refuse,
    /// by the proof's nonce.
    pub fn check_request(
        &self,
        what: Signed,
        proof: &RequestProof,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), ProofError> {
        let parts: [&[u8]; 3] = [&proof.ts_ms.to_be_bytes(), &proof.nonce, body];
        if !self.verify(what.purpose(), &parts, &proof.tag) {
            return Err(ProofError::Wrong);
        }
        let skew_ms = now_ms as i128 - proof.ts_ms as i128;
        if skew_ms.unsigned_abs() > PROOF_WINDOW.as_millis() {
            return Err(ProofError::Stale {
                skew_ms: skew_ms as i64,
            });
        }
        Ok(())
    }
}

/// The worker-to-controller HTTP requests that carry a proof. Each has its
/// own label, so a captured registration's proof is no leave's proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signed {
    /// `POST /register`.
    Register,
    /// `POST /leave`.
    Leave,
}

impl Signed {
    fn purpose(self) -> Purpose {
        match self {
            Signed::Register => Purpose::Register,
            Signed::Leave => Purpose::Leave,
        }
    }
}

/// A fresh random nonce from the operating system.
pub fn random_nonce() -> Nonce {
    let mut nonce = Nonce::default();
    // The OS random source does not fail on any system kv runs on; if it
    // ever did, carrying on with predictable nonces would make proofs
    // replayable, so this fails closed.
    getrandom::fill(&mut nonce).expect("the OS random source failed");
    nonce
}

/// How far a signed request's timestamp may be from the controller's clock.
pub const PROOF_WINDOW: Duration = Duration::from_secs(60);
/// The scheme word of the `Authorization` header carrying a proof.
pub const PROOF_SCHEME: &str = "KV-HMAC-SHA256";

/// Proof of the secret for one `/register` or `/leave` request, carried in its
/// `Authorization` header as `KV-HMAC-SHA256 ts=<ms>,nonce=<hex>,mac=<hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestProof {
    /// When it was made, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Random: the controller refuses a nonce it has seen.
    pub nonce: Nonce,
    /// The MAC over timestamp, nonce and body.
    pub tag: Tag,
}

impl RequestProof {
    /// The `Authorization` header's value.
    pub fn header_value(&self) -> String {
        format!(
            "{PROOF_SCHEME} ts={},nonce={},mac={}",
            self.ts_ms,
            hex::encode(self.nonce),
            hex::encode(self.tag)
        )
    }

    /// Parses an `Authorization` header's value.
    pub fn parse(header: &str) -> Result<RequestProof, ProofError> {
        let fields = header
            .strip_prefix(PROOF_SCHEME)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or(ProofError::Malformed)?;
        let (mut ts_ms, mut nonce, mut tag) = (None, None, None);
        for field in fields.split(',') {
            match field.trim().split_once('=') {
                Some(("ts", v)) => ts_ms = v.parse::<u64>().ok(),
                Some(("nonce", v)) => nonce = from_hex::<16>(v),
                Some(("mac", v)) => tag = from_hex::<TAG_LEN>(v),
                _ => return Err(ProofError::Malformed),
            }
        }
        match (ts_ms, nonce, tag) {
            (Some(ts_ms), Some(nonce), Some(tag)) => Ok(RequestProof { ts_ms, nonce, tag }),
            _ => Err(ProofError::Malformed),
        }
    }
}

fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Why a signed request's proof is refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ProofError {
    /// This cluster has a secret and the request proves nothing.
    #[error("this cluster requires proof of its cluster secret; start the worker with --cluster-secret-file")]
    Missing,
    /// The request carries proof, and this controller has no secret.
    #[error("this controller has no cluster secret, but the request proves one: give every program the same --cluster-secret-file, or none")]
    Unexpected,
    /// Not a proof header at all.
    #[error("the Authorization header is not a {PROOF_SCHEME} proof")]
    Malformed,
    /// The tag does not match: another secret.
    #[error("the proof of the cluster secret is wrong (the secrets differ)")]
    Wrong,
    /// Made too long ago, or in the future: a replay, or a clock far off.
    #[error("the proof was made {skew_ms} ms from the controller's clock, outside the window (check the clocks)")]
    Stale {
        /// The controller's clock minus the proof's timestamp.
        skew_ms: i64,
    },
    /// The same proof was presented before.
    #[error("this proof was used before (a replay)")]
    Replayed,
}

impl ProofError {
    /// A short word for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProofError::Missing => "missing",
            ProofError::Unexpected => "unexpected",
            ProofError::Malformed => "malformed",
            ProofError::Wrong => "wrong",
            ProofError::Stale { .. } => "stale",
            ProofError::Replayed => "replayed",
        }
    }
}

/// Decides which refusals are worth a log line: at most one per peer per
/// [`RefusalLog::EVERY`], so a stranger hammering the cluster cannot flood
/// its logs (the metrics count every refusal).
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: HashMap<IpAddr, Instant>,
}

impl RefusalLog {
    /// The least time between two log lines about one peer.
    pub const EVERY: Duration = Duration::from_secs(60);
    /// Peers remembered at most: beyond that (a flood from many addresses)
    /// new peers are not logged until old entries expire.
    pub const MAX_PEERS: usize = 4096;

    /// Whether to log a refusal of `peer` at `now`; if so, it is noted.
    pub fn should_log(&mut self, peer: IpAddr, now: Instant) -> bool {
        if let Some(last) = self.last.get(&peer) {
            if now.saturating_duration_since(*last) < Self::EVERY {
                return false;
            }
        } else if self.last.len() >= Self::MAX_PEERS {
            self.last
                .retain(|_, last| now.saturating_duration_since(*last) < Self::EVERY);
            if self.last.len() >= Self::MAX_PEERS {
                return false;
            }
        }
        self.last.insert(peer, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn secrets_are_trimmed_and_must_have_sixteen_bytes() {
        let padded = secret("  0123456789abcdef\n");
        let plain = secret("0123456789abcdef");
        let tag = plain.tag(Purpose::Heartbeat, &[b"x"]);
        assert!(padded.verify(Purpose::Heartbeat, &[b"x"], &tag));
        assert!(matches!(
            ClusterSecret::new(b" 0123456789abcde \n"),
            Err(SecretError::TooShort { len: 15 })
        ));
        assert_eq!(format!("{plain:?}"), "ClusterSecret(..)");
        let missing = ClusterSecret::from_flag("/nonexistent/kv-secret").unwrap_err();
        assert!(missing.contains("/nonexistent/kv-secret"), "{missing}");
    }

    #[test]
    fn a_tag_holds_for_its_purpose_parts_and_secret_only() {
        let s = secret("0123456789abcdef");
        let tag = s.tag(Purpose::Client, &[b"ab", b"c"]);
        assert!(s.verify(Purpose::Client, &[b"ab", b"c"], &tag));
        // Another purpose, other parts, the same bytes split differently,
        // another secret, a truncated tag: all refused.
        assert!(!s.verify(Purpose::Server, &[b"ab", b"c"], &tag));
        assert!(!s.verify(Purpose::Client, &[b"ab", b"d"], &tag));
        assert!(!s.verify(Purpose::Client, &[b"a", b"bc"], &tag));
        assert!(!secret("0123456789abcdeF").verify(Purpose::Client, &[b"ab", b"c"], &tag));
        assert!(!s.verify(Purpose::Client, &[b"ab", b"c"], &tag[..16]));
    }

    #[test]
    fn a_registration_proof_round_trips_and_binds_body_and_time() {
        let s = secret("0123456789abcdef");
        let now = 1_764_140_000_000;
        let proof = s.prove_request(Signed::Register, b"{\"id\":\"w1\"}", now);
        let parsed = RequestProof::parse(&proof.header_value()).unwrap();
        assert_eq!(parsed, proof);
        assert_eq!(
            s.check_request(Signed::Register, &parsed, b"{\"id\":\"w1\"}", now + 59_000),
            Ok(())
        );
        assert_eq!(
            s.check_request(Signed::Register, &parsed, b"{\"id\":\"w2\"}", now),
            Err(ProofError::Wrong)
        );
        assert_eq!(
            secret("another secret!!").check_request(
                Signed::Register,
                &parsed,
                b"{\"id\":\"w1\"}",
                now
            ),
            Err(ProofError::Wrong)
        );
        assert_eq!(
            s.check_request(Signed::Register, &parsed, b"{\"id\":\"w1\"}", now + 61_000),
            Err(ProofError::Stale { skew_ms: 61_000 })
        );
        assert_eq!(
            s.check_request(Signed::Register, &parsed, b"{\"id\":\"w1\"}", now - 61_000),
            Err(ProofError::Stale { skew_ms: -61_000 })
        );
        // A registration's proof is no leave's proof.
        assert_eq!(
            s.check_request(Signed::Leave, &parsed, b"{\"id\":\"w1\"}", now),
            Err(ProofError::Wrong)
        );
        // Two proofs of the same body differ by their nonces.
        assert_ne!(
            s.prove_request(Signed::Register, b"x", now).nonce,
            proof.nonce
        );
    }

    #[test]
    fn malformed_proof_headers_are_refused() {
        let good = secret("0123456789abcdef")
            .prove_request(Signed::Register, b"", 1)
            .header_value();
        for bad in [
            "",
            "Bearer abc",
            "KV-HMAC-SHA256",
            "KV-HMAC-SHA256 ts=1,nonce=00",
            &good.replace("ts=1", "ts=x"),
            &good.replace("mac=", "mac=zz"),
            &format!("{good},extra=1"),
            &good.replacen(' ', "", 1),
        ] {
            assert_eq!(
                RequestProof::parse(bad),
                Err(ProofError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn refusals_of_one_peer_are_logged_once_a_minute() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!(log.should_log(a, t0));
        assert!(!log.should_log(a, t0 + Duration::from_secs(59)));
        assert!(log.should_log(b, t0 + Duration::from_secs(1)));
        assert!(log.should_log(a, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_the_log_bounded() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let logged = (0..10_000u32)
            .filter(|i| log.should_log(IpAddr::from(i.to_be_bytes()), t0))
            .count();
        assert_eq!(logged, RefusalLog::MAX_PEERS);
        assert!(log.last.len() <= RefusalLog::MAX_PEERS);
        // A minute on, the old entries make room again.
        assert!(log.should_log([1, 2, 3, 4].into(), t0 + RefusalLog::EVERY));
    }
}
