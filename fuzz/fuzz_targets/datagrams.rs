//! Arbitrary bytes as heartbeat and ack datagrams.
#![no_main]

use kv_wire::heartbeat::{Datagram, Heartbeat, HeartbeatAck};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Heartbeat::decode(data);
    let _ = HeartbeatAck::decode(data);
});
