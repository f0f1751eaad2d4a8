//! The sidecar's DNS answer path: any packet gets no answer or one no
//! larger than a DNS message may be, without panicking.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let known = |name: &isthmus_core::naming::ServiceName| {
        (name.namespace == "demo").then_some(IpAddr::V4(Ipv4Addr::new(127, 0, 2, 30)))
    };
    if let Some(answer) = isthmus_sidecar::dns::answer(data, known) {
        assert!(answer.len() <= 65_535);
    }
});
