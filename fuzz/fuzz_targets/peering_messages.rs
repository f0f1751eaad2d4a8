//! Messages a peer or a component sends: peering stream messages, join
//! requests, registrations and config snapshots decode or fail cleanly,
//! and what decodes re-encodes to the same message.
#![no_main]

use isthmus_proto::{ConfigSnapshot, JoinRequest, PeerMessage, WatchRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let again = M::decode(m.encode_to_vec().as_slice()).expect("an encoded message decodes");
        assert_eq!(again, m);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<PeerMessage>(data);
    round_trip::<JoinRequest>(data);
    round_trip::<WatchRequest>(data);
    round_trip::<ConfigSnapshot>(data);
});
