//! Arbitrary bytes into both wire decoders, as a stream: every frame they
//! yield, every error they return is fine; a panic, a hang or an
//! allocation beyond the frame limit is a bug.
#![no_main]

use bytes::BytesMut;
use kv_wire::{ClientFrame, FrameCodec, ServerFrame};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut server = FrameCodec::<ClientFrame, ServerFrame>::new(64 * 1024);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = server.decode(&mut buf) {}
    let mut client = FrameCodec::<ServerFrame, ClientFrame>::new(64 * 1024);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = client.decode(&mut buf) {}
});
