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

/// A linked peer's gateway needs one connection: past
/// `MAX_CONNECTIONS_PER_PEER`, a further one is closed at once.
#[tokio::test]
async fn a_peer_may_keep_only_a_few_connections() {
    use isthmus_core::identity::SpiffeId;
    use isthmus_core::local::ClusterDir;
    isthmus_core::install_crypto_provider();
    let stop = CancellationToken::new();
    let (east_dir, west_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, name) in [(&east_dir, "east"), (&west_dir, "west")] {
        let cfg = isthmus_controller::Config::new(dir.path(), name, &format!("{name}.mesh"));
        isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    }
    let east = ClusterDir::new(east_dir.path()).connect().await.unwrap();
    let west = ClusterDir::new(west_dir.path()).connect().await.unwrap();
    let token = east
        .admin()
        .create_token(isthmus_proto::CreateTokenRequest {
            ttl_seconds: 600,
            uses: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    west.admin().link(isthmus_proto::LinkRequest { token }).await.unwrap();
    let gw = isthmus_gateway::run(isthmus_gateway::Config::new(east_dir.path()), stop.clone())
        .await
        .unwrap();

    // West's gateway identity, as west's CA issues it.
    let id = SpiffeId::gateway("west.mesh");
    let (svid, _) = isthmus_core::agent::request_svid(&west, &id.namespace, &id.service_account)
        .await
        .unwrap();
    let tls = isthmus_core::tls::client_config(
        Some(isthmus_core::tls::SvidResolver::new(&svid).unwrap()),
        east.bundles.clone(),
        isthmus_core::tls::Expect::Id(SpiffeId::gateway("east.mesh")),
        &[isthmus_core::tls::ALPN_TUNNEL],
    )
    .unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));

    // East's gateway accepts west's once its config has the link.
    let mut held = Vec::new();
    for _ in 0..100 {
        let c = client
            .connect(gw.quic_addr, "isthmus.mesh.invalid")
            .unwrap()
            .await
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(300), c.closed())
            .await
            .is_err()
        {
            held.push(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held.len(), 1, "east's gateway never kept west's connection");
    while held.len() < isthmus_gateway::MAX_CONNECTIONS_PER_PEER {
        held.push(
            client
                .connect(gw.quic_addr, "isthmus.mesh.invalid")
                .unwrap()
                .await
                .unwrap(),
        );
    }
    let extra = client
        .connect(gw.quic_addr, "isthmus.mesh.invalid")
        .unwrap()
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), extra.closed())
        .await
        .expect("a connection past the limit was kept");
    assert!(why.to_string().contains("too many connections"), "{why}");
    for c in &held {
        assert!(c.close_reason().is_none(), "{:?}", c.close_reason());
    }
    stop.cancel();
}
