//! The tunnel listener's budget for connections still opening: past it, a
//! connection that has sent nothing is closed at once instead of holding a
//! task and a descriptor for the header timeout. A real controller and
//! gateway on loopback.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn connections_past_the_opening_budget_are_closed_at_once() {
    isthmus_core::install_crypto_provider();
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = isthmus_controller::Config::new(dir.path(), "east", "east.mesh");
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    let gw = isthmus_gateway::run(isthmus_gateway::Config::new(dir.path()), stop.clone())
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..isthmus_gateway::MAX_OPENING_TUNNELS {
        held.push(tokio::net::TcpStream::connect(gw.tunnel_addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(gw.tunnel_addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past the budget was kept: {r:?}"
    );
    stop.cancel();
}
