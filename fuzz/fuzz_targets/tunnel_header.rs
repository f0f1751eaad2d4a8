//! The tunnel stream header, both directions: any bytes either fail
//! cleanly, ask for more, or decode to a header that fits in them and
//! round-trips.
#![no_main]

use isthmus_core::tunnel::{TunnelRequest, TunnelResponse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = TunnelRequest::decode(data) {
        assert!(used <= data.len());
        let bytes = req.encode().expect("a decoded request encodes");
        assert_eq!(TunnelRequest::decode(&bytes).unwrap().map(|(r, _)| r), Some(req));
    }
    if let Ok(Some((resp, used))) = TunnelResponse::decode(data) {
        assert!(used <= data.len());
        let bytes = resp.encode().expect("a decoded response encodes");
        assert_eq!(TunnelResponse::decode(&bytes).unwrap().map(|(r, _)| r), Some(resp));
    }
});
