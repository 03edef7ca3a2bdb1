//! The one retry policy: capped exponential backoff with jitter, for every loop that waits for
//! a store, a stream or an endpoint to come back. Every such loop keeps a [`Backoff`], asks it
//! for the next delay, and resets it on success.

use std::time::Duration;

use crate::shutdown::Shutdown;

/// First delay.
const BASE: Duration = Duration::from_millis(100);
/// Longest delay.
const CAP: Duration = Duration::from_secs(5);

/// Capped exponential backoff with jitter (about 100 ms, 200 ms, 400 ms, … up to 5 s) and the
/// count of consecutive failures it has seen.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A policy that has seen no failure yet.
    pub fn new() -> Self {
        Backoff::default()
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let wait = delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// Forgets the failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure and waits the next delay; `false` if shutdown came first.
    pub async fn wait(&mut self, shutdown: &mut Shutdown) -> bool {
        sleep_or_shutdown(self.next_delay(), shutdown).await
    }
}

/// Sleeps for `wait`; `false` if shutdown came first.
pub async fn sleep_or_shutdown(wait: Duration, shutdown: &mut Shutdown) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.wait() => false,
    }
}

/// The delay after `failures` consecutive failures: base × 2^failures, capped, minus an eighth
/// plus up to a quarter of jitter so that workers that failed together do not retry together.
fn delay(failures: u32) -> Duration {
    let base = u64::try_from(BASE.as_millis()).unwrap_or(u64::MAX);
    let cap = u64::try_from(CAP.as_millis()).unwrap_or(u64::MAX);
    let ms = base.saturating_mul(1u64 << failures.min(16)).min(cap);
    let jitter = rand::random_range(0..=ms / 4);
    Duration::from_millis(ms - ms / 8 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_up_to_the_cap_with_bounded_jitter() {
        let mut backoff = Backoff::new();
        let mut previous_floor = 0;
        for failure in 0..20u32 {
            let wait = u64::try_from(backoff.next_delay().as_millis()).unwrap();
            let nominal = (100u64 << failure.min(16)).min(5_000);
            assert!(
                wait >= nominal - nominal / 8,
                "failure {failure}: {wait} ms"
            );
            // The jitter adds up to a quarter to the floor: at most nominal + 1/8 (rounding
            // may add a millisecond).
            assert!(
                wait <= nominal - nominal / 8 + nominal / 4,
                "failure {failure}: {wait} ms"
            );
            assert!(nominal - nominal / 8 >= previous_floor);
            previous_floor = nominal - nominal / 8;
        }
        assert_eq!(backoff.failures(), 20);
        backoff.reset();
        assert_eq!(backoff.failures(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(113));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_the_delay_or_at_shutdown_whichever_is_first() {
        let (trigger, mut shutdown) = Shutdown::new();
        let mut backoff = Backoff::new();
        let started = tokio::time::Instant::now();
        assert!(backoff.wait(&mut shutdown).await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(87) && waited <= Duration::from_millis(113));

        for _ in 0..10 {
            backoff.next_delay();
        }
        let started = tokio::time::Instant::now();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.send_replace(true);
        });
        assert!(!backoff.wait(&mut shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        stopper.await.unwrap();
    }
}
