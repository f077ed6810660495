//! The UDP heartbeat and its ack.
//!
//! A datagram is 2 magic bytes, a version byte, then a MessagePack array.
//! Heartbeats and acks have different magic so that neither is ever taken
//! for the other. Structs encode as arrays (rmp-serde's default), so a
//! heartbeat of the largest possible numbers is 36 bytes: within the
//! 64-byte bound of the contract, with room for a MAC to follow.

use crate::error::DatagramError;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The heartbeat protocol version this build speaks.
pub const DATAGRAM_VERSION: u8 = 1;
/// The largest heartbeat or ack we send or accept.
pub const MAX_DATAGRAM_LEN: usize = 64;
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

    proptest! {
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
