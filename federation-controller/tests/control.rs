//! In-process integration tests: real controllers on loopback, driven
//! through their gRPC APIs exactly as the CLI and sidecars drive them.

use std::time::Duration;

use isthmus_core::local::{ClusterDir, LocalClient};
use isthmus_proto::{
    CreateTokenRequest, ExportRequest, LinkRequest, ListTokensRequest, RevokeTokenRequest, RotateCaRequest,
    SidecarRegistration, StatusRequest, StatusResponse, UnlinkRequest, WatchRequest, watch_request,
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
    let dir = tempfile::tempdir().unwrap();
    let (client, stop) = start_in(dir.path(), name, |_| {}).await;
    Ctl {
        _dir: dir,
        client,
        stop,
    }
}

/// Start a controller in `dir`, with `tweak` applied to its config.
async fn start_in(
    dir: &std::path::Path,
    name: &str,
    tweak: impl FnOnce(&mut isthmus_controller::Config),
) -> (LocalClient, CancellationToken) {
    isthmus_core::install_crypto_provider();
    let stop = CancellationToken::new();
    let mut cfg = isthmus_controller::Config::new(dir, name, &format!("{name}.mesh"));
    tweak(&mut cfg);
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    (ClusterDir::new(dir).connect().await.unwrap(), stop)
}

/// Register with `req` and return the config stream.
async fn watch(c: &LocalClient, req: WatchRequest) -> tonic::Streaming<isthmus_proto::ConfigSnapshot> {
    c.control()
        .watch_config(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner()
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
        resume: false,
        ..Default::default()
    }
}

