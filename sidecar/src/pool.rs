//! End-to-end sessions with serving sidecars: opened directly to a local
//! endpoint or tunnelled through this cluster's gateway, mTLS between the
//! two sidecars either way, and pooled (one HTTP/2 session per local
//! endpoint, or per remote cluster's service, shared by concurrent
//! requests).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::agent::Agent;
use isthmus_core::identity::SpiffeId;
use isthmus_core::naming::ServiceKey;
use isthmus_core::tls::{self, Expect};
use isthmus_core::tunnel::{TunnelRequest, TunnelResponse};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::error::{ConnectError, ProxyError};
use crate::route::{Destination, Target};

/// How long a TCP connect or an mTLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long this cluster's gateway has to accept or refuse a tunnel (it
/// answers once the peer gateway has: see the gateway's own timeouts).
const TUNNEL_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Pooled sessions are pinged this often and dropped if a ping goes
/// unanswered this long, so the pool does not hand out a dead session (a
/// vanished peer or tunnel).
const KEEP_ALIVE: Duration = Duration::from_secs(2);

pub type H2Sender = hyper::client::conn::http2::SendRequest<Body>;

/// A session per local endpoint (the balancer chose it), or per remote
/// cluster's service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub destination: Destination,
    pub endpoint: Option<String>,
}

impl PoolKey {
    pub fn of(t: &Target) -> Self {
        Self {
            destination: t.destination(),
            endpoint: match t.addresses.as_slice() {
                [endpoint] => Some(endpoint.clone()),
                _ => None,
            },
        }
    }
}

#[derive(Default)]
pub(crate) struct Pool {
    sessions: Mutex<HashMap<PoolKey, H2Sender>>,
}

impl Pool {
    /// A ready HTTP/2 session for `target`: the pooled one (then `true`)
    /// unless `fresh` is asked for or it is gone, else a new one.
    pub async fn session(
        &self,
        agent: &Agent,
        target: &Target,
        key: &PoolKey,
        fresh: bool,
    ) -> Result<(H2Sender, bool), ProxyError> {
        if !fresh {
            let pooled = self
                .sessions
                .lock()
                .expect("pool lock")
                .get(key)
                .filter(|s| !s.is_closed())
                .cloned();
            if let Some(mut s) = pooled
                && s.ready().await.is_ok()
            {
                return Ok((s, true));
            }
        }
        let s = connect_h2(agent, target).await?;
        self.sessions.lock().expect("pool lock").insert(key.clone(), s.clone());
        Ok((s, false))
    }

    /// Forget the session of `key` if it is dead: a concurrent request may
    /// have replaced it with a live one already.
    pub fn drop_if_closed(&self, key: &PoolKey) {
        let mut sessions = self.sessions.lock().expect("pool lock");
        if sessions.get(key).is_some_and(|s| s.is_closed()) {
            sessions.remove(key);
        }
    }

    /// Forget the sessions to endpoints that left `destination`.
    pub fn forget(&self, destination: &Destination, gone: Vec<String>) {
        let mut sessions = self.sessions.lock().expect("pool lock");
        for endpoint in gone {
            sessions.remove(&PoolKey {
                destination: destination.clone(),
                endpoint: Some(endpoint),
            });
        }
    }
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An end-to-end mTLS session with a sidecar serving `target` (directly, or
/// through the gateway to another cluster), offering only `alpn`: `h2` for
/// pooled HTTP, `isthmus-tcp/1` for one opaque connection.
pub(crate) async fn connect_tls(
    agent: &Agent,
    target: &Target,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, ProxyError> {
    let io: Box<dyn Io> = if target.is_local() {
        let addr = &target.addresses[rand::random_range(0..target.addresses.len())];
        Box::new(tcp(addr).await?)
    } else {
        Box::new(tunnel(agent, target).await?)
    };
    let identities: Vec<SpiffeId> = target
        .identities
        .iter()
        .filter_map(|i| SpiffeId::parse(i).ok())
        .collect();
    let cfg = tls::client_config(
        Some(agent.svid.clone()),
        agent.bundles.clone(),
        Expect::AnyOf(identities),
        &[alpn],
    )
    .map_err(ConnectError::from)?;
    let peer = format!(
        "{} in cluster {}",
        ServiceKey::new(&target.namespace, &target.service),
        target.cluster
    );
    let inner = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(tls::sni(), io),
    )
    .await
    .map_err(|_| ConnectError::Timeout {
        what: format!("mTLS handshake with {peer}"),
        after: CONNECT_TIMEOUT,
    })?
    .map_err(|source| ConnectError::Handshake { peer, source })?;
    Ok(inner)
}

/// A TCP connection to `addr`, within `CONNECT_TIMEOUT`.
async fn tcp(addr: &str) -> Result<TcpStream, ConnectError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout {
            what: format!("connect to {addr}"),
            after: CONNECT_TIMEOUT,
        })?
        .map_err(|source| ConnectError::Tcp {
            addr: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Open an end-to-end mTLS session with a sidecar serving `target`, directly
/// or through the gateway, and start HTTP/2 on it.
async fn connect_h2(agent: &Agent, target: &Target) -> Result<H2Sender, ProxyError> {
    let inner = connect_tls(agent, target, tls::ALPN_H2).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(inner))
        .await
        .map_err(|source| ConnectError::Http2 {
            peer: target.service.clone(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 session ended");
        }
    });
    Ok(sender)
}

/// A tunnel through this cluster's gateway to `target.cluster`.
async fn tunnel(agent: &Agent, target: &Target) -> Result<impl Io + use<>, ProxyError> {
    let gw = agent.config.borrow().gateway_tunnel_addr.clone();
    if gw.is_empty() {
        return Err(ProxyError::NoGateway(agent.cluster.clone()));
    }
    let tcp = tcp(&gw).await?;
    let cfg = tls::client_config(
        Some(agent.svid.clone()),
        agent.bundles.clone(),
        Expect::Id(SpiffeId::gateway(&agent.trust_domain)),
        &[],
    )
    .map_err(ConnectError::from)?;
    let mut outer = tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::sni(), tcp)
        .await
        .map_err(|source| ConnectError::Handshake {
            peer: format!("gateway {gw}"),
            source,
        })?;
    let req = TunnelRequest {
        cluster: target.cluster.clone(),
        namespace: target.namespace.clone(),
        service: target.service.clone(),
        port: target.port,
        source_cluster: agent.cluster.clone(),
        traceparent: None,
    };
    let tunnel_err = |source| ConnectError::Tunnel {
        gateway: gw.clone(),
        source,
    };
    req.write(&mut outer).await.map_err(tunnel_err)?;
    let resp = tokio::time::timeout(TUNNEL_ANSWER_TIMEOUT, TunnelResponse::read(&mut outer))
        .await
        .map_err(|_| ConnectError::Timeout {
            what: format!("the answer of gateway {gw}"),
            after: TUNNEL_ANSWER_TIMEOUT,
        })?
        .map_err(tunnel_err)?;
    match resp {
        TunnelResponse::Ok => Ok(outer),
        TunnelResponse::Refused { code, reason } => Err(ProxyError::Refused {
            cluster: format!("gateway of cluster {}", agent.cluster),
            code,
            reason,
        }),
    }
}
