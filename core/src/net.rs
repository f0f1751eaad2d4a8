//! Small socket helpers shared by every listener.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The next connection, or `None` once `stop` is cancelled. Accept errors
/// (for example running out of file descriptors) back off briefly instead
/// of spinning. Accepted sockets have Nagle off: mesh traffic is
/// request/response.
pub async fn accept(listener: &TcpListener, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((tcp, from)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, from));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A port could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Bind a TCP listener; also returns the bound address (port 0 is resolved).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Bind a UDP socket (for QUIC); also returns the bound address.
pub fn bind_udp(addr: SocketAddr) -> Result<(std::net::UdpSocket, SocketAddr), BindError> {
    let err = |source| BindError { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(err)?;
    // One socket carries every tunnel to every peer: the kernel's default
    // buffer (~200 KiB) overflows during a burst while the gateway is busy,
    // and each drop reads as congestion. Ask for more; the kernel caps it
    // at net.core.[rw]mem_max, which is worth raising on gateway hosts.
    let s = socket2::SockRef::from(&socket);
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    let bound = socket.local_addr().map_err(err)?;
    Ok((socket, bound))
}

const UDP_BUFFER: usize = 8 * 1024 * 1024;
