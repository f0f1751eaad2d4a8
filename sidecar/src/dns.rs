//! DNS for `clusterset.local` names, so an unchanged client can dial
//! `echo.demo.svc.clusterset.local:8080`: the sidecar answers every known
//! service name with its own outbound address, where it listens on each
//! service port (see `ports`), or in transparent mode with the service's
//! virtual IP, whose connections the redirection brings to it (`vip`).
//!
//! The answer is decided by a pure function over the query bytes
//! (`answer`); the UDP and TCP loops around it only move bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use isthmus_core::naming::ServiceName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// The zone answered for: Kubernetes MCS names, `<svc>.<ns>.svc.clusterset.local`.
const ZONE: &str = "clusterset.local";

/// Answers change as services come and go: clients should not keep them.
const TTL_SECS: u32 = 5;

/// TCP DNS connections open at once, at most; more are closed at once (a
/// client needs one or two: TCP is the fallback for long answers).
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP DNS connection that sends nothing (between messages, or in the
/// middle of one) for this long is closed (RFC 7766 6.2.3).
pub const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// The reply to one DNS message, or `None` for bytes that are not a query
/// (dropped, as a resolver does with garbage).
///
/// - a known service: the address `resolve` gives it;
/// - another name under `clusterset.local`: NXDOMAIN;
/// - a name elsewhere: REFUSED, since this is no recursive resolver.
pub fn answer(packet: &[u8], resolve: impl Fn(&ServiceName) -> Option<IpAddr>) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.queries = query.queries.clone();
    let code = match (query.metadata.op_code, query.queries.as_slice()) {
        (OpCode::Query, [q]) => {
            let name = q.name().to_ascii();
            let host = name.trim_end_matches('.').to_ascii_lowercase();
            let ip = ServiceName::parse(&host).and_then(|s| resolve(&s));
            if !(host == ZONE || host.ends_with(&format!(".{ZONE}"))) {
                ResponseCode::Refused
            } else if let Some(ip) = ip {
                reply.metadata.authoritative = true;
                // A name that exists but has no record of the type asked for
                // answers NOERROR with no records (RFC 2308 NODATA).
                let rdata = match (q.query_type(), ip) {
                    (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => Some(RData::A(A(v4))),
                    (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(v6))),
                    _ => None,
                };
                if let Some(rdata) = rdata {
                    reply.add_answer(Record::from_rdata(q.name().clone(), TTL_SECS, rdata));
                }
                ResponseCode::NoError
            } else {
                reply.metadata.authoritative = true;
                ResponseCode::NXDomain
            }
        }
        (OpCode::Query, _) => ResponseCode::FormErr,
        _ => ResponseCode::NotImp,
    };
    reply.metadata.response_code = code;
    reply.to_vec().ok()
}

/// What the DNS answers with: `resolve` decides from what is held now;
/// `prepare` first learns a name not held yet (asks the controller).
pub trait Names: Send + Sync + 'static {
    fn prepare<'a>(&'a self, name: &'a ServiceName) -> futures::future::BoxFuture<'a, ()>;
    fn resolve(&self, name: &ServiceName) -> Option<IpAddr>;
}

pub type Resolve = Arc<dyn Names>;

/// Queries waiting on `prepare` at once; past this a query is answered
/// from what is held (a flood of made-up names cannot pile up tasks).
pub const MAX_PREPARING: usize = 256;

/// The service a query names, if it is one not answerable yet.
fn to_learn(packet: &[u8], names: &dyn Names) -> Option<ServiceName> {
    let query = Message::from_vec(packet).ok()?;
    let [q] = query.queries.as_slice() else { return None };
    let host = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    ServiceName::parse(&host).filter(|s| names.resolve(s).is_none())
}

/// The reply to `packet`, learning the name it asks for first if need be.
async fn reply(packet: &[u8], names: &dyn Names, preparing: &tokio::sync::Semaphore) -> Option<Vec<u8>> {
    if let Some(name) = to_learn(packet, names)
        && let Ok(_permit) = preparing.try_acquire()
    {
        names.prepare(&name).await;
    }
    answer(packet, |s| names.resolve(s))
}

