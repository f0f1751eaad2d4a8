//! What goes wrong on the data path, and how each failure is told to the
//! caller: an HTTP status and an `x-isthmus-error` kind, decided here once.
//! The kind a serving sidecar puts on its answer is read back (once) by the
//! calling sidecar, whose retry decision works on the parsed kind.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use isthmus_core::local::error_chain;
use isthmus_core::tls::TlsError;
use isthmus_core::tunnel::{HeaderError, RefuseCode};

use crate::body::{Body, full};
use crate::route::RouteError;

/// A machine-readable reason on responses a sidecar produced itself.
pub const ERROR_HEADER: &str = "x-isthmus-error";

/// Why a sidecar answered a request itself. Each kind has one name, used as
/// the `x-isthmus-error` value and in logs (docs/cli.md lists them all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request named no mesh service, or its body broke off.
    BadRequest,
    /// No local workload serves the service and no linked cluster exports it.
    UnknownService,
    /// The request named a port the service does not serve.
    PortMismatch,
    /// The service has nowhere to go now.
    NoEndpoints,
    /// Another cluster is needed and this cluster's gateway is not running.
    NoGateway,
    /// The endpoint, the gateway or the end-to-end session could not be reached.
    ConnectFailed,
    /// A gateway refused the tunnel (its reason is in the body).
    TunnelRefused,
    /// The session with the serving sidecar failed before an answer.
    UpstreamFailed,
    /// No answer within the request timeout.
    Timeout,
    /// Too many requests in flight to the service from this workload.
    Overloaded,
    /// A caller from another cluster asked for a service not exported.
    NotExported,
    /// A caller's cluster is no longer linked (a session older than the
    /// unlink).
    NotLinked,
    /// The workload behind this sidecar serves no service.
    NoService,
    /// The serving sidecar's app refused the connection: nothing delivered.
    AppUnavailable,
    /// The serving sidecar's app took the request but gave no answer.
    AppFailed,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::BadRequest,
        ErrorKind::UnknownService,
        ErrorKind::PortMismatch,
        ErrorKind::NoEndpoints,
        ErrorKind::NoGateway,
        ErrorKind::ConnectFailed,
        ErrorKind::TunnelRefused,
        ErrorKind::UpstreamFailed,
        ErrorKind::Timeout,
        ErrorKind::Overloaded,
        ErrorKind::NotExported,
        ErrorKind::NotLinked,
        ErrorKind::NoService,
        ErrorKind::AppUnavailable,
        ErrorKind::AppFailed,
    ];

    /// The `x-isthmus-error` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::UnknownService => "unknown-service",
            ErrorKind::PortMismatch => "port-mismatch",
            ErrorKind::NoEndpoints => "no-endpoints",
            ErrorKind::NoGateway => "no-gateway",
            ErrorKind::ConnectFailed => "connect-failed",
            ErrorKind::TunnelRefused => "tunnel-refused",
            ErrorKind::UpstreamFailed => "upstream-failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::NotExported => "not-exported",
            ErrorKind::NotLinked => "not-linked",
            ErrorKind::NoService => "no-service",
            ErrorKind::AppUnavailable => "app-unavailable",
            ErrorKind::AppFailed => "app-failed",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotExported | ErrorKind::NotLinked => StatusCode::FORBIDDEN,
            ErrorKind::NoService => StatusCode::NOT_FOUND,
            ErrorKind::UnknownService
            | ErrorKind::PortMismatch
            | ErrorKind::NoEndpoints
            | ErrorKind::NoGateway
            | ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ConnectFailed
            | ErrorKind::TunnelRefused
            | ErrorKind::UpstreamFailed
            | ErrorKind::AppUnavailable
            | ErrorKind::AppFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn parse(s: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str().as_bytes() == s)
    }

    /// The kind a sidecar put on `resp`, if a sidecar made it: the header
    /// and the status must agree (apps cannot set the header; the serving
    /// sidecar removes it from their answers).
    pub fn of<B>(resp: &Response<B>) -> Option<Self> {
        let kind = Self::parse(resp.headers().get(ERROR_HEADER)?.as_bytes())?;
        (kind.status() == resp.status()).then_some(kind)
    }

    /// This sidecar's answer of this kind: `isthmus: <msg>` as plain text.
    pub fn response(self, msg: &str) -> Response<Body> {
        let mut r = Response::new(full(Bytes::from(format!("isthmus: {msg}\n"))));
        *r.status_mut() = self.status();
        r.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(self.as_str()));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }
}

/// Why an end-to-end session could not be opened: nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Tcp { addr: String, source: std::io::Error },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("mTLS handshake with {peer}: {source}")]
    Handshake { peer: String, source: std::io::Error },
    #[error("HTTP/2 with {peer}: {source}")]
    Http2 { peer: String, source: hyper::Error },
    #[error("gateway {gateway}: {source}")]
    Tunnel { gateway: String, source: HeaderError },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why an outbound request could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no host: send it through this sidecar as an HTTP proxy or with a Host header")]
    NoHost,
    #[error(
        "CONNECT tunnels are not offered: send HTTP requests to this proxy, or dial the service's port on the sidecar's DNS address (--dns-addr) for any other TCP"
    )]
    Connect405,
    #[error("{0} is not a mesh service name (expected <name>.<namespace>.svc.clusterset.local)")]
    NotMeshName(String),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("cluster {0} has no gateway running, so other clusters are unreachable")]
    NoGateway(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{cluster} refused the tunnel ({}): {reason}", code.as_str())]
    Refused {
        cluster: String,
        code: RefuseCode,
        reason: String,
    },
    #[error("upstream: {}", error_chain(.0))]
    Upstream(#[source] hyper::Error),
    #[error("reading the request body: {}", error_chain(.0))]
    ClientBody(#[source] hyper::Error),
    #[error(
        "{service} has {limit} requests in flight from this workload already (the sidecar's --max-requests-per-service)"
    )]
    Overloaded { service: String, limit: usize },
    #[error("no response within {0:?} (the route's timeout, or the sidecar's --request-timeout)")]
    Timeout(Duration),
    #[error("no response within {0:?} (the route's retries.perTryTimeout), and no attempt left")]
    TryTimeout(Duration),
}

impl ProxyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::NoHost | ProxyError::NotMeshName(_) | ProxyError::ClientBody(_) | ProxyError::Connect405 => {
                ErrorKind::BadRequest
            }
            ProxyError::Route(RouteError::UnknownService { .. }) => ErrorKind::UnknownService,
            ProxyError::Route(RouteError::PortMismatch { .. }) => ErrorKind::PortMismatch,
            ProxyError::Route(_) => ErrorKind::NoEndpoints,
            ProxyError::NoGateway(_) => ErrorKind::NoGateway,
            ProxyError::Connect(_) => ErrorKind::ConnectFailed,
            ProxyError::Refused { .. } => ErrorKind::TunnelRefused,
            ProxyError::Upstream(_) => ErrorKind::UpstreamFailed,
            ProxyError::Timeout(_) | ProxyError::TryTimeout(_) => ErrorKind::Timeout,
            ProxyError::Overloaded { .. } => ErrorKind::Overloaded,
        }
    }

    pub fn response(&self) -> Response<Body> {
        self.kind().response(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_one_name_and_reads_back() {
        let mut names: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str().as_bytes()), Some(k));
            assert_eq!(ErrorKind::of(&k.response("x")), Some(k));
        }
        // A header whose status does not match is not a sidecar's answer.
        let mut r = ErrorKind::AppFailed.response("x");
        *r.status_mut() = StatusCode::OK;
        assert_eq!(ErrorKind::of(&r), None);
    }
}
