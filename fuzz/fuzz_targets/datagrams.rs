//! Arbitrary bytes as heartbeat and ack datagrams, plain and sealed.
#![no_main]

use kv_wire::heartbeat::{Datagram, Heartbeat, HeartbeatAck};
use kv_wire::ClusterSecret;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static SECRET: LazyLock<ClusterSecret> =
    LazyLock::new(|| ClusterSecret::new(b"fuzzing-secret-0123456789").expect("long enough"));

fuzz_target!(|data: &[u8]| {
    let _ = Heartbeat::decode(data);
    let _ = HeartbeatAck::decode(data);
    let _ = Heartbeat::open(data, Some(&SECRET));
    let _ = HeartbeatAck::open(data, Some(&SECRET), 1, 1);
});
