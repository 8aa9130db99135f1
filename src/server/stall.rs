//! Stall detection for connections whose replies come back in order: if requests wait and no
//! reply at all has arrived for `limit`, the connection is taken as stalled (one stuck reply
//! holds up every later one). Sampled once per tick, so the hot path never reads the clock;
//! time is passed in, so the rule is tested without sleeping.

use std::time::{Duration, Instant};

/// How often to sample for a given limit.
pub(crate) fn tick_for(limit: Duration) -> Duration {
    (limit / 8).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// The state of one connection's stall detector.
#[derive(Debug, Default)]
pub(crate) struct StallClock {
    last_seen: u64,
    since: Option<Instant>,
}

impl StallClock {
    /// One sample. `waiting`: a request awaits a reply that should not take long; `seen`: how
    /// many replies the connection has delivered so far. True when nothing has moved for
    /// `limit` (within half a tick); the clock then starts over.
    pub(crate) fn stalled(&mut self, waiting: bool, seen: u64, now: Instant, limit: Duration, tick: Duration) -> bool {
        if !waiting || seen != self.last_seen {
            self.last_seen = seen;
            self.since = waiting.then_some(now);
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) + tick / 2 >= limit {
            self.since = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_only_when_nothing_moves_for_the_limit() {
        let limit = Duration::from_millis(500);
        let tick = tick_for(limit);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut c = StallClock::default();
        assert!(!c.stalled(false, 0, at(0), limit, tick), "idle is never stalled");
        assert!(!c.stalled(true, 0, at(100), limit, tick));
        assert!(!c.stalled(true, 5, at(400), limit, tick), "replies moved: clock restarts");
        assert!(!c.stalled(true, 5, at(800), limit, tick));
        assert!(c.stalled(true, 5, at(900), limit, tick), "500 ms without a reply");
        assert!(!c.stalled(true, 5, at(950), limit, tick), "starts over after reporting");
    }
}
