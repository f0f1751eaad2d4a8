//! The TrafficPolicy parser: any YAML document is refused with an error or
//! becomes a policy that validates.
#![no_main]

use isthmus_core::policy::{PolicyDocument, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(doc) = serde_saphyr::from_str::<PolicyDocument>(text) else { return };
    if let Ok(policy) = doc.to_proto() {
        validate(&policy).expect("a converted policy is valid");
    }
});
