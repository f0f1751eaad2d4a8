//! What one attempt of an outbound request teaches, and whether the request
//! may go again elsewhere (pure; `outbound::forward` acts on it).
//!
//! HTTP's rules decide, narrowed by the route's `retries.on`: a request
//! that was not delivered (connect or tunnel refused, the serving sidecar's
//! app refused the connection) may go anywhere else, whatever its method
//! (`connect-failure`); an idempotent one also when its session or the app
//! died before an answer, or before the end of a small answer read whole
//! (`reset`), or its attempt timed out (`timeout`); a gRPC call answered
//! UNAVAILABLE without a body was not taken up by the server
//! (`unavailable`); and, only if asked for, an idempotent request
//! answered 502-504 (`gateway-error`) or any 5xx (`5xx`). A POST that may
//! have been delivered never goes again.

use crate::error::ErrorKind;
use crate::health::Outcome;
pub use crate::route::RetryOn;

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
    /// No answer within the attempt's time (per-try timeout, or what was
    /// left of the request's).
    TimedOut,
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
    pub retry_on: RetryOn,
}

/// The verdict on one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The request may go again to another endpoint or cluster (if its
    /// body is at hand, attempts are left and the budget allows).
    pub resend: bool,
    /// The endpoint answered well: for the local balancer.
    pub endpoint_ok: bool,
    /// What the (service, cluster) pair learns, once the cluster's turn is
    /// over: `None` when the attempt says nothing about the cluster.
    pub cluster: Option<Outcome>,
}

pub fn judge(attempt: Attempt, req: Request) -> Verdict {
    let on = |c| req.retry_on.has(c);
    // Nothing delivered, or nothing answered: the pair cannot serve now.
    let unreached = match attempt {
        Attempt::NotSent | Attempt::Lost | Attempt::TimedOut => true,
        Attempt::Answered {
            kind, grpc_unavailable, ..
        } => matches!(kind, Some(ErrorKind::AppUnavailable | ErrorKind::AppFailed)) || req.grpc && grpc_unavailable,
        Attempt::ClientFailed | Attempt::Unroutable => false,
    };
    let resend = match attempt {
        Attempt::NotSent => on(RetryOn::CONNECT_FAILURE),
        Attempt::Lost => req.idempotent && on(RetryOn::RESET),
        Attempt::TimedOut => req.idempotent && on(RetryOn::TIMEOUT),
        Attempt::Answered {
            status,
            kind,
            grpc_unavailable,
        } => {
            kind == Some(ErrorKind::AppUnavailable) && on(RetryOn::CONNECT_FAILURE)
                || req.idempotent && kind == Some(ErrorKind::AppFailed) && on(RetryOn::RESET)
                || req.grpc && grpc_unavailable && on(RetryOn::UNAVAILABLE)
                || req.idempotent && (502..=504).contains(&status) && on(RetryOn::GATEWAY_ERROR)
                || req.idempotent && status >= 500 && on(RetryOn::SERVER_ERROR)
        }
        Attempt::ClientFailed | Attempt::Unroutable => false,
    };
    let endpoint_ok = matches!(attempt, Attempt::Answered { status, .. } if status < 500) && !unreached;
    let cluster = match attempt {
        // A timed-out attempt that cannot move on counts as a failed
        // answer, for this cluster too: a hung app is left like a dead one.
        Attempt::TimedOut if !resend => Some(Outcome::Failed),
        // An app that died under a request that cannot move on: as a 502.
        Attempt::Answered {
            kind: Some(ErrorKind::AppFailed),
            ..
        } if !resend => (!req.local).then_some(Outcome::Failed),
        // Moving on from a pair that did not serve: only a probe brings it
        // back.
        _ if unreached => Some(Outcome::Unreached),
        // Failed answers count against another cluster, whose endpoints
        // only its gateway sees; locally each endpoint has its own outlier
        // detection (balance.rs), and one bad endpoint must not take the
        // whole cluster out.
        Attempt::Answered { status: 502..=504, .. } => (!req.local).then_some(Outcome::Failed),
        Attempt::Answered { .. } | Attempt::ClientFailed => Some(Outcome::Ok),
        Attempt::Unroutable => Some(Outcome::Unreached),
        Attempt::NotSent | Attempt::Lost | Attempt::TimedOut => unreachable!("unreached"),
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
        retry_on: RetryOn::DEFAULT,
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
    fn the_default_conditions_are_the_documented_ones() {
        assert_eq!(RetryOn::default(), GET.retry_on);
        assert_eq!(
            RetryOn::parse(&isthmus_core::policy::DEFAULT_RETRY_ON),
            RetryOn::default()
        );
        assert_eq!(RetryOn::parse::<&str>(&[]), RetryOn::default());
        let all = RetryOn::parse(&isthmus_core::policy::RETRY_ON);
        for c in [
            RetryOn::CONNECT_FAILURE,
            RetryOn::RESET,
            RetryOn::TIMEOUT,
            RetryOn::UNAVAILABLE,
            RetryOn::GATEWAY_ERROR,
            RetryOn::SERVER_ERROR,
        ] {
            assert!(all.has(c), "every condition has a name: {c:?}");
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
        let off = Request {
            retry_on: RetryOn::NONE,
            ..GET
        };
        assert!(!judge(Attempt::NotSent, off).resend, "retries.on narrows even this");
        assert_eq!(judge(Attempt::NotSent, off).cluster, Some(Outcome::Unreached));
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
        let local = Request { local: true, ..POST };
        assert_eq!(judge(answer(502, Some(ErrorKind::AppFailed)), local).cluster, None);
    }

    #[test]
    fn timed_out_attempts_move_on_if_idempotent_and_count_against_the_pair() {
        let v = judge(Attempt::TimedOut, GET);
        assert!(v.resend && !v.endpoint_ok);
        assert_eq!(v.cluster, Some(Outcome::Unreached), "left at once, probed back");
        let v = judge(Attempt::TimedOut, POST);
        assert!(!v.resend);
        assert_eq!(v.cluster, Some(Outcome::Failed));
        // A hung local app counts against the local cluster too.
        let local = Request { local: true, ..POST };
        assert_eq!(judge(Attempt::TimedOut, local).cluster, Some(Outcome::Failed));
        let no_timeouts = Request {
            retry_on: RetryOn::CONNECT_FAILURE,
            ..GET
        };
        assert!(!judge(Attempt::TimedOut, no_timeouts).resend);
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
    fn server_errors_go_again_only_when_asked_for() {
        assert!(!judge(answer(503, None), GET).resend);
        let gw = Request {
            retry_on: RetryOn::parse(&["gateway-error"]),
            ..GET
        };
        assert!(judge(answer(503, None), gw).resend);
        assert!(!judge(answer(500, None), gw).resend);
        assert!(
            !judge(
                answer(503, None),
                Request {
                    idempotent: false,
                    ..gw
                }
            )
            .resend
        );
        let any = Request {
            retry_on: RetryOn::parse(&["5xx"]),
            ..GET
        };
        let v = judge(answer(500, None), any);
        assert!(v.resend);
        assert_eq!(
            v.cluster,
            Some(Outcome::Ok),
            "an app's 500 says nothing about the cluster"
        );
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