#[tokio::test]
async fn registration_gets_the_identity_the_ca_issues() {
    let east = controller("east").await;
    let mut stream = watch(&east.client, echo_sidecar()).await;
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
    export_echo(&east.client).await;

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

/// A component reconnecting to a controller that has just started keeps
/// its last config until the registry has settled; a new one is served at
/// once (it has nothing to serve from).
#[tokio::test]
async fn reconnecting_components_wait_for_the_registry_to_settle() {
    let resume = || WatchRequest {
        resume: true,
        ..echo_sidecar()
    };
    let dir = tempfile::tempdir().unwrap();
    let (east, stop) = start_in(dir.path(), "east", |c| c.settle = Duration::from_secs(60)).await;
    let mut resumed = east
        .control()
        .watch_config(tokio_stream::once(resume()))
        .await
        .unwrap()
        .into_inner();
    let mut fresh = east
        .control()
        .watch_config(tokio_stream::once(echo_sidecar()))
        .await
        .unwrap()
        .into_inner();
    let snap = fresh.message().await.unwrap().unwrap();
    // Both registrations count at once, though one is not told yet.
    let echo = snap.services.iter().find(|s| s.name == "echo").expect("echo");
    assert_eq!(echo.backends[0].healthy_endpoints, 2, "{echo:?}");
    let early = tokio::time::timeout(Duration::from_millis(300), resumed.message()).await;
    assert!(
        early.is_err(),
        "a resuming component was told before the registry settled: {early:?}"
    );
    stop.cancel();

    // Settled: a resuming component is served at once.
    let dir = tempfile::tempdir().unwrap();
    let (east, stop) = start_in(dir.path(), "east", |c| c.settle = Duration::ZERO).await;
    let mut resumed = east
        .control()
        .watch_config(tokio_stream::once(resume()))
        .await
        .unwrap()
        .into_inner();
    let snap = tokio::time::timeout(Duration::from_secs(30), resumed.message())
        .await
        .expect("settled, yet the resuming component waits")
        .unwrap()
        .unwrap();
    assert!(snap.services.iter().any(|s| s.name == "echo"), "{:?}", snap.services);
    stop.cancel();
}

/// A backend registers its own address: not a database elsewhere, not a
/// port that is none (the gateway relays peers' streams there).
#[tokio::test]
async fn a_registration_cannot_point_the_gateway_elsewhere() {
    let east = controller("east").await;
    for (addr, port, code) in [
        ("10.0.0.5:5432", 8080, tonic::Code::PermissionDenied),
        ("127.0.0.1:0", 8080, tonic::Code::InvalidArgument),
        ("db.internal:5432", 8080, tonic::Code::InvalidArgument),
        ("127.0.0.1:1", 70000, tonic::Code::InvalidArgument),
    ] {
        let mut req = echo_sidecar();
        if let Some(watch_request::Node::Sidecar(s)) = req.node.as_mut() {
            s.inbound_addr = addr.into();
            s.port = port;
        }
        let err = east
            .client
            .control()
            .watch_config(tokio_stream::once(req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{addr} {port}: {err:?}");
    }
    assert!(status(&east).await.services.is_empty());
}

/// A change that leaves a component's config as it was sends it nothing.
#[tokio::test]
async fn only_changed_config_is_pushed() {
    let east = controller("east").await;
    let mut stream = watch(&east.client, echo_sidecar()).await;
    let first = stream.message().await.unwrap().unwrap();
    export_echo(&east.client).await;
    let exported = stream.message().await.unwrap().unwrap();
    assert!(exported.version > first.version);
    assert!(exported.services.iter().any(|s| s.name == "echo" && s.exported));
    // Exported again: nothing this sidecar sees has changed.
    export_echo(&east.client).await;
    let resent = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(resent.is_err(), "an unchanged config was pushed again: {resent:?}");
    // A second endpoint is news.
    let mut second = echo_sidecar();
    if let Some(watch_request::Node::Sidecar(s)) = second.node.as_mut() {
        s.inbound_addr = "127.0.0.1:2".into();
    }
    let _second = east
        .client
        .control()
        .watch_config(tokio_stream::once(second))
        .await
        .unwrap();
    let next = stream.message().await.unwrap().unwrap();
    assert_eq!(next.services[0].backends[0].healthy_endpoints, 2, "{next:?}");
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

    let short = create_token(&east.client, 1, 0).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = link_fails(&west, short.token).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());

    let tok = token(&east).await;
    west.client
        .admin()
        .link(LinkRequest {
            token: tok.token.clone(),
        })
        .await
        .unwrap();
    let err = link_fails(&north, tok.token).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("already used"), "{}", err.message());

    // A token for one cluster, pointed at another cluster's controller, is
    // caught by the pinned fingerprint.
    let tok = token(&east).await;
    let mut decoded = isthmus_core::token::JoinToken::decode(&tok.token).unwrap();
    decoded.peering = vec![west.client.info.peering_addr.clone()];
    let err = link_fails(&north, decoded.encode()).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("fingerprint mismatch"), "{}", err.message());

    // A wrong secret is refused by the issuer.
    let tok = token(&east).await;
    let mut decoded = isthmus_core::token::JoinToken::decode(&tok.token).unwrap();
    decoded.secret = isthmus_core::token::new_secret().0;
    let err = link_fails(&north, decoded.encode()).await;
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

async fn token(ctl: &Ctl) -> isthmus_proto::CreateTokenResponse {
    create_token(&ctl.client, 60, 0).await
}

async fn create_token(c: &LocalClient, ttl_seconds: u64, priority: u32) -> isthmus_proto::CreateTokenResponse {
    c.admin()
        .create_token(CreateTokenRequest {
            ttl_seconds,
            uses: 1,
            priority,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn export_echo(c: &LocalClient) {
    c.admin()
        .export(ExportRequest {
            namespace: "demo".into(),
            name: "echo".into(),
        })
        .await
        .unwrap();
}

async fn status(ctl: &Ctl) -> StatusResponse {
    ctl.client.admin().status(StatusRequest {}).await.unwrap().into_inner()
}

/// Poll `ctl`'s status until `f` holds (at most 20 s).
async fn wait_status(ctl: &Ctl, what: &str, f: impl Fn(&StatusResponse) -> bool) -> StatusResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(ctl).await;
        if f(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Try to link `joiner` with `token`, which must fail: the error.
async fn link_fails(joiner: &Ctl, token: String) -> tonic::Status {
    joiner.client.admin().link(LinkRequest { token }).await.unwrap_err()
}

/// Link `joiner` to `issuer` with a fresh token.
async fn link(joiner: &Ctl, issuer: &Ctl) {
    joiner
        .client
        .admin()
        .link(LinkRequest {
            token: token(issuer).await.token,
        })
        .await
        .unwrap();
}

fn active(s: &StatusResponse, peer: &str) -> bool {
    s.links.iter().any(|l| l.cluster == peer && l.state == "active")
}

#[tokio::test]
async fn revoked_tokens_are_refused_and_listed() {
    let east = controller("east").await;
    let west = controller("west").await;
    let a = token(&east).await;
    let b = token(&east).await;
    east.client
        .admin()
        .revoke_token(RevokeTokenRequest { id: a.id.clone() })
        .await
        .unwrap();

    let err = link_fails(&west, a.token).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());

    // Revoking twice, or a token that never existed, says so.
    let again = east
        .client
        .admin()
        .revoke_token(RevokeTokenRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let unknown = east
        .client
        .admin()
        .revoke_token(RevokeTokenRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    west.client.admin().link(LinkRequest { token: b.token }).await.unwrap();
    let list = east
        .client
        .admin()
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let state_of = |id: &str| list.iter().find(|t| t.id == id).map(|t| t.state.clone());
    assert_eq!(state_of(&a.id).as_deref(), Some("revoked"));
    assert_eq!(state_of(&b.id).as_deref(), Some("used"));
    assert_eq!(list.iter().find(|t| t.id == b.id).unwrap().used_by, ["west"]);
}

#[tokio::test]
async fn unlink_ends_the_link_on_both_sides() {
    let east = controller("east").await;
    let west = controller("west").await;
    link(&west, &east).await;
    wait_status(&east, "east sees west active", |s| active(s, "west")).await;

    let r = east
        .client
        .admin()
        .unlink(UnlinkRequest { cluster: "west".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.peer_notified);
    assert!(status(&east).await.links.is_empty());
    wait_status(&west, "west drops east", |s| s.links.is_empty()).await;

    // Unlinking what is not linked is NotFound; linking again works.
    let err = east
        .client
        .admin()
        .unlink(UnlinkRequest { cluster: "west".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    link(&west, &east).await;
    wait_status(&east, "east sees west active again", |s| active(s, "west")).await;
}

/// The rotation's steps across a link: staged until the peer holds the new
/// root, then signing, then the old root retired on both sides.
#[tokio::test]
async fn root_rotation_reaches_the_peer_before_it_signs() {
    let east = controller("east").await;
    let west = controller("west").await;
    link(&west, &east).await;
    wait_status(&east, "link active", |s| active(s, "west")).await;
    let old = status(&east).await.root_fingerprint;

    let new = east
        .client
        .admin()
        .rotate_ca(RotateCaRequest {
            retire_after_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .new_root_fingerprint;
    assert_ne!(new, old);
    // A second rotation while one is under way is refused.
    let err = east
        .client
        .admin()
        .rotate_ca(RotateCaRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    let done = wait_status(&east, "rotation complete", |s| {
        s.roots.len() == 1 && s.roots[0].fingerprint == new && s.roots[0].state == "signing"
    })
    .await;
    assert_eq!(done.root_fingerprint, new);
    assert!(active(&done, "west"), "the peering stream survives: {done:#?}");
    // West's bundle for east ends up holding only the new root.
    wait_status(&west, "west holds only east's new root", |s| {
        s.links
            .iter()
            .any(|l| l.cluster == "east" && l.bundle_fingerprint == new)
    })
    .await;
    let bundle = std::fs::read_to_string(ClusterDir::new(east._dir.path()).file("ca.pem")).unwrap();
    let roots = isthmus_core::identity::certs_from_pem(&bundle).unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(isthmus_core::identity::fingerprint(&roots[0]), new);
}

/// A workload credential gets SVIDs for its own identity and nothing else:
/// not another identity, not the gateway's registration, not the Admin API.
#[tokio::test]
async fn workload_credentials_are_bound_to_one_identity() {
    let east = controller("east").await;
    let cred = east
        .client
        .admin()
        .create_workload_credential(isthmus_proto::WorkloadCredentialRequest {
            namespace: "demo".into(),
            service_account: "echo".into(),
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cred.spiffe_id, "spiffe://east.mesh/ns/demo/sa/echo");
    let dir = ClusterDir::new(east._dir.path());
    let echo = dir.connect_with(cred.credential.clone()).await.unwrap();
    let csr = |sa: &str| isthmus_proto::CertificateRequest {
        csr_pem: isthmus_core::identity::WorkloadKey::generate()
            .unwrap()
            .csr_pem()
            .unwrap(),
        namespace: "demo".into(),
        service_account: sa.into(),
    };

    let ok = echo
        .control()
        .issue_certificate(csr("echo"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, cred.spiffe_id);
    let err = echo.control().issue_certificate(csr("client")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let gateway = WatchRequest {
        node: Some(watch_request::Node::Gateway(Default::default())),
        resume: false,
        ..Default::default()
    };
    let err = echo
        .control()
        .watch_config(tokio_stream::once(gateway))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let mut registered = watch(&echo, echo_sidecar()).await;
    registered.message().await.unwrap().unwrap();
    // Its identity, but another service's backend: that would be taking
    // the other service's traffic.
    let mut other = echo_sidecar();
    if let Some(watch_request::Node::Sidecar(s)) = other.node.as_mut() {
        s.service = "billing".into();
    }
    let err = echo
        .control()
        .watch_config(tokio_stream::once(other))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let err = echo.admin().status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // One changed character of the secret, and it is nobody's.
    let mut altered = cred.credential.clone().into_bytes();
    let i = altered.len() - 10;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let forged = dir.connect_with(altered).await.unwrap();
    let err = forged.control().issue_certificate(csr("echo")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // Listed (without its secret), then revoked: renewals are refused.
    let list = east
        .client
        .admin()
        .list_workload_credentials(isthmus_proto::ListWorkloadCredentialsRequest {})
        .await
        .unwrap()
        .into_inner()
        .credentials;
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].id.as_str(), list[0].service.as_str()),
        (cred.id.as_str(), "echo")
    );
    east.client
        .admin()
        .revoke_workload_credential(isthmus_proto::RevokeWorkloadCredentialRequest { id: cred.id.clone() })
        .await
        .unwrap();
    let err = echo.control().issue_certificate(csr("echo")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // And its live registration ends: it is no backend, and told so.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), registered.message()).await {
            Ok(Ok(Some(_))) => continue,
            other => break other,
        }
    };
    match ended {
        Ok(Err(e)) => assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}"),
        other => panic!("the registration outlived its credential: {other:?}"),
    }
    wait_status(&east, "echo's registration to go", |s| s.services.is_empty()).await;
}

/// Links are pairwise: with east-west and west-north linked, west imports
/// what east exports, and north (not linked to east) does not.
#[tokio::test]
async fn exports_reach_directly_linked_peers_only() {
    let east = controller("east").await;
    let west = controller("west").await;
    let north = controller("north").await;
    link(&west, &east).await;
    link(&north, &west).await;
    let _echo = east
        .client
        .control()
        .watch_config(tokio_stream::once(echo_sidecar()))
        .await
        .unwrap()
        .into_inner();
    export_echo(&east.client).await;
    let has_echo = |s: &StatusResponse| s.services.iter().any(|svc| svc.name == "echo");
    wait_status(&west, "west imports echo from east", has_echo).await;
    wait_status(&north, "north linked to west", |s| active(s, "west")).await;
    // Give north the time west took, and more: it must still not see echo.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !has_echo(&status(&north).await),
        "north must not import east's export through west"
    );
}

/// A peer's export joins a service that runs here unexported only when the
/// link imports it; a scope is validated, and shown.
#[tokio::test]
async fn import_scopes_decide_what_joins_a_local_service() {
    let east = controller("east").await;
    let west = controller("west").await;
    link(&west, &east).await;
    let _east_echo = east
        .client
        .control()
        .watch_config(tokio_stream::once(echo_sidecar()))
        .await
        .unwrap();
    export_echo(&east.client).await;
    // West runs echo too, and has not exported it.
    let _west_echo = west
        .client
        .control()
        .watch_config(tokio_stream::once(echo_sidecar()))
        .await
        .unwrap();
    let backends = |s: &StatusResponse| -> Vec<String> {
        s.services
            .iter()
            .filter(|svc| svc.name == "echo")
            .flat_map(|svc| svc.backends.iter().map(|b| b.cluster.clone()))
            .collect()
    };
    let s = wait_status(&west, "east's echo left out", |s| {
        s.services.iter().any(|svc| {
            svc.conditions
                .iter()
                .any(|c| c.starts_with("NotImported: cluster east"))
        })
    })
    .await;
    assert_eq!(backends(&s), ["west"]);

    let set = |imports: &[&str], cluster: &str| {
        let req = isthmus_proto::SetImportsRequest {
            cluster: cluster.into(),
            imports: imports.iter().map(|s| s.to_string()).collect(),
        };
        let c = west.client.clone();
        async move { c.admin().set_imports(req).await }
    };
    let err = set(&["demo/ech*"], "east").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = set(&["demo/echo"], "nowhere").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    set(&["demo/echo"], "east").await.unwrap();
    let s = wait_status(&west, "east's echo merged", |s| backends(s).len() == 2).await;
    assert_eq!(s.links[0].import_scope, ["demo/echo"]);
    let echo = s.services.iter().find(|svc| svc.name == "echo").unwrap();
    assert!(echo.conditions.is_empty(), "{:?}", echo.conditions);

    // A scope that does not name it keeps east out of everything else.
    set(&["prod/*"], "east").await.unwrap();
    wait_status(&west, "east's echo out again", |s| backends(s) == ["west"]).await;
    // Back to the default.
    set(&[], "east").await.unwrap();
    let s = wait_status(&west, "the default scope", |s| s.links[0].import_scope.is_empty()).await;
    assert_eq!(backends(&s), ["west"]);
}

/// A join the joiner never confirms (it failed its own checks, or could not
/// store the link, so it never opens its peering stream) gives the peer
/// nothing here, and is rolled back with the token's use returned.
#[tokio::test]
async fn an_unconfirmed_link_trusts_nothing_and_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let (east, stop) = start_in(dir.path(), "east", |c| c.confirm_window = Duration::from_secs(2)).await;
    let tok = create_token(&east, 600, 0).await;
    let decoded = isthmus_core::token::JoinToken::decode(&tok.token).unwrap();
    // A joiner speaking the Join RPC itself, as `peering::join` does.
    let cfg = isthmus_core::tls::pinned_client_config(
        &decoded.root_fingerprint,
        isthmus_core::identity::SpiffeId::controller(&decoded.trust_domain),
        &[isthmus_core::tls::ALPN_H2],
    )
    .unwrap();
    let channel = isthmus_core::grpc::connect(&decoded.peering.join(","), cfg)
        .await
        .unwrap();
    let rogue = isthmus_core::identity::Ca::generate("rogue.mesh").unwrap();
    isthmus_proto::peering_client::PeeringClient::new(channel)
        .join(isthmus_proto::JoinRequest {
            token_id: decoded.id.clone(),
            secret: decoded.secret_bytes().unwrap(),
            cluster: "rogue".into(),
            trust_domain: "rogue.mesh".into(),
            roots_pem: rogue.chain_pem().to_string(),
            gateway_addr: "127.0.0.1:9".into(),
        })
        .await
        .unwrap();
    let s = east.admin().status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (s.links[0].cluster.as_str(), s.links[0].state.as_str()),
        ("rogue", "pending")
    );
    // Sidecars and the gateway are told nothing of it.
    let snap = watch(&east, echo_sidecar()).await.message().await.unwrap().unwrap();
    assert!(snap.peers.is_empty(), "{:?}", snap.peers);
    assert!(
        snap.bundles.iter().all(|b| b.trust_domain != "rogue.mesh"),
        "an unconfirmed peer's roots reached the data plane"
    );
    // Rolled back, and the token usable again.
    let mut rolled_back = false;
    for _ in 0..200 {
        let s = east.admin().status(StatusRequest {}).await.unwrap().into_inner();
        if s.links.is_empty() {
            rolled_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rolled_back, "the unconfirmed link stayed");
    let tokens = east
        .admin()
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens[0].uses_left, 1, "{tokens:?}");
    stop.cancel();
}

#[tokio::test]
async fn token_priority_reaches_the_joiner() {
    let east = controller("east").await;
    let west = controller("west").await;
    let tok = create_token(&east.client, 60, 2).await;
    west.client
        .admin()
        .link(LinkRequest { token: tok.token })
        .await
        .unwrap();
    let s = status(&west).await;
    assert_eq!(s.links[0].priority, 2, "{s:#?}");
}

/// A peer that stops heartbeating has its imports withdrawn when the lease
/// runs out, and restored when it comes back (same directory, same address).
#[tokio::test]
async fn imports_follow_the_lease() {
    let west_dir = tempfile::tempdir().unwrap();
    let (west, _west_stop) = start_in(west_dir.path(), "west", |c| {
        c.import_lease = Duration::from_millis(1500);
    })
    .await;
    let east_dir = tempfile::tempdir().unwrap();
    let (east, east_stop) = start_in(east_dir.path(), "east", |_| {}).await;
    let peering = east.info.peering_addr.clone();
    let register = |c: LocalClient| async move {
        c.control()
            .watch_config(tokio_stream::once(echo_sidecar()))
            .await
            .unwrap()
            .into_inner()
    };
    let _echo = register(east.clone()).await;
    let tok = create_token(&east, 60, 0).await;
    west.admin().link(LinkRequest { token: tok.token }).await.unwrap();
    export_echo(&east).await;
    let imports = |west: LocalClient| async move {
        let s = west.admin().status(StatusRequest {}).await.unwrap().into_inner();
        s.services.iter().any(|svc| svc.name == "echo")
    };
    let wait = |want: bool, what: &'static str| {
        let west = west.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while imports(west.clone()).await != want {
                assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait(true, "echo imported").await;

    east_stop.cancel();
    wait(false, "echo withdrawn after the lease").await;

    let (east, _east_stop) = start_in(east_dir.path(), "east", |c| {
        c.peering_addr = peering.parse().unwrap();
    })
    .await;
    let _echo = register(east).await;
    wait(true, "echo restored").await;
}

/// Registration of `demo/<service>` at `addr` (a full, non-incremental stream).
fn sidecar_of(service: &str, addr: &str) -> WatchRequest {
    let mut req = echo_sidecar();
    if let Some(watch_request::Node::Sidecar(s)) = &mut req.node {
        s.service = service.into();
        s.service_account = service.into();
        s.inbound_addr = addr.into();
    }
    req
}

async fn next(s: &mut tonic::Streaming<isthmus_proto::ConfigSnapshot>) -> isthmus_proto::ConfigSnapshot {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a config message in time")
        .unwrap()
        .expect("the stream is open")
}

/// A sidecar that subscribes holds only its own service and those it asked
/// for, and hears only what changed of them: a change to a service it does
/// not use sends it nothing.
#[tokio::test]
async fn subscribed_streams_carry_only_their_services_and_only_what_changed() {
    use isthmus_proto::WatchScope;
    let east = controller("east").await;
    let _echo = watch(&east.client, sidecar_of("echo", "127.0.0.1:1")).await;
    let _db = watch(&east.client, sidecar_of("db", "127.0.0.1:2")).await;

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(WatchRequest {
        node: Some(watch_request::Node::Sidecar(SidecarRegistration {
            namespace: "demo".into(),
            service_account: "client".into(),
            ..Default::default()
        })),
        scope: WatchScope::Subscribed.into(),
        incremental: true,
        ..Default::default()
    })
    .unwrap();
    let mut client = east
        .client
        .control()
        .watch_config(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut client).await;
    assert!(!first.delta);
    assert!(first.services.is_empty(), "{:?}", first.services);
    assert!(!first.bundles.is_empty());

    tx.send(WatchRequest {
        subscribe: vec!["demo/echo".into(), "demo/nothing".into()],
        ..Default::default()
    })
    .unwrap();
    let m = next(&mut client).await;
    assert!(m.delta && !m.cluster_changed && m.bundles.is_empty());
    let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["echo"]);
    assert_eq!(m.answered, ["demo/echo", "demo/nothing"]);

    // db changes first, then echo: only echo's change arrives.
    let _db2 = watch(&east.client, sidecar_of("db", "127.0.0.1:3")).await;
    let echo2 = watch(&east.client, sidecar_of("echo", "127.0.0.1:4")).await;
    let m = next(&mut client).await;
    let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["echo"]);
    assert_eq!(m.services[0].backends[0].addresses.len(), 2);

    // Withdrawn: both endpoints gone.
    drop(_echo);
    drop(echo2);
    let mut removed = Vec::new();
    for _ in 0..3 {
        let m = next(&mut client).await;
        assert!(m.services.iter().all(|s| s.name == "echo"));
        removed = m.removed;
        if !removed.is_empty() {
            break;
        }
    }
    assert_eq!(removed, ["demo/echo"]);

    // A service subscribed to before it exists reaches the subscriber.
    let _nothing = watch(&east.client, sidecar_of("nothing", "127.0.0.1:5")).await;
    let m = next(&mut client).await;
    let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["nothing"]);
}
