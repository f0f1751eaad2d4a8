//! The Peering service, on the peering port: the issuer's side of a join
//! (checks in `join.rs`), and peering streams from linked clusters.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use isthmus_core::identity::SpiffeId;
use isthmus_core::unix_now;
use isthmus_proto::peering_server::{Peering, PeeringServer};
use isthmus_proto::{JoinRequest, JoinResponse, PeerMessage};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::shared::{Shared, Svc};
use crate::{join, peering};

pub(crate) async fn serve_peering(shared: Arc<Shared>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let svc = Svc(shared.clone());
    let incoming = isthmus_core::grpc::tls_incoming(listener, tls, shared.shutdown.clone());
    let res = tonic::transport::Server::builder()
        .add_service(PeeringServer::new(svc))
        .serve_with_incoming_shutdown(incoming, shared.shutdown.clone().cancelled_owned())
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "peering server stopped");
    }
}

type PeerStream = Pin<Box<dyn Stream<Item = Result<PeerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Peering for Svc {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = req.into_inner();
        let shared = &self.0;
        let refused = |e: join::JoinRefusal| {
            if e == join::JoinRefusal::BadSecret {
                tracing::warn!(token_id = %r.token_id, "join refused: wrong secret");
            }
            shared.metrics.join(e.label());
            e.status()
        };
        join::check_request(&shared.cfg.cluster, &shared.cfg.trust_domain, &r).map_err(refused)?;
        // On Kubernetes, tokens are made through the API (`isthmus token
        // create` writes their Secrets): read them as they are now.
        shared.refresh_tokens().await?;
        let now = unix_now();
        // The caller is anonymous: an unknown token or a wrong secret is
        // refused before the state is copied (under the writer lock) to be
        // changed.
        join::check_token(&shared.state.lock().expect("state lock"), &r, now).map_err(refused)?;
        shared
            .update(|state| {
                join::check_token(state, &r, now).map_err(refused)?;
                let confirm_by = now + shared.cfg.confirm_window.as_secs() as i64;
                join::spend(state, &r, now, confirm_by);
                Ok(())
            })
            .await?;
        shared.rebuild_bundles();
        shared.changed();
        tracing::info!(peer = %r.cluster, trust_domain = %r.trust_domain, "linked (join accepted)");
        shared.metrics.join("accepted");
        let (_, quic) = shared.gateway_addrs();
        Ok(Response::new(JoinResponse {
            cluster: shared.cfg.cluster.clone(),
            trust_domain: shared.cfg.trust_domain.clone(),
            roots_pem: shared.ca.load().bundle_pem(),
            gateway_addr: quic,
        }))
    }

    type SyncStream = PeerStream;

    async fn sync(&self, req: Request<Streaming<PeerMessage>>) -> Result<Response<PeerStream>, Status> {
        let id = isthmus_core::tls::peer_id(req.peer_certs().as_deref().map(|v| v.as_slice()))
            .ok_or_else(|| Status::unauthenticated("the peering stream needs a client certificate"))?;
        let peer = {
            let state = self.0.state.lock().expect("state lock");
            state
                .links
                .values()
                .find(|l| l.trust_domain == id.trust_domain)
                .map(|l| l.cluster.clone())
        };
        let Some(peer) = peer.filter(|_| id == SpiffeId::controller(&id.trust_domain)) else {
            return Err(Status::permission_denied(format!(
                "{id} is not the controller of a linked cluster"
            )));
        };
        peering::confirm(&self.0, &peer).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(peering::session(self.0.clone(), peer, req.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
