//! Leader election on a `coordination.k8s.io/v1` Lease: one replica of
//! the controller leads (serves sidecars, the gateway and peers, runs the
//! reconcilers), the others wait to take over. The decision is a pure
//! function of the Lease as read and the time; the loop around it reads
//! and writes the Lease, every write guarded by its resourceVersion, so two
//! replicas cannot both believe they took it.
//!
//! A leader that cannot renew before its lease would run out stops (the
//! process exits and is restarted), rather than go on beside a new leader.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

pub const LEASE_NAME: &str = "isthmus-controller";

/// The Lease as this replica read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub holder: String,
    pub renewed: SystemTime,
    pub duration: Duration,
}

/// What to do with the Lease now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It is ours: renew it.
    Renew,
    /// Nobody holds it, or the holder's time ran out: take it.
    Take,
    /// Someone else holds it: look again in this long.
    Wait(Duration),
}

/// Decide, as replica `me`, given the Lease (if it exists) at `now`.
pub fn decide(me: &str, lease: Option<&Held>, now: SystemTime, retry: Duration) -> Decision {
    let Some(l) = lease else { return Decision::Take };
    if l.holder == me {
        return Decision::Renew;
    }
    if l.holder.is_empty() {
        return Decision::Take;
    }
    let expires = l.renewed + l.duration;
    match expires.duration_since(now) {
        Err(_) => Decision::Take,
        // Look again when it would run out, but at least every `retry`.
        Ok(left) => Decision::Wait(left.min(retry).max(Duration::from_millis(100))),
    }
}

fn held(l: &Lease) -> Option<Held> {
    let spec = l.spec.as_ref()?;
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| SystemTime::from(t.0))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Some(Held {
        holder: spec.holder_identity.clone().unwrap_or_default(),
        renewed,
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64),
    })
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Leader election for replica `me` in `namespace`.
pub struct Elector {
    api: Api<Lease>,
    me: String,
    duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("lost the lease: could not renew it for {0:?}")]
    Lost(Duration),
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, me: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            me: me.to_string(),
            duration,
        }
    }

    /// How often a leader renews, and a waiting replica looks again.
    fn retry(&self) -> Duration {
        self.duration / 3
    }

    /// One round: read the Lease, and take or renew it if it is due.
    /// `Ok(true)` if this replica holds it now.
    async fn round(&self) -> Result<(bool, Duration), LeaseError> {
        let current = self.api.get_opt(LEASE_NAME).await?;
        let view = current.as_ref().and_then(held);
        let decision = decide(&self.me, view.as_ref(), SystemTime::now(), self.retry());
        let renew = match decision {
            Decision::Wait(d) => return Ok((false, d)),
            Decision::Renew => true,
            Decision::Take => false,
        };
        let seconds = self.duration.as_secs().max(1) as i32;
        let now = now_micro();
        let transitions = current
            .as_ref()
            .and_then(|l| l.spec.as_ref()?.lease_transitions)
            .unwrap_or(0);
        let spec = LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if renew {
                current.as_ref().and_then(|l| l.spec.as_ref()?.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if renew || current.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        };
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                // The resourceVersion read above: another replica's write
                // since makes this one fail, and nobody takes it twice.
                lease.spec = Some(spec);
                self.api.replace(LEASE_NAME, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok((true, self.retry())),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok((false, self.retry())),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until this replica leads (or `stop`); `false` if stopped.
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        loop {
            let wait = match self.round().await {
                Ok((true, _)) => {
                    tracing::info!(replica = %self.me, "leading: this replica holds the lease");
                    return true;
                }
                Ok((false, wait)) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot read or write the lease");
                    self.retry()
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Renew while leading; returns when the lease is lost (or `stop`).
    pub async fn hold(&self, stop: &CancellationToken) -> Result<(), LeaseError> {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.retry()) => {}
            }
            match self.round().await {
                Ok((true, _)) => last_renewed = tokio::time::Instant::now(),
                Ok((false, _)) => return Err(LeaseError::Lost(last_renewed.elapsed())),
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the lease");
                    // Step down before the lease runs out (client-go's
                    // renew deadline): a standby may take it at its end,
                    // and two leaders must not overlap, clocks being what
                    // they are.
                    if last_renewed.elapsed() >= self.duration * 2 / 3 {
                        return Err(LeaseError::Lost(last_renewed.elapsed()));
                    }
                }
            }
        }
    }

    /// Give the lease up (on a clean shutdown), so a standby takes over
    /// at once rather than after the lease runs out.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await
            && lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.me.as_str())
        {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            let _ = self.api.replace(LEASE_NAME, &PostParams::default(), &lease).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_takes_the_lease() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let retry = Duration::from_secs(2);
        let lease = |holder: &str, renewed: SystemTime| Held {
            holder: holder.into(),
            renewed,
            duration: Duration::from_secs(6),
        };
        assert_eq!(decide("a", None, t0, retry), Decision::Take);
        assert_eq!(decide("a", Some(&lease("a", t0)), t0, retry), Decision::Renew);
        assert_eq!(decide("a", Some(&lease("", t0)), t0, retry), Decision::Take, "released");
        // Held by b: wait, at most the retry period, until it runs out.
        assert_eq!(decide("a", Some(&lease("b", t0)), t0, retry), Decision::Wait(retry));
        assert_eq!(
            decide("a", Some(&lease("b", t0)), t0 + Duration::from_secs(5), retry),
            Decision::Wait(Duration::from_secs(1))
        );
        assert_eq!(
            decide("a", Some(&lease("b", t0)), t0 + Duration::from_secs(6), retry),
            Decision::Wait(Duration::from_millis(100)),
            "at the very edge"
        );
        assert_eq!(
            decide("a", Some(&lease("b", t0)), t0 + Duration::from_secs(7), retry),
            Decision::Take
        );
    }
}
