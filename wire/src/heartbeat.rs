//! The UDP heartbeat and its ack.
//!
//! A datagram is 2 magic bytes, a version byte, then a MessagePack array.
//! Heartbeats and acks have different magic so that neither is ever taken
//! for the other. Structs encode as arrays (rmp-serde's default), so a
//! heartbeat of the largest possible numbers is 36 bytes: within the
//! 64-byte bound of the contract, with room for a MAC to follow.
//!
//! With a cluster secret, datagrams are *sealed*: a heartbeat is followed by
//! a 32-byte HMAC tag (68 bytes at most, within the 96 the contract allows),
//! and an ack by the sequence number of the heartbeat it answers and a tag
//! that also covers that heartbeat's member and generation. So a forged
//! datagram fails its tag, a replayed heartbeat carries a sequence number
//! the controller has seen (it keeps the highest per worker), and a
//! replayed ack answers a heartbeat the worker is no longer waiting for.

use crate::auth::{ClusterSecret, Purpose, TAG_LEN};
use crate::error::DatagramError;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The heartbeat protocol version this build speaks.
pub const DATAGRAM_VERSION: u8 = 1;
/// The largest heartbeat or ack we send or accept.
pub const MAX_DATAGRAM_LEN: usize = 64;
/// The largest sealed heartbeat or ack (with a cluster secret).
pub const MAX_SEALED_LEN: usize = 96;
/// The bytes an ack's seal adds: the answered sequence number and a tag.
const ACK_SEAL_LEN: usize = 8 + TAG_LEN;
/// Magic + version.
const HEADER_LEN: usize = 3;

/// "I am alive", from a worker to the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The small number the controller gave the worker at registration.
    pub member: u32,
    /// The worker's incarnation; heartbeats of older ones are ignored.
    pub generation: u64,
    /// Increases with each heartbeat, for loss accounting.
    pub seq: u64,
    /// The topology epoch the worker holds, so the controller sees laggards.
    pub epoch_seen: u64,
}

/// The controller's answer to each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The current topology epoch: a worker behind it catches up.
    pub epoch: u64,
    /// Changes when the controller restarts: the worker registers again.
    pub incarnation: u64,
}

/// A datagram type: its magic and its body.
pub trait Datagram: Serialize + DeserializeOwned {
    /// The two bytes that open this kind of datagram.
    const MAGIC: [u8; 2];

    /// The datagram's bytes.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_DATAGRAM_LEN);
        out.extend_from_slice(&Self::MAGIC);
        out.push(DATAGRAM_VERSION);
        // Writing plain integers into a Vec cannot fail.
        rmp_serde::encode::write(&mut out, self).expect("heartbeat encodes into a Vec");
        debug_assert!(out.len() <= MAX_DATAGRAM_LEN);
        out
    }

    /// Parses a datagram, rejecting wrong sizes, magic, versions, bodies
    /// and trailing bytes.
    fn decode(datagram: &[u8]) -> Result<Self, DatagramError> {
        let len = datagram.len();
        if !(HEADER_LEN..=MAX_DATAGRAM_LEN).contains(&len) {
            return Err(DatagramError::Size { len });
        }
        if datagram[..2] != Self::MAGIC {
            return Err(DatagramError::Magic);
        }
        if datagram[2] != DATAGRAM_VERSION {
            return Err(DatagramError::Version(datagram[2]));
        }
        let mut body = &datagram[HEADER_LEN..];
        let value = Self::deserialize(&mut rmp_serde::Deserializer::new(&mut body))
            .map_err(|_| DatagramError::Malformed)?;
        if body.is_empty() {
            Ok(value)
        } else {
            Err(DatagramError::Malformed)
        }
    }
}

impl Datagram for Heartbeat {
    const MAGIC: [u8; 2] = *b"kH";
}

impl Datagram for HeartbeatAck {
    const MAGIC: [u8; 2] = *b"kA";
}

impl Heartbeat {
    /// The datagram to send: plain, or sealed with the secret.
    pub fn seal(&self, secret: Option<&ClusterSecret>) -> Vec<u8> {
        let mut out = self.encode();
        if let Some(secret) = secret {
            let tag = secret.tag(Purpose::Heartbeat, &[&out]);
            out.extend_from_slice(&tag);
        }
        out
    }