/// Serve DNS over UDP and TCP on `addr` (both bound to the same port).
pub async fn serve(addr: SocketAddr, resolve: Resolve, stop: CancellationToken) -> std::io::Result<SocketAddr> {
    // UDP and TCP on one port: with port 0 the UDP port picked may be
    // taken for TCP, so pick again (a few times) rather than fail.
    let mut tries = 0;
    let (udp, bound, tcp) = loop {
        let udp = UdpSocket::bind(addr).await?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => break (Arc::new(udp), bound, tcp),
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse && tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let k = resolve.clone();
    let s = stop.clone();
    let preparing = Arc::new(tokio::sync::Semaphore::new(MAX_PREPARING));
    let p = preparing.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = tokio::select! {
                _ = s.cancelled() => return,
                r = udp.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
            };
            let packet = buf[..n].to_vec();
            if to_learn(&packet, &*k).is_none() {
                if let Some(reply) = answer(&packet, |s| k.resolve(s)) {
                    let _ = udp.send_to(&reply, from).await;
                }
                continue;
            }
            // A name to learn first: answered from its own task, so the
            // others are not held up.
            let (udp, k, p) = (udp.clone(), k.clone(), p.clone());
            tokio::spawn(async move {
                if let Some(reply) = reply(&packet, &*k, &p).await {
                    let _ = udp.send_to(&reply, from).await;
                }
            });
        }
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    tokio::spawn(async move {
        while let Some((mut conn, _)) = isthmus_core::net::accept(&tcp, &stop).await {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let resolve = resolve.clone();
            let preparing = preparing.clone();
            tokio::spawn(async move {
                let _slot = slot;
                // TCP DNS: each message is preceded by its length (RFC 1035 4.2.2).
                loop {
                    let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, conn.read_u16()).await else {
                        return;
                    };
                    let mut msg = vec![0u8; usize::from(len)];
                    if !matches!(
                        tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut msg)).await,
                        Ok(Ok(_))
                    ) {
                        return;
                    }
                    let Some(reply) = reply(&msg, &*resolve, &preparing).await else {
                        return;
                    };
                    let Ok(len) = u16::try_from(reply.len()) else { return };
                    if conn.write_u16(len).await.is_err() || conn.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections past the cap are closed at once; an idle one is closed
    /// after `TCP_IDLE`. (The paused clock jumps ahead when all wait.)
    #[tokio::test(start_paused = true)]
    async fn tcp_connections_are_capped_and_idle_ones_closed() {
        let stop = CancellationToken::new();
        struct Nothing;
        impl Names for Nothing {
            fn prepare<'a>(&'a self, _: &'a ServiceName) -> futures::future::BoxFuture<'a, ()> {
                Box::pin(async {})
            }
            fn resolve(&self, _: &ServiceName) -> Option<IpAddr> {
                None
            }
        }
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Nothing), stop.clone())
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_TCP_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(TCP_IDLE / 2, extra.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a connection past the cap was kept: {r:?}"
        );
        let r = tokio::time::timeout(TCP_IDLE * 3, held[0].read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was kept: {r:?}"
        );
        stop.cancel();
    }
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn ask(name: &str, rtype: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
        let reply = answer(&q.to_vec().unwrap(), |s| {
            (s.namespace == "demo" && s.name == "echo").then(|| "127.0.2.30".parse().unwrap())
        })
        .expect("a reply");
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, q.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        reply
    }

    #[test]
    fn known_service_resolves_to_the_sidecar() {
        for name in [
            "echo.demo.svc.clusterset.local.",
            "ECHO.Demo.svc.clusterset.local",
            "east.echo.demo.svc.clusterset.local.",
        ] {
            let r = ask(name, RecordType::A);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(r.metadata.authoritative);
            assert_eq!(r.answers.len(), 1);
            assert_eq!(r.answers[0].data, RData::A(A("127.0.2.30".parse().unwrap())));
            assert_eq!(r.answers[0].ttl, TTL_SECS);
        }
    }

    #[test]
    fn aaaa_of_a_known_service_is_nodata() {
        let r = ask("echo.demo.svc.clusterset.local.", RecordType::AAAA);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn unknown_service_is_nxdomain_and_other_zones_are_refused() {
        let r = ask("nope.demo.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask("svc.clusterset.local.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask("example.com.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        let r = ask("evilclusterset.local.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn garbage_and_responses_get_no_reply() {
        let any = |_: &ServiceName| Some("127.0.0.1".parse().unwrap());
        assert!(answer(b"\x01\x02", any).is_none());
        let resp = Message::response(7, OpCode::Query).to_vec().unwrap();
        assert!(answer(&resp, any).is_none());
    }
}
