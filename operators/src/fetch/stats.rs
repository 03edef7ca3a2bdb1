//! What each fetch endpoint did, for the worker's metrics and readiness probe. Endpoints
//! register themselves once per process (like the Redis pool's access problems), so that the
//! pipeline crate renders them without the stages handing them up.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::breaker::BreakerState;

/// How one HTTP request (one attempt) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchOutcome {
    /// 200.
    Ok,
    /// 404 on a single read: the entity does not exist.
    NotFound,
    /// A 5xx or 429, or a connection that failed or broke.
    Error,
    /// No answer within the timeout.
    Timeout,
    /// A 4xx other than 404 and 429 (auth, too many ids): a configuration problem.
    Refused,
    /// A 200 whose body is not rows.
    Invalid,
    /// Not sent: the circuit breaker is open.
    CircuitOpen,
}

impl FetchOutcome {
    /// Every outcome, in label order.
    pub const ALL: [FetchOutcome; 7] = [
        FetchOutcome::Ok,
        FetchOutcome::NotFound,
        FetchOutcome::Error,
        FetchOutcome::Timeout,
        FetchOutcome::Refused,
        FetchOutcome::Invalid,
        FetchOutcome::CircuitOpen,
    ];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchOutcome::Ok => "ok",
            FetchOutcome::NotFound => "not_found",
            FetchOutcome::Error => "error",
            FetchOutcome::Timeout => "timeout",
            FetchOutcome::Refused => "refused",
            FetchOutcome::Invalid => "invalid",
            FetchOutcome::CircuitOpen => "circuit_open",
        }
    }
}

/// Seconds buckets of the request latency histogram (1 ms .. 30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The counters of one endpoint (a base URL, without credentials or query).
#[derive(Debug)]
pub struct EndpointStats {
    /// The `endpoint` label.
    pub endpoint: String,
    requests: [AtomicU64; 7],
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    ids_fetched: AtomicU64,
    breaker: AtomicU8,
    unavailable: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl EndpointStats {
    fn new(endpoint: &str) -> Self {
        EndpointStats {
            endpoint: endpoint.to_string(),
            requests: Default::default(),
            buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_micros: AtomicU64::new(0),
            ids_fetched: AtomicU64::new(0),
            breaker: AtomicU8::new(0),
            unavailable: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// Counts one request and, when it was sent, how long it took.
    pub fn record(&self, outcome: FetchOutcome, seconds: Option<f64>) {
        let i = FetchOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if let Some(seconds) = seconds {
            let seconds = seconds.max(0.0);
            if let Some(b) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
                self.buckets[b].fetch_add(1, Ordering::Relaxed);
            }
            self.latency_count.fetch_add(1, Ordering::Relaxed);
            self.latency_sum_micros
                .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        }
    }

    /// Requests by outcome label.
    pub fn requests(&self) -> Vec<(&'static str, u64)> {
        FetchOutcome::ALL
            .iter()
            .zip(&self.requests)
            .map(|(o, n)| (o.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Requests that failed (every outcome but `ok` and `not_found`).
    pub fn errors(&self) -> u64 {
        self.requests()
            .iter()
            .filter(|(o, _)| !matches!(*o, "ok" | "not_found"))
            .map(|(_, n)| n)
            .sum()
    }

    /// The latency histogram: (upper bound, cumulative count) per bucket, sum, count.
    pub fn latency(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        (
            buckets,
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.latency_count.load(Ordering::Relaxed),
        )
    }

    /// Counts ids answered (found or missing).
    pub fn add_ids(&self, n: usize) {
        self.ids_fetched.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Ids answered (found or missing).
    pub fn ids(&self) -> u64 {
        self.ids_fetched.load(Ordering::Relaxed)
    }

    /// Records the breaker's state.
    pub fn set_breaker(&self, state: BreakerState) {
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.breaker.store(v, Ordering::Relaxed);
    }

    /// The breaker's last recorded state.
    pub fn breaker(&self) -> BreakerState {
        match self.breaker.load(Ordering::Relaxed) {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Marks the endpoint unreachable (a stage holds its batch waiting for it) with why, or
    /// reachable again.
    pub fn set_unavailable(&self, why: Option<String>) {
        self.unavailable.store(why.is_some(), Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = why;
        }
    }

    /// Why a stage is waiting for the endpoint, if one is.
    pub fn unavailable(&self) -> Option<String> {
        if !self.unavailable.load(Ordering::Relaxed) {
            return None;
        }
        let why = self.last_error.lock().ok().and_then(|l| l.clone());
        Some(why.unwrap_or_else(|| "unreachable".into()))
    }
}

fn registry() -> &'static Mutex<Vec<Arc<EndpointStats>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Arc<EndpointStats>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// The counters of `endpoint`, registered on first use (clients of one endpoint share them).
pub(crate) fn register(endpoint: &str) -> Arc<EndpointStats> {
    let Ok(mut all) = registry().lock() else {
        return Arc::new(EndpointStats::new(endpoint));
    };
    if let Some(found) = all.iter().find(|s| s.endpoint == endpoint) {
        return found.clone();
    }
    let stats = Arc::new(EndpointStats::new(endpoint));
    all.push(stats.clone());
    stats
}

/// Every endpoint a client of this process talks to.
pub fn endpoints() -> Vec<Arc<EndpointStats>> {
    registry().lock().map(|all| all.clone()).unwrap_or_default()
}

/// `fetch endpoint <url> is unreachable: <why>` for each endpoint a stage is waiting for.
pub fn unavailable_endpoints() -> Vec<String> {
    endpoints()
        .iter()
        .filter_map(|s| {
            let why = s.unavailable()?;
            let breaker = match s.breaker() {
                BreakerState::Closed => String::new(),
                state => format!(" (circuit {})", state.as_str()),
            };
            Some(format!(
                "fetch endpoint {} is unreachable{breaker}: {why}",
                s.endpoint
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_outcome_and_buckets_latency() {
        let s = register("http://stats-test.invalid/snapshot");
        s.record(FetchOutcome::Ok, Some(0.003));
        s.record(FetchOutcome::Timeout, Some(2.0));
        s.record(FetchOutcome::CircuitOpen, None);
        let requests = s.requests();
        assert!(requests.contains(&("ok", 1)) && requests.contains(&("circuit_open", 1)));
        assert_eq!(s.errors(), 2);
        let (buckets, sum, count) = s.latency();
        assert_eq!(count, 2);
        assert!((sum - 2.003).abs() < 1e-6);
        assert_eq!(
            buckets.iter().find(|(b, _)| *b == 0.005).map(|b| b.1),
            Some(1)
        );
        assert!(Arc::ptr_eq(
            &s,
            &register("http://stats-test.invalid/snapshot")
        ));
        s.set_unavailable(Some("connection refused".into()));
        assert!(
            unavailable_endpoints()
                .iter()
                .any(|r| r.contains("stats-test.invalid") && r.contains("connection refused"))
        );
        s.set_unavailable(None);
        assert!(s.unavailable().is_none());
    }
}
