//! Is a peer gateway still there? (sans-IO)
//!
//! Keep-alives, which the peer acknowledges, keep packets coming even when
//! no tunnel is busy, so a connection on which nothing at all arrived for
//! the peer timeout has a dead peer or path behind it: it is closed, and
//! the tunnels in it fail over at once instead of at QUIC's idle timeout.

use std::time::{Duration, Instant};

pub struct Silence {
    seen: u64,
    heard_at: Instant,
    timeout: Duration,
}

impl Silence {
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Self {
            seen: 0,
            heard_at: now,
            timeout,
        }
    }

    /// Look at the count of datagrams received so far: `Some(silent for)`
    /// once nothing has arrived for the timeout.
    pub fn observe(&mut self, received: u64, now: Instant) -> Option<Duration> {
        if received != self.seen {
            (self.seen, self.heard_at) = (received, now);
            return None;
        }
        let silent = now.duration_since(self.heard_at);
        (silent >= self.timeout).then_some(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_time_without_a_datagram() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Silence::new(t0, Duration::from_millis(600));
        assert_eq!(s.observe(0, ms(500)), None);
        assert_eq!(s.observe(3, ms(550)), None, "a datagram resets the clock");
        assert_eq!(s.observe(3, ms(1100)), None);
        assert_eq!(s.observe(3, ms(1150)), Some(Duration::from_millis(600)));
        assert_eq!(s.observe(4, ms(1200)), None);
    }
}
