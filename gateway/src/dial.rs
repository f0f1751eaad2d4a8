//! When to dial a peer gateway (sans-IO: the caller passes the time).
//!
//! One dial per peer at a time; streams that arrive during a dial wait for
//! it. After a failed dial the peer is not dialed again for 100 ms, doubling
//! per failure in a row up to 5 s, and it is *suspect*: until a dial
//! succeeds, streams are refused at once while dials go on in the
//! background, rather than each waiting for a handshake with a peer that may
//! be gone. A peer whose connection went silent is suspect too.

use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long to wait after `failures` failed dials in a row.
pub fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(MAX_BACKOFF)
}

/// The dialing state of one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DialState {
    failures: u32,
    retry_at: Option<Instant>,
    suspect: bool,
}

impl DialState {
    /// Whether streams should be refused at once (and a dial started in
    /// the background) rather than wait for a dial.
    pub fn is_suspect(&self) -> bool {
        self.suspect
    }

    /// `Ok` if a dial may start at `now`, else how long the backoff lasts.
    pub fn may_dial(&self, now: Instant) -> Result<(), Duration> {
        match self.retry_at.map(|t| t.saturating_duration_since(now)) {
            Some(left) if !left.is_zero() => Err(left),
            _ => Ok(()),
        }
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    pub fn failed(&mut self, now: Instant) {
        self.failures += 1;
        self.retry_at = Some(now + backoff(self.failures));
        self.suspect = true;
    }

    /// The peer's connection went silent: it is taken for dead.
    pub fn went_silent(&mut self) {
        self.suspect = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let ms: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn failures_hold_dials_back_and_mark_the_peer_suspect() {
        let t0 = Instant::now();
        let mut d = DialState::default();
        assert!(!d.is_suspect());
        assert_eq!(d.may_dial(t0), Ok(()));
        d.failed(t0);
        assert!(d.is_suspect());
        assert_eq!(d.may_dial(t0), Err(Duration::from_millis(100)));
        assert_eq!(d.may_dial(t0 + Duration::from_millis(100)), Ok(()));
        d.failed(t0 + Duration::from_millis(100));
        assert_eq!(
            d.may_dial(t0 + Duration::from_millis(150)),
            Err(Duration::from_millis(150))
        );
        d.succeeded();
        assert_eq!(d, DialState::default());
        // Silence makes a peer suspect without holding dials back.
        d.went_silent();
        assert!(d.is_suspect());
        assert_eq!(d.may_dial(t0), Ok(()));
    }
}
