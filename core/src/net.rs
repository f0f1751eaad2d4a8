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