    /// Parses a received datagram: plain without a secret; with one, only
    /// if its tag is right. (Freshness, a sequence number above the last
    /// one seen, is the receiver's to check: it alone knows the last one.)
    pub fn open(
        datagram: &[u8],
        secret: Option<&ClusterSecret>,
    ) -> Result<Heartbeat, DatagramError> {
        let Some(secret) = secret else {
            return Heartbeat::decode(datagram);
        };
        let (body, tag) = split_seal(datagram, TAG_LEN)?;
        if !secret.verify(Purpose::Heartbeat, &[body], tag) {
            return Err(DatagramError::Unauthenticated);
        }
        Heartbeat::decode(body)
    }
}

impl HeartbeatAck {
    /// The datagram answering `heartbeat`: plain, or sealed with the secret
    /// and bound to that heartbeat.
    pub fn seal(&self, heartbeat: &Heartbeat, secret: Option<&ClusterSecret>) -> Vec<u8> {
        let mut out = self.encode();
        if let Some(secret) = secret {
            let seq = heartbeat.seq.to_be_bytes();
            let whom = whom(heartbeat.member, heartbeat.generation);
            let tag = secret.tag(Purpose::Ack, &[&out, &seq, &whom]);
            out.extend_from_slice(&seq);
            out.extend_from_slice(&tag);
        }
        out
    }

    /// Parses an ack received by the worker `member` at `generation`: plain
    /// without a secret; with one, only if its tag is right, returning the
    /// sequence number of the heartbeat it answers too.
    pub fn open(
        datagram: &[u8],
        secret: Option<&ClusterSecret>,
        member: u32,
        generation: u64,
    ) -> Result<(HeartbeatAck, Option<u64>), DatagramError> {
        let Some(secret) = secret else {
            return Ok((HeartbeatAck::decode(datagram)?, None));
        };
        let (body, seal) = split_seal(datagram, ACK_SEAL_LEN)?;
        let (seq, tag) = seal.split_at(8);
        if !secret.verify(Purpose::Ack, &[body, seq, &whom(member, generation)], tag) {
            return Err(DatagramError::Unauthenticated);
        }
        let seq = u64::from_be_bytes(seq.try_into().map_err(|_| DatagramError::Malformed)?);
        Ok((HeartbeatAck::decode(body)?, Some(seq)))
    }
}

/// Whom an ack answers, as its tag covers it: so an ack for one worker is
/// no good to another.
fn whom(member: u32, generation: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&member.to_be_bytes());
    out[4..].copy_from_slice(&generation.to_be_bytes());
    out
}

