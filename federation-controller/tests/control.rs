//! In-process integration tests: real controllers on loopback, driven
//! through their gRPC APIs exactly as the CLI and sidecars drive them.

use std::time::Duration;

use isthmus_core::local::{ClusterDir, LocalClient};
use isthmus_proto::{
    CreateTokenRequest, ExportRequest, LinkRequest, SidecarRegistration, StatusRequest, WatchRequest, watch_request,
};
use tokio_util::sync::CancellationToken;

struct Ctl {
    _dir: tempfile::TempDir,
    client: LocalClient,
    stop: CancellationToken,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn controller(name: &str) -> Ctl {
    isthmus_core::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let cfg = isthmus_controller::Config::new(dir.path(), name, &format!("{name}.mesh"));
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    let client = ClusterDir::new(dir.path()).connect().await.unwrap();
    Ctl {
        _dir: dir,
        client,
        stop,
    }
}

fn echo_sidecar() -> WatchRequest {
    WatchRequest {
        node: Some(watch_request::Node::Sidecar(SidecarRegistration {
            namespace: "demo".into(),
            service: "echo".into(),
            port: 8080,
            inbound_addr: "127.0.0.1:1".into(),
            instance: "echo-1".into(),
            // A sidecar cannot choose the identity it is announced with.
            identity: "spiffe://evil.mesh/ns/x/sa/y".into(),
            service_account: "echo".into(),
        })),
    }
}

#[tokio::test]
async fn registration_gets_the_identity_the_ca_issues() {
    let east = controller("east").await;
    let mut stream = east
        .client
        .control()
        .watch_config(echo_sidecar())
        .await
        .unwrap()
        .into_inner();
    let snap = stream.message().await.unwrap().unwrap();
    let echo = snap
        .services
        .iter()
        .find(|s| s.name == "echo")
        .expect("echo registered");
    assert_eq!(echo.backends[0].identities, ["spiffe://east.mesh/ns/demo/sa/echo"]);

    // Exporting needs a registered workload; an unknown one is NotFound.
    let err = east
        .client
        .admin()
        .export(ExportRequest {
            namespace: "demo".into(),
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("services here: demo/echo"), "{}", err.message());
    east.client
        .admin()
        .export(ExportRequest {
            namespace: "demo".into(),
            name: "echo".into(),
        })
        .await
        .unwrap();

    // The registration lives as long as the stream.
    drop(stream);
    let mut gone = false;
    for _ in 0..100 {
        let s = east.client.admin().status(StatusRequest {}).await.unwrap().into_inner();
        if s.services.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "registration outlived its stream");
}

#[tokio::test]
async fn the_controller_identity_cannot_be_requested() {
    let east = controller("east").await;
    let key = isthmus_core::identity::WorkloadKey::generate().unwrap();
    let err = east
        .client
        .control()
        .issue_certificate(isthmus_proto::CertificateRequest {
            csr_pem: key.csr_pem().unwrap(),
            namespace: "isthmus-system".into(),
            service_account: "controller".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn tokens_expire_by_the_issuers_clock_and_are_single_use() {
    let east = controller("east").await;
    let west = controller("west").await;
    let north = controller("north").await;

    let short = east
        .client
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: 1,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = west
        .client
        .admin()
        .link(LinkRequest { token: short.token })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());

    let tok = east
        .client
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: 60,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    west.client
        .admin()
        .link(LinkRequest {
            token: tok.token.clone(),
        })
        .await
        .unwrap();
    let err = north
        .client
        .admin()
        .link(LinkRequest { token: tok.token })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("already used"), "{}", err.message());

    // A token for one cluster, pointed at another cluster's controller, is
    // caught by the pinned fingerprint.
    let tok = east
        .client
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: 60,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut decoded = isthmus_core::token::JoinToken::decode(&tok.token).unwrap();
    decoded.peering = vec![west.client.info.peering_addr.clone()];
    let err = north
        .client
        .admin()
        .link(LinkRequest {
            token: decoded.encode(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("fingerprint mismatch"), "{}", err.message());

    // A wrong secret is refused by the issuer.
    let tok = east
        .client
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: 60,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut decoded = isthmus_core::token::JoinToken::decode(&tok.token).unwrap();
    decoded.secret = isthmus_core::token::new_secret().0;
    let err = north
        .client
        .admin()
        .link(LinkRequest {
            token: decoded.encode(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // West sees east active within a few heartbeats.
    let mut active = false;
    for _ in 0..100 {
        let s = west.client.admin().status(StatusRequest {}).await.unwrap().into_inner();
        if s.links.iter().any(|l| l.cluster == "east" && l.state == "active") {
            active = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(active, "link never became active");
}
