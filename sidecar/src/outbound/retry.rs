//! What one attempt of an outbound request teaches, and whether the request
//! may go again elsewhere (pure; `outbound::forward` acts on it).
//!
//! HTTP's rules decide: a request that was not delivered (nothing reached
//! the app: connect or tunnel refused, the serving sidecar's app refused
//! the connection) may go anywhere else, whatever its method; an idempotent
//! one also when its session or the app died before an answer; a gRPC call
//! answered UNAVAILABLE without a body was not taken up by the server. A
//! POST that may have been delivered never goes again.

use crate::error::ErrorKind;
use crate::health::Outcome;

/// How one attempt ended, as far as the retry decision cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// An answer: its status, the error kind a sidecar put on it, and
    /// whether it is a trailers-only gRPC UNAVAILABLE.
    Answered {
        status: u16,
        kind: Option<ErrorKind>,
        grpc_unavailable: bool,
    },
    /// Nothing was sent: the session could not be opened, or a gateway
    /// refused the tunnel.
    NotSent,
    /// The request went out on a session that then failed before an answer.
    Lost,
    /// The client's own request body broke off: nobody else is to blame.
    ClientFailed,
    /// Failed here before anything was tried (no gateway, say).
    Unroutable,
}

/// What the request is, as far as resending it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub idempotent: bool,
    pub grpc: bool,
    /// The attempt went to a local endpoint (which has its own outlier
    /// detection), not through a gateway to another cluster.
    pub local: bool,
}

/// The verdict on one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The request may go again to another endpoint or cluster (if its
    /// body is at hand and the budget allows).
    pub resend: bool,
    /// The endpoint answered well: for the local balancer.
    pub endpoint_ok: bool,
    /// What the (service, cluster) pair learns, once the cluster's turn is
    /// over: `None` when the attempt says nothing about the cluster.
    pub cluster: Option<Outcome>,
}

pub fn judge(attempt: Attempt, req: Request) -> Verdict {
    let resend = match attempt {
        Attempt::NotSent => true,
        Attempt::Lost => req.idempotent,
        Attempt::Answered {
            kind, grpc_unavailable, ..
        } => {
            kind == Some(ErrorKind::AppUnavailable)
                || req.idempotent && kind == Some(ErrorKind::AppFailed)
                || req.grpc && grpc_unavailable
        }
        Attempt::ClientFailed | Attempt::Unroutable => false,
    };
    let endpoint_ok = matches!(attempt, Attempt::Answered { status, .. } if status < 500) && !resend;
    let cluster = match attempt {
        _ if resend => Some(Outcome::Unreached),
        // Failed answers count against another cluster, whose endpoints
        // only its gateway sees; locally each endpoint has its own outlier
        // detection (balance.rs), and one bad endpoint must not take the
        // whole cluster out.
        Attempt::Answered { status: 502..=504, .. } => (!req.local).then_some(Outcome::Failed),
        Attempt::Answered { .. } | Attempt::ClientFailed => Some(Outcome::Ok),
        Attempt::NotSent | Attempt::Lost | Attempt::Unroutable => Some(Outcome::Unreached),
    };
    Verdict {
        resend,
        endpoint_ok,
        cluster,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: Request = Request {
        idempotent: true,
        grpc: false,
        local: false,
    };
    const POST: Request = Request {
        idempotent: false,
        ..GET
    };

    fn answer(status: u16, kind: Option<ErrorKind>) -> Attempt {
        Attempt::Answered {
            status,
            kind,
            grpc_unavailable: false,
        }
    }

    #[test]
    fn undelivered_requests_go_again_whatever_their_method() {
        for req in [GET, POST] {
            let v = judge(Attempt::NotSent, req);
            assert!(v.resend);
            assert_eq!(v.cluster, Some(Outcome::Unreached));
            assert!(judge(answer(502, Some(ErrorKind::AppUnavailable)), req).resend);
        }
    }

    #[test]
    fn maybe_delivered_requests_go_again_only_if_idempotent() {
        assert!(judge(Attempt::Lost, GET).resend);
        assert!(!judge(Attempt::Lost, POST).resend);
        assert_eq!(judge(Attempt::Lost, POST).cluster, Some(Outcome::Unreached));
        assert!(judge(answer(502, Some(ErrorKind::AppFailed)), GET).resend);
        let v = judge(answer(502, Some(ErrorKind::AppFailed)), POST);
        assert!(!v.resend);
        assert!(!v.endpoint_ok);
        assert_eq!(v.cluster, Some(Outcome::Failed));
    }

    #[test]
    fn grpc_unavailable_without_a_body_goes_again() {
        let unavailable = Attempt::Answered {
            status: 200,
            kind: None,
            grpc_unavailable: true,
        };
        let grpc = Request { grpc: true, ..POST };
        assert!(judge(unavailable, grpc).resend);
        assert!(!judge(unavailable, grpc).endpoint_ok);
        assert!(!judge(unavailable, POST).resend, "only gRPC calls read grpc-status");
    }

    #[test]
    fn answers_teach_the_cluster() {
        // 500 is the app's answer: the cluster is fine.
        let v = judge(answer(500, None), GET);
        assert_eq!((v.resend, v.endpoint_ok, v.cluster), (false, false, Some(Outcome::Ok)));
        let v = judge(answer(200, None), GET);
        assert_eq!((v.resend, v.endpoint_ok, v.cluster), (false, true, Some(Outcome::Ok)));
        // 503 counts against another cluster, not against our own.
        assert_eq!(judge(answer(503, None), GET).cluster, Some(Outcome::Failed));
        let local = Request { local: true, ..GET };
        assert_eq!(judge(answer(503, None), local).cluster, None);
        // A client's broken body says nothing bad about anyone.
        let v = judge(Attempt::ClientFailed, GET);
        assert_eq!((v.resend, v.cluster), (false, Some(Outcome::Ok)));
        assert_eq!(judge(Attempt::Unroutable, GET).cluster, Some(Outcome::Unreached));
    }
}
