//! The controller's side of the cluster secret: checking the proofs of
//! registrations and leaves (and refusing replays of them), and deciding
//! which refusals are worth a log line.

use kv_wire::auth::{Nonce, ProofError, RefusalLog, RequestProof, Signed, PROOF_WINDOW};
use kv_wire::ClusterSecret;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// The cluster secret, if any, and what checking it needs to remember.
#[derive(Debug, Default)]
pub struct Guard {
    secret: Option<ClusterSecret>,
    seen: Mutex<SeenNonces>,
    log: Mutex<RefusalLog>,
}

impl Guard {
    /// A guard for `secret`; without one, everything passes.
    pub fn new(secret: Option<ClusterSecret>) -> Guard {
        Guard {
            secret,
            ..Guard::default()
        }
    }

    /// The secret, if the cluster has one.
    pub fn secret(&self) -> Option<&ClusterSecret> {
        self.secret.as_ref()
    }

    /// Checks a `what` request's `Authorization` header against its body,
    /// at `now_ms` (milliseconds since the Unix epoch). A proof is good
    /// once: its nonce is remembered while its timestamp is in the window.
    pub fn check(
        &self,
        what: Signed,
        authorization: Option<&[u8]>,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), ProofError> {
        let secret = match (&self.secret, authorization) {
            (None, None) => return Ok(()),
            (None, Some(_)) => return Err(ProofError::Unexpected),
            (Some(_), None) => return Err(ProofError::Missing),
            (Some(secret), Some(_)) => secret,
        };
        let header = authorization
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or(ProofError::Malformed)?;
        let proof = RequestProof::parse(header)?;
        secret.check_request(what, &proof, body, now_ms)?;
        let forget_at = proof.ts_ms.saturating_add(PROOF_WINDOW.as_millis() as u64);
        if self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_time(proof.nonce, forget_at, now_ms)
        {
            Ok(())
        } else {
            Err(ProofError::Replayed)
        }
    }

    /// Whether to log a refusal of `peer` now (one line per peer a minute).
    pub fn should_log(&self, peer: IpAddr) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .should_log(peer, Instant::now())
    }
}

/// Nonces of the proofs accepted, until their proofs expire.
/// Only proofs with a valid tag get here, so strangers cannot fill it.
#[derive(Debug, Default)]
struct SeenNonces {
    until: HashMap<Nonce, u64>,
    /// The size at which expired entries are next swept out.
    sweep_at: usize,
}

/// The smallest map worth sweeping.
const SWEEP_MIN: usize = 1024;

impl SeenNonces {
    /// Notes `nonce` (its proof expires at `forget_at`); false if it was
    /// already noted.
    fn first_time(&mut self, nonce: Nonce, forget_at: u64, now_ms: u64) -> bool {
        // Expired entries go when the map has doubled since the last sweep:
        // amortised constant time even for a storm of registrations.
        if self.until.len() >= self.sweep_at {
            self.until.retain(|_, until| *until >= now_ms);
            self.sweep_at = (2 * self.until.len()).max(SWEEP_MIN);
        }
        match self.until.get(&nonce) {
            Some(&until) if until >= now_ms => false,
            _ => {
                self.until.insert(nonce, forget_at);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_140_000_000;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_proof_is_good_once_and_only_with_the_same_secret_and_body() {
        let s = secret("0123456789abcdef");
        let guard = Guard::new(Some(s.clone()));
        let header = s.prove_request(Signed::Register, b"{}", NOW).header_value();
        let check = |h: Option<&str>, body: &[u8], now| {
            guard.check(Signed::Register, h.map(str::as_bytes), body, now)
        };
        assert_eq!(check(Some(&header), b"{}", NOW), Ok(()));
        assert_eq!(
            check(Some(&header), b"{}", NOW + 1),
            Err(ProofError::Replayed)
        );
        let fresh = s.prove_request(Signed::Register, b"{}", NOW).header_value();
        assert_eq!(check(Some(&fresh), b"{ }", NOW), Err(ProofError::Wrong));
        assert_eq!(check(None, b"{}", NOW), Err(ProofError::Missing));
        assert_eq!(
            check(Some("Basic x"), b"{}", NOW),
            Err(ProofError::Malformed)
        );
        let other = secret("fedcba9876543210")
            .prove_request(Signed::Register, b"{}", NOW)
            .header_value();
        assert_eq!(check(Some(&other), b"{}", NOW), Err(ProofError::Wrong));
        // Replayed after the window, it is stale rather than unseen.
        assert!(matches!(
            check(Some(&header), b"{}", NOW + 61_000),
            Err(ProofError::Stale { .. })
        ));
        assert_eq!(
            guard.check(Signed::Register, Some(&[0xff, 0xfe]), b"{}", NOW),
            Err(ProofError::Malformed)
        );
    }

    #[test]
    fn without_a_secret_no_proof_is_needed_and_none_is_taken() {
        let guard = Guard::new(None);
        assert_eq!(guard.check(Signed::Register, None, b"{}", NOW), Ok(()));
        let header = secret("0123456789abcdef")
            .prove_request(Signed::Register, b"{}", NOW)
            .header_value();
        assert_eq!(
            guard.check(Signed::Register, Some(header.as_bytes()), b"{}", NOW),
            Err(ProofError::Unexpected)
        );
    }

    #[test]
    fn seen_nonces_are_forgotten_once_their_proofs_expire() {
        let mut seen = SeenNonces::default();
        assert!(seen.first_time([1; 16], NOW + 60_000, NOW));
        assert!(!seen.first_time([1; 16], NOW + 60_000, NOW + 10));
        // Expired, the nonce is unseen again (its proof is stale by then).
        assert!(seen.first_time([1; 16], NOW + 120_000, NOW + 60_001));
        // A storm: the map is swept as it grows, never holding much more
        // than the live entries.
        for i in 0..10_000u32 {
            let mut nonce = [0u8; 16];
            nonce[..4].copy_from_slice(&i.to_be_bytes());
            let now = NOW + u64::from(i) * 100;
            assert!(seen.first_time(nonce, now + 60_000, now));
        }
        assert!(
            seen.until.len() <= 2 * 601 + SWEEP_MIN,
            "{}",
            seen.until.len()
        );
    }
}
