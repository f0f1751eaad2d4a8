//! Protocol detection on a service port: HTTP (1.1 or HTTP/2 with prior
//! knowledge, so gRPC too) or opaque TCP, from the client's first bytes.

use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Opaque,
}

/// What an HTTP client's first bytes can be: a request line's method and
/// its space, or the HTTP/2 connection preface.
const HTTP_STARTS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2.0\r\n",
];

/// The protocol `prefix` begins, or `None` while it is too short to say.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let mut undecided = false;
    for start in HTTP_STARTS {
        if prefix.starts_with(start) {
            return Some(Protocol::Http);
        }
        undecided |= start.starts_with(prefix);
    }
    if undecided { None } else { Some(Protocol::Opaque) }
}

/// Peek at the client's first bytes (leaving them to be read) until they
/// decide. A client that says nothing for `timeout` speaks a server-first
/// protocol (SMTP, MySQL, ...): opaque. `None` if it closed.
pub async fn detect(tcp: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 18];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Err(_) => return Some(Protocol::Opaque),
            Ok(Err(_)) | Ok(Ok(0)) => return None,
            Ok(Ok(n)) => n,
        };
        if let Some(p) = classify(&buf[..n]) {
            return Some(p);
        }
        // More bytes are needed than have arrived; peek returns at once
        // while any are queued, so wait a moment before looking again.
        if n == seen {
            if tokio::time::Instant::now() >= deadline {
                return Some(Protocol::Opaque);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Protocol::Http));
        // Too short to tell yet.
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        // Not HTTP: a TLS ClientHello, a Redis command, a lowercase method.
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
    }
}