/// Splits a sealed datagram into its body and its last `seal_len` bytes.
fn split_seal(datagram: &[u8], seal_len: usize) -> Result<(&[u8], &[u8]), DatagramError> {
    let len = datagram.len();
    if len > MAX_SEALED_LEN || len < HEADER_LEN + seal_len {
        return Err(DatagramError::Size { len });
    }
    Ok(datagram.split_at(len - seal_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LARGEST: Heartbeat = Heartbeat {
        member: u32::MAX,
        generation: u64::MAX,
        seq: u64::MAX,
        epoch_seen: u64::MAX,
    };

    #[test]
    fn the_largest_heartbeat_fits_the_bound_and_round_trips() {
        let bytes = LARGEST.encode();
        assert!(bytes.len() <= MAX_DATAGRAM_LEN, "{} bytes", bytes.len());
        assert_eq!(Heartbeat::decode(&bytes), Ok(LARGEST));
        let small = Heartbeat {
            member: 1,
            generation: 1,
            seq: 5,
            epoch_seen: 2,
        };
        assert_eq!(small.encode().len(), 8);
        assert_eq!(Heartbeat::decode(&small.encode()), Ok(small));
        let ack = HeartbeatAck {
            epoch: u64::MAX,
            incarnation: u64::MAX,
        };
        assert_eq!(HeartbeatAck::decode(&ack.encode()), Ok(ack));
    }

    #[test]
    fn wrong_magic_version_size_body_or_trailing_bytes_are_rejected() {
        let good = Heartbeat {
            member: 1,
            generation: 1,
            seq: 1,
            epoch_seen: 1,
        }
        .encode();
        // An ack's magic is not a heartbeat's.
        let ack = HeartbeatAck {
            epoch: 1,
            incarnation: 1,
        }
        .encode();
        assert_eq!(Heartbeat::decode(&ack), Err(DatagramError::Magic));
        let mut v2 = good.clone();
        v2[2] = 2;
        assert_eq!(Heartbeat::decode(&v2), Err(DatagramError::Version(2)));
        assert_eq!(
            Heartbeat::decode(&good[..2]),
            Err(DatagramError::Size { len: 2 })
        );
        assert_eq!(
            Heartbeat::decode(&[0; 65]),
            Err(DatagramError::Size { len: 65 })
        );
        assert_eq!(
            Heartbeat::decode(&good[..good.len() - 1]),
            Err(DatagramError::Malformed)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Heartbeat::decode(&trailing), Err(DatagramError::Malformed));
    }

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn sealed_datagrams_fit_the_bound_and_open_with_the_secret_only() {
        let s = secret("0123456789abcdef");
        let sealed = LARGEST.seal(Some(&s));
        assert!(sealed.len() <= MAX_SEALED_LEN, "{} bytes", sealed.len());
        assert_eq!(sealed.len(), LARGEST.encode().len() + TAG_LEN);
        assert_eq!(Heartbeat::open(&sealed, Some(&s)), Ok(LARGEST));
        // Another secret, a plain heartbeat, any flipped byte: refused.
        let other = secret("fedcba9876543210");
        assert_eq!(
            Heartbeat::open(&sealed, Some(&other)),
            Err(DatagramError::Unauthenticated)
        );
        let plain = LARGEST.encode();
        assert!(Heartbeat::open(&plain, Some(&s)).is_err());
        for i in 0..sealed.len() {
            let mut forged = sealed.clone();
            forged[i] ^= 1;
            assert_eq!(
                Heartbeat::open(&forged, Some(&s)),
                Err(DatagramError::Unauthenticated),
                "byte {i}"
            );
        }
        // A receiver without a secret does not take a sealed heartbeat.
        assert_eq!(
            Heartbeat::open(&sealed, None),
            Err(DatagramError::Size { len: sealed.len() })
        );
        assert_eq!(Heartbeat::open(&plain, None), Ok(LARGEST));
    }

    #[test]
    fn a_sealed_ack_is_bound_to_the_heartbeat_it_answers() {
        let s = secret("0123456789abcdef");
        let hb = Heartbeat {
            member: 3,
            generation: 9,
            seq: 41,
            epoch_seen: 2,
        };
        let ack = HeartbeatAck {
            epoch: u64::MAX,
            incarnation: u64::MAX,
        };
        let sealed = ack.seal(&hb, Some(&s));
        assert!(sealed.len() <= MAX_SEALED_LEN, "{} bytes", sealed.len());
        assert_eq!(
            HeartbeatAck::open(&sealed, Some(&s), 3, 9),
            Ok((ack, Some(41)))
        );
        // For another member or generation, or under another secret: refused.
        assert_eq!(
            HeartbeatAck::open(&sealed, Some(&s), 4, 9),
            Err(DatagramError::Unauthenticated)
        );
        assert_eq!(
            HeartbeatAck::open(&sealed, Some(&s), 3, 8),
            Err(DatagramError::Unauthenticated)
        );
        assert_eq!(
            HeartbeatAck::open(&sealed, Some(&secret("fedcba9876543210")), 3, 9),
            Err(DatagramError::Unauthenticated)
        );
        // The answered sequence number cannot be changed.
        let mut moved = sealed.clone();
        let at = sealed.len() - TAG_LEN - 1;
        moved[at] ^= 1;
        assert_eq!(
            HeartbeatAck::open(&moved, Some(&s), 3, 9),
            Err(DatagramError::Unauthenticated)
        );
        // Without a secret an ack is plain, and says nothing of a sequence.
        assert_eq!(
            HeartbeatAck::open(&ack.seal(&hb, None), None, 3, 9),
            Ok((ack, None))
        );
        assert!(HeartbeatAck::open(&ack.encode(), Some(&s), 3, 9).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_sealed_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let s = secret("0123456789abcdef");
            let _ = Heartbeat::open(&bytes, Some(&s));
            let _ = HeartbeatAck::open(&bytes, Some(&s), 1, 1);
        }

        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Heartbeat::decode(&bytes);
            let _ = HeartbeatAck::decode(&bytes);
        }

        #[test]
        fn arbitrary_bodies_after_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..61)) {
            let mut bytes = b"kH\x01".to_vec();
            bytes.extend_from_slice(&body);
            let _ = Heartbeat::decode(&bytes);
        }

        #[test]
        fn every_heartbeat_round_trips(member: u32, generation: u64, seq: u64, epoch_seen: u64) {
            let hb = Heartbeat { member, generation, seq, epoch_seen };
            prop_assert_eq!(Heartbeat::decode(&hb.encode()), Ok(hb));
        }
    }
}
