//! The join-token decoder: any string either fails cleanly or decodes to a
//! token that encodes back to one decoding to the same token. The input is
//! tried as a whole token, and as the payload of one with a valid
//! checksum (so the payload parser and its checks are reached).
#![no_main]

use isthmus_core::token::{JoinToken, seal};
use libfuzzer_sys::fuzz_target;

fn check(s: &str) {
    if let Ok(tok) = JoinToken::decode(s) {
        let again = JoinToken::decode(&tok.encode()).expect("an encoded token decodes");
        assert_eq!(again, tok);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check(s);
    }
    check(&seal(data));
});
