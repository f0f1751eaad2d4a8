//! HTTP/1.1 `Upgrade` (WebSocket and the like) across the mesh.
//!
//! The app's upgrade request rides the pooled HTTP/2 session to the serving
//! sidecar as an extended CONNECT (RFC 8441) whose `:protocol` names what it
//! upgrades to; the serving sidecar makes it an HTTP/1.1 upgrade to its app
//! again, answers the CONNECT with 200 once the app switched protocols, and
//! the client sidecar answers its app 101. From then on the two upgraded
//! streams are joined end to end, inside the same mTLS session (and QUIC
//! tunnel) as every other request between the two sidecars. The
//! `Sec-WebSocket-*` headers travel end to end, so the app's handshake is
//! checked by the client's own library.

use std::net::SocketAddr;

use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{Body, empty};
use crate::error::ErrorKind;

/// The protocol an HTTP/1.x request asks to switch to, if it is one the
/// sidecar carries across: not `h2c`, which is for this hop alone (and is
/// declined by answering in HTTP/1.1, as RFC 9110 allows).
pub fn requested<B>(req: &Request<B>) -> Option<String> {
    if req.version() >= Version::HTTP_2 || req.method() != Method::GET {
        return None;
    }
    let upgrade = req
        .headers()
        .get(CONNECTION)?
        .to_str()
        .ok()?
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !upgrade {
        return None;
    }
    let proto = req.headers().get(UPGRADE)?.to_str().ok()?.split(',').next()?.trim();
    if proto.is_empty() || proto.eq_ignore_ascii_case("h2c") {
        return None;
    }
    Some(proto.to_string())
}

/// Join two upgraded connections until either side closes.
fn join(a: hyper::upgrade::OnUpgrade, b: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(a, b) {
            Ok((a, b)) => {
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade not completed"),
        }
    });
}

/// Client side: the app's upgrade request as an extended CONNECT on the
/// mesh hop. Its caller sends it; `switched` makes the answer.
pub fn as_connect(req: &mut Request<Incoming>, protocol: &str) -> hyper::upgrade::OnUpgrade {
    let downstream = hyper::upgrade::on(&mut *req);
    *req.method_mut() = Method::CONNECT;
    req.extensions_mut().insert(hyper::ext::Protocol::from(protocol));
    downstream
}

/// Client side: the serving sidecar's answer to the CONNECT. 2xx: the app
/// switched, so the local app gets 101 and the streams are joined; else the
/// answer (the app's refusal, or the mesh's) goes back as it is.
pub fn switched(mut resp: Response<Incoming>, protocol: &str, downstream: hyper::upgrade::OnUpgrade) -> Response<Body> {
    if !resp.status().is_success() {
        return resp.map(|b| b.boxed());
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let mut out = Response::new(empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = end_to_end(resp.headers());
    out.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(protocol) {
        out.headers_mut().insert(UPGRADE, v);
    }
    join(downstream, upstream);
    out
}

/// Serving side: an extended CONNECT from the mesh, made an HTTP/1.1
/// upgrade to the app at `app` (on a connection of its own), with `extra`
/// headers (the caller's identity) added.
pub async fn to_app(mut req: Request<Body>, app: SocketAddr, extra: HeaderMap) -> Response<Body> {
    let Some(protocol) = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(|p| p.as_str().to_string())
    else {
        return ErrorKind::BadRequest.response("CONNECT without :protocol is not carried to apps");
    };
    let downstream = hyper::upgrade::on(&mut req);
    let authority = req.uri().authority().map(|a| a.to_string());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut up = Request::new(empty());
    *up.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(_) => return ErrorKind::BadRequest.response("unparseable path"),
    };
    *up.headers_mut() = end_to_end(req.headers());
    up.headers_mut().extend(extra);
    if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
        up.headers_mut().insert(HOST, a);
    }
    up.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
    match HeaderValue::from_str(&protocol) {
        Ok(v) => up.headers_mut().insert(UPGRADE, v),
        Err(_) => return ErrorKind::BadRequest.response("unusable :protocol"),
    };
    let tcp = match TcpStream::connect(app).await {
        Ok(t) => t,
        Err(e) => {
            return ErrorKind::AppUnavailable.response(&format!("the workload at {app} refuses connections: {e}"));
        }
    };
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(h) => h,
        Err(e) => return ErrorKind::AppFailed.response(&format!("the workload at {app}: {e}")),
    };
    tokio::spawn(conn.with_upgrades());
    let mut resp = match send.send_request(up).await {
        Ok(r) => r,
        Err(e) => return ErrorKind::AppFailed.response(&format!("the workload at {app} did not answer: {e}")),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp.map(|b| b.boxed());
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let mut out = Response::new(empty());
    *out.headers_mut() = end_to_end(resp.headers());
    join(downstream, upstream);
    out
}

/// The headers of a message without the connection-specific ones (RFC
/// 9110 section 7.6.1) and those naming a body that an upgrade has none of.
fn end_to_end(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
    crate::outbound::strip_hop_by_hop(&mut out);
    out.remove(http::header::CONTENT_LENGTH);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(connection: &str, upgrade: &str) -> Request<()> {
        Request::get("http://ws.demo.svc.clusterset.local/")
            .header(CONNECTION, connection)
            .header(UPGRADE, upgrade)
            .body(())
            .unwrap()
    }

    #[test]
    fn which_upgrades_are_carried() {
        assert_eq!(requested(&req("Upgrade", "websocket")).as_deref(), Some("websocket"));
        assert_eq!(
            requested(&req("keep-alive, upgrade", "WebSocket")).as_deref(),
            Some("WebSocket")
        );
        assert_eq!(
            requested(&req("Upgrade, HTTP2-Settings", "h2c")),
            None,
            "h2c is this hop's"
        );
        assert_eq!(
            requested(&req("keep-alive", "websocket")),
            None,
            "Connection must name it"
        );
        let mut post = req("upgrade", "websocket");
        *post.method_mut() = Method::POST;
        assert_eq!(requested(&post), None);
    }
}
