//! What the sidecar knows of gRPC (pure): a call's deadline from its
//! `grpc-timeout`, and the sidecar's own failures told in gRPC's terms, so a
//! gRPC client sees a status code (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
//! rather than an HTTP error it would have to guess at.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{Body, empty};
use crate::error::{ERROR_HEADER, ErrorKind};

pub const GRPC_TIMEOUT: &str = "grpc-timeout";

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A trailers-only gRPC answer of UNAVAILABLE (14): the server did not
/// take the call up, so it may go to another endpoint.
pub fn unavailable(h: &HeaderMap) -> bool {
    h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"14")
}

/// The call's deadline from its `grpc-timeout` (at most 8 digits and a
/// unit: H, M, S, m, u, n), if it has a valid one.
pub fn timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-timeout` for what is left of a call, in milliseconds (rounded
/// up, so a call with time left never reads as already expired).
pub fn timeout_value(left: Duration) -> HeaderValue {
    let ms = left.as_micros().div_ceil(1000).clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit")
}

/// The gRPC status code for a sidecar's own failure.
pub fn code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Timeout => 4,                              // DEADLINE_EXCEEDED
        ErrorKind::Overloaded => 8,                           // RESOURCE_EXHAUSTED
        ErrorKind::NotExported | ErrorKind::NotLinked => 7,   // PERMISSION_DENIED
        ErrorKind::BadRequest => 13,                          // INTERNAL: the request could not be understood
        ErrorKind::PortMismatch | ErrorKind::NoService => 12, // UNIMPLEMENTED
        ErrorKind::UnknownService
        | ErrorKind::NoEndpoints
        | ErrorKind::NoGateway
        | ErrorKind::ConnectFailed
        | ErrorKind::TunnelRefused
        | ErrorKind::UpstreamFailed
        | ErrorKind::AppUnavailable
        | ErrorKind::AppFailed => 14, // UNAVAILABLE
    }
}

/// A sidecar's own answer to a gRPC call, told as a trailers-only gRPC
/// response (HTTP 200, `grpc-status`, `grpc-message`); `x-isthmus-error`
/// stays for whoever looks. Any other response passes as it is.
pub fn as_grpc(resp: Response<Body>, message: Option<&str>) -> Response<Body> {
    let Some(kind) = ErrorKind::of(&resp) else {
        return resp;
    };
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(code(kind))));
    let msg = message.unwrap_or(kind.as_str());
    h.insert("grpc-message", percent_encode(msg));
    h.insert(ERROR_HEADER, HeaderValue::from_static(kind.as_str()));
    r
}

/// `grpc-message` is percent-encoded UTF-8 (space and printable ASCII but
/// `%` go as they are).
fn percent_encode(s: &str) -> HeaderValue {
    let mut out = String::with_capacity(s.len());
    for b in s.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_maybe_shared(Bytes::from(out)).expect("printable ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(k: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn grpc_timeout_units() {
        let t = |v| timeout(&headers(GRPC_TIMEOUT, v));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("5000u"), Some(Duration::from_millis(5)));
        assert_eq!(t("12345678n"), Some(Duration::from_nanos(12_345_678)));
        for bad in ["", "m", "10", "10x", "-1m", "123456789m", "1.5S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(timeout_value(Duration::from_micros(1500)), "2m");
        assert_eq!(timeout_value(Duration::ZERO), "1m");
    }

    #[test]
    fn sidecar_failures_become_grpc_statuses() {
        let r = as_grpc(ErrorKind::Timeout.response("x"), Some("no answer within 300ms"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["grpc-message"], "no answer within 300ms");
        assert_eq!(r.headers()[ERROR_HEADER], "timeout");
        let r = as_grpc(ErrorKind::UnknownService.response("x"), Some("100% gone\n"));
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "100%25 gone");
        // The app's own answers pass untouched.
        let mut app = Response::new(empty());
        *app.status_mut() = StatusCode::NOT_FOUND;
        assert_eq!(as_grpc(app, None).status(), StatusCode::NOT_FOUND);
        assert!(unavailable(&headers("grpc-status", "14")));
        assert!(is_grpc(&headers("content-type", "application/grpc+proto")));
    }
}
