//! The circuit breaker: closed while requests succeed, open (failing fast) for a while after
//! consecutive failures, then half-open: one trial request decides.

use std::time::{Duration, Instant};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Requests fail fast until the open period ends.
    Open,
    /// One trial request is let through; its outcome closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// The state's stable name (`closed`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A circuit breaker over consecutive failures.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures (0: never), for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            threshold,
            open_for,
            failures: 0,
            opened_at: None,
            trial_in_flight: false,
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now.duration_since(at) < self.open_for => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go now; a half-open breaker lets one trial through at a time.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.trial_in_flight => false,
            BreakerState::HalfOpen => {
                self.trial_in_flight = true;
                true
            }
        }
    }

    /// A request succeeded: the breaker closes.
    pub fn success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.trial_in_flight = false;
    }

    /// A request failed: a failed trial reopens the breaker, enough failures open it.
    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let trial = std::mem::take(&mut self.trial_in_flight);
        if trial || (self.threshold > 0 && self.failures >= self.threshold) {
            self.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_then_one_trial_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.admit(t0));
            b.failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.admit(t0 + Duration::from_secs(9)));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.admit(later));
        assert!(!b.admit(later), "only one trial at a time");
        b.failure(later);
        assert_eq!(b.state(later), BreakerState::Open);
        let again = later + Duration::from_secs(10);
        assert!(b.admit(again));
        b.success();
        assert_eq!(b.state(again), BreakerState::Closed);
        assert!(b.admit(again) && b.admit(again));
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let now = Instant::now();
        let mut b = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            b.failure(now);
        }
        assert!(b.admit(now));
    }
}
