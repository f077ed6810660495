//! Length-framed MessagePack: a u32 big-endian length, then the message.
//!
//! Decoding delegates the framing to tokio-util's `LengthDelimitedCodec`,
//! which refuses a frame over the maximum from its header alone, before
//! buffering any of it: a peer announcing 4 GiB costs us 4 bytes. Encoding
//! writes the message straight into the output buffer and patches the length
//! in afterwards, saving a copy per frame on the hot path.

use crate::error::WireError;
use bytes::{BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use std::marker::PhantomData;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

/// Bytes of the length prefix.
const HEADER_LEN: usize = 4;

/// Decodes frames of type `In` and encodes frames of type `Out`: a client
/// uses `FrameCodec<ServerFrame, ClientFrame>`, a server the reverse.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    framer: LengthDelimitedCodec,
    max_frame_len: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames whose body exceeds `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameCodec {
            framer: LengthDelimitedCodec::builder()
                .length_field_length(HEADER_LEN)
                .max_frame_length(max_frame_len)
                .new_codec(),
            max_frame_len,
            _types: PhantomData,
        }
    }

    /// The largest frame body this codec accepts or sends.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        FrameCodec::new(crate::DEFAULT_MAX_FRAME_LEN)
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, WireError> {
        let announced = announced_len(src);
        match self.framer.decode(src) {
            Ok(Some(frame)) => Ok(Some(rmp_serde::from_slice(&frame)?)),
            Ok(None) => Ok(None),
            Err(e) if is_too_large(&e) => Err(WireError::FrameTooLarge {
                len: announced.unwrap_or(0),
                max: self.max_frame_len,
            }),
            Err(e) => Err(e.into()),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = WireError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), WireError> {
        let start = dst.len();
        dst.put_u32(0);
        if let Err(e) = rmp_serde::encode::write(&mut dst.writer(), &item) {
            dst.truncate(start);
            return Err(e.into());
        }
        let len = dst.len() - start - HEADER_LEN;
        match u32::try_from(len) {
            Ok(len32) if len <= self.max_frame_len => {
                dst[start..start + HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
                Ok(())
            }
            _ => {
                dst.truncate(start);
                Err(WireError::FrameTooLarge {
                    len,
                    max: self.max_frame_len,
                })
            }
        }
    }
}

/// The length in the header at the front of `src`, if it is all there.
fn announced_len(src: &[u8]) -> Option<usize> {
    let header: [u8; HEADER_LEN] = src.get(..HEADER_LEN)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(header)).ok()
}

fn is_too_large(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::Version;
    use bytes::Bytes;
    use proptest::prelude::*;

    type ServerSide = FrameCodec<ClientFrame, ServerFrame>;
    type ClientSide = FrameCodec<ServerFrame, ClientFrame>;

    fn entry(key: &str, value: Option<&'static [u8]>) -> Entry {
        Entry {
            key: key.into(),
            version: Version {
                hlc: 42 << 16,
                node: 7,
            },
            value: value.map(Bytes::from_static),
        }
    }

    fn client_frames() -> Vec<ClientFrame> {
        let request = |id, body| ClientFrame::Request { id, body };
        vec![
            ClientFrame::Hello(Hello::new("kv", "worker1")),
            ClientFrame::Hello(Hello {
                nonce: Some([1; 16]),
                ..Hello::new("kv", "worker1")
            }),
            ClientFrame::Proof([2; 32]),
            request(
                1,
                Request::Get {
                    key: "user123".into(),
                    consistency: Consistency::Quorum,
                },
            ),
            request(
                1,
                Request::Get {
                    key: "user123".into(),
                    consistency: Consistency::Owner { epoch: 7 },
                },
            ),
            request(
                2,
                Request::Put {
                    key: "user123".into(),
                    value: Bytes::from_static(b"hello-k8s"),
                },
            ),
            request(
                3,
                Request::Delete {
                    key: "user123".into(),
                },
            ),
            request(
                4,
                Request::PutMany {
                    items: vec![
                        ("a".into(), Bytes::from_static(b"1")),
                        ("b".into(), Bytes::new()),
                    ],
                },
            ),
            request(
                5,
                Request::Replicate {
                    entries: vec![entry("a", Some(b"1")), entry("b", None)],
                },
            ),
            request(
                6,
                Request::Offer {
                    items: vec![("a".into(), Version { hlc: 1, node: 2 })],
                },
            ),
            request(
                7,
                Request::Compare {
                    ranges: vec![(
                        crate::HashRange { start: 0, end: 99 },
                        crate::Digest { count: 2, xor: 7 },
                    )],
                },
            ),
            request(
                8,
                Request::List {
                    range: crate::HashRange::ALL,
                    after: Some("a".into()),
                },
            ),
            request(
                9,
                Request::FetchRange {
                    range: crate::HashRange { start: 5, end: 5 },
                    after: None,
                },
            ),
            request(
                10,
                Request::Fetch {
                    keys: vec!["a".into(), "b".into()],
                },
            ),
            request(
                u64::MAX,
                Request::Topology(Topology {
                    epoch: 9,
                    members: vec![Member {
                        id: "worker1".into(),
                        host: "10.0.0.1".into(),
                        port: 8001,
                        wire_port: 8002,
                        generation: 3,
                    }],
                    leaving: vec![Member {
                        id: "worker2".into(),
                        host: "10.0.0.2".into(),
                        port: 8001,
                        wire_port: 8002,
                        generation: 1,
                    }],
                    down: vec!["worker3".into()],
                    fresh: Vec::new(),
                }),
            ),
        ]
    }

    fn server_frames() -> Vec<ServerFrame> {
        let response = |id, body| ServerFrame::Response { id, body };
        vec![
            ServerFrame::Challenge(Challenge { nonce: [7; 16] }),
            ServerFrame::Welcome(Welcome {
                node: "worker1".into(),
                epoch: 3,
                proof: None,
            }),
            ServerFrame::Welcome(Welcome {
                node: "worker1".into(),
                epoch: 3,
                proof: Some([9; 32]),
            }),
            ServerFrame::Refused(Refusal::new("wrong cluster")),
            response(1, Response::Value(Some(entry("a", Some(b"v"))))),
            response(1, Response::Value(None)),
            response(1, Response::OwnCopy(Some(entry("a", None)))),
            response(
                2,
                Response::Written {
                    version: Version { hlc: 1, node: 2 },
                    acks: 2,
                },
            ),
            response(
                3,
                Response::PutMany(vec![
                    Ok(Version::default()),
                    Err(Failure::new(
                        FailureKind::Quorum,
                        "write quorum not reached: 1 of 2",
                    )),
                ]),
            ),
            response(
                4,
                Response::Replicated {
                    applied: 2,
                    stale: vec![(1, Version { hlc: 9, node: 9 })],
                },
            ),
            response(4, Response::Wanted(vec![0, 3])),
            response(
                4,
                Response::Compared(vec![(1, crate::Digest { count: 0, xor: 0 })]),
            ),
            response(
                4,
                Response::Listed {
                    items: vec![("a".into(), Version { hlc: 1, node: 2 })],
                    next: Some("a".into()),
                },
            ),
            response(
                4,
                Response::Entries {
                    entries: vec![entry("a", Some(b"1")), entry("b", None)],
                    next: None,
                },
            ),
            response(5, Response::TopologyAccepted { epoch: 9 }),
            response(
                6,
                Response::Failed(Failure::new(
                    FailureKind::NotOwner { epoch: 4 },
                    "not owner",
                )),
            ),
        ]
    }

    #[test]
    fn every_frame_round_trips_and_frames_split_anywhere_reassemble() {
        let mut client = ClientSide::default();
        let mut server = ServerSide::default();
        let mut wire = BytesMut::new();
        for frame in client_frames() {
            client.encode(frame, &mut wire).unwrap();
        }
        // Feed the stream a byte at a time: every boundary is a split point.
        let mut decoded = Vec::new();
        let mut buf = BytesMut::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(frame) = server.decode(&mut buf).unwrap() {
                decoded.push(frame);
            }
        }
        assert_eq!(decoded, client_frames());

        let mut wire = BytesMut::new();
        for frame in server_frames() {
            server.encode(frame, &mut wire).unwrap();
        }
        let mut decoded = Vec::new();
        while let Some(frame) = client.decode(&mut wire).unwrap() {
            decoded.push(frame);
        }
        assert_eq!(decoded, server_frames());
        assert!(wire.is_empty());
    }

    #[test]
    fn an_oversize_frame_is_refused_from_its_header_alone() {
        let mut server = ServerSide::new(1024);
        let mut buf = BytesMut::from(&(u32::MAX).to_be_bytes()[..]);
        match server.decode(&mut buf) {
            Err(WireError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, 1024));
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn an_oversize_frame_is_not_sent_and_leaves_the_buffer_as_it_was() {
        let mut client = ClientSide::new(64);
        let mut buf = BytesMut::from(&b"earlier"[..]);
        let big = ClientFrame::Request {
            id: 1,
            body: Request::Put {
                key: "k".into(),
                value: Bytes::from(vec![0; 100]),
            },
        };
        assert!(matches!(
            client.encode(big, &mut buf),
            Err(WireError::FrameTooLarge { max: 64, .. })
        ));
        assert_eq!(&buf[..], b"earlier");
    }

    #[test]
    fn a_well_framed_body_that_is_not_a_message_is_a_decode_error() {
        let mut server = ServerSide::default();
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xc1, 0xc1, 0xc1]); // 0xc1 is never valid MessagePack
        assert!(matches!(server.decode(&mut buf), Err(WireError::Decode(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_either_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut server = ServerSide::new(256);
            while let Ok(Some(_)) = server.decode(&mut buf) {}
            let mut buf = BytesMut::from(&bytes[..]);
            let mut client = ClientSide::new(256);
            while let Ok(Some(_)) = client.decode(&mut buf) {}
        }

        #[test]
        fn arbitrary_bodies_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(&body);
            let _ = ServerSide::default().decode(&mut buf.clone());
            let _ = ClientSide::default().decode(&mut buf);
        }

        #[test]
        fn truncated_frames_wait_for_more_instead_of_failing(cut in 0usize..64) {
            let mut wire = BytesMut::new();
            ClientSide::default().encode(client_frames()[4].clone(), &mut wire).unwrap();
            let cut = cut.min(wire.len() - 1);
            let mut partial = BytesMut::from(&wire[..cut]);
            prop_assert!(ServerSide::default().decode(&mut partial).unwrap().is_none());
        }
    }
}
