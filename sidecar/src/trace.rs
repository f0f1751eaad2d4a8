//! W3C trace context (`traceparent`), sans-IO: a sidecar continues the
//! caller's trace with a span of its own, or starts a trace when the request
//! carries none, so a request can be followed across clusters.

use std::fmt;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Parse a `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>`. Later
    /// versions are read by the same prefix, as the spec asks; all-zero ids
    /// and version `ff` are invalid.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let [version]: [u8; 1] = hex(parts.next()?)?;
        let trace_id: [u8; 16] = hex(parts.next()?)?;
        let span_id: [u8; 8] = hex(parts.next()?)?;
        let [flags]: [u8; 1] = hex(parts.next()?)?;
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace, sampled.
    pub fn start(trace_id: [u8; 16], span_id: [u8; 8]) -> Self {
        Self {
            trace_id: if trace_id == [0; 16] { [1; 16] } else { trace_id },
            span_id: if span_id == [0; 8] { [1; 8] } else { span_id },
            flags: 1,
        }
    }

    /// This sidecar's span within the caller's trace.
    pub fn child(&self, span_id: [u8; 8]) -> Self {
        Self {
            span_id: if span_id == [0; 8] { [1; 8] } else { span_id },
            ..*self
        }
    }

    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

pub use isthmus_core::identity::hex as to_hex;

impl fmt::Display for TraceContext {
    /// The `traceparent` header value (version 00, which defines only the
    /// sampled flag; other bits are sent as zero).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags & 1
        )
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_spec_example() {
        let t = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), EXAMPLE);
    }

    #[test]
    fn child_keeps_the_trace_and_flags() {
        let t = TraceContext::parse(EXAMPLE).unwrap();
        let c = t.child([7; 8]);
        assert_eq!(c.trace_id, t.trace_id);
        assert_eq!(c.flags, t.flags);
        assert_eq!(c.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-01");
    }

    #[test]
    fn refuses_invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "+0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version with more fields is read by its known prefix.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz").is_some());
    }
}
