//! A worker's counters, gauges and histograms: written by the run loop, read by the metrics
//! endpoint, `ecst bench` and the readiness probe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ecst_operators::DeadLetterReason;

/// How often the group's lag and pending count are read into [`GroupStats`].
pub const GROUP_REFRESH: Duration = Duration::from_secs(5);

/// Seconds buckets for latencies (1 ms .. 5 min).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Entries-per-batch buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// A histogram with fixed buckets, updated without locks.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// A latency histogram, in seconds.
    pub fn latency() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }

    /// A batch-size histogram, in entries.
    pub fn batch_size() -> Self {
        Histogram::new(BATCH_BUCKETS)
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let value = value.max(0.0);
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    /// The cumulative count per upper bound, the sum and the count of observations.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(bound, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's state at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, observations at or below it), in increasing bound order.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// What one sink applied, and when.
#[derive(Debug)]
pub struct SinkStats {
    /// The sink's stage name.
    pub name: String,
    /// Records written.
    pub applied: AtomicU64,
    /// Records the store's guard found not newer.
    pub stale: AtomicU64,
    /// Patches whose base the replica did not hold (a version missing before them).
    pub delta_gaps: AtomicU64,
    /// Gapped patches whose aggregate's fetched full state (at their version or newer) was
    /// applied instead.
    pub delta_repaired: AtomicU64,
    /// Newest `occurredAt` applied, Unix ms (0: none yet).
    pub newest_source_ms: AtomicI64,
    /// Last successful apply, Unix ms (0: none yet).
    pub last_apply_ms: AtomicI64,
    /// Apply time minus `occurredAt` of the newest record of the last batch, ms.
    pub last_lag_ms: AtomicI64,
    /// Apply time minus `occurredAt`, per record.
    pub apply_lag: Histogram,
    /// Duration of each batch apply (retries included).
    pub apply_duration: Histogram,
    /// Whether the sink is failing (in backoff) right now.
    pub failing: AtomicBool,
}

impl SinkStats {
    /// Counters of a sink named `name`.
    pub fn new(name: &str) -> Self {
        SinkStats {
            name: name.to_string(),
            applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            delta_gaps: AtomicU64::new(0),
            delta_repaired: AtomicU64::new(0),
            newest_source_ms: AtomicI64::new(0),
            last_apply_ms: AtomicI64::new(0),
            last_lag_ms: AtomicI64::new(0),
            apply_lag: Histogram::latency(),
            apply_duration: Histogram::latency(),
            failing: AtomicBool::new(false),
        }
    }
}

/// Time spent in one transform stage.
#[derive(Debug)]
pub struct StageStats {
    /// The stage's name.
    pub name: String,
    /// Per batch.
    pub duration: Histogram,
}

/// The consumer group as XINFO last showed it.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Entries not yet delivered to the group (-1: unknown).
    pub lag: AtomicI64,
    /// Entries delivered and not acked.
    pub pending: AtomicI64,
    /// Idle time of the oldest pending entry, ms.
    pub oldest_pending_idle_ms: AtomicI64,
    /// When these were read, Unix ms (0: never).
    pub refreshed_ms: AtomicI64,
}

/// One partition of a partitioned stream, as this worker sees it.
#[derive(Debug, Default)]
pub struct PartitionStats {
    /// The partition's part of the group, while this worker holds it.
    pub group: GroupStats,
    /// This worker holds the partition's lease.
    pub owned: AtomicBool,
    /// The fencing generation of the current (or last) lease.
    pub generation: AtomicU64,
    /// Times this worker took the partition.
    pub acquired: AtomicU64,
    /// Times this worker found the partition taken by another worker before it gave it back.
    pub lost: AtomicU64,
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Counters of one worker, shared with the benchmark and the metrics endpoint.
#[derive(Debug)]
pub struct Stats {
    /// Entries read from the stream.
    pub read: AtomicU64,
    /// Records written by sinks.
    pub applied: AtomicU64,
    /// Records dropped as not newer (by `version_filter` or a store guard).
    pub stale: AtomicU64,
    /// Records dropped as not newer by `version_filter`.
    pub stale_filtered: AtomicU64,
    /// Records dropped by `where:` or `tombstone mode: ignore`.
    pub filtered: AtomicU64,
    /// Entries sent to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Entries acknowledged.
    pub acked: AtomicU64,
    /// Records a store refused after other sinks of the fan-out had applied them.
    pub fanout_divergent: AtomicU64,
    /// Sink, dead-letter or ack attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Decisions published to an attached `ecst tap`.
    pub tap_decisions_published: AtomicU64,
    /// Sinks currently failing (in backoff).
    pub failing_sinks: AtomicUsize,
    /// A bootstrap is running (here, or in another worker this one waits for).
    pub bootstrapping: AtomicBool,
    /// Snapshot rows applied by bootstraps.
    pub bootstrap_rows: AtomicU64,
    /// The group missed entries that are gone from the stream, and no bootstrap fixed it yet.
    pub retention_gap: AtomicBool,
    /// Retention gaps detected.
    pub gaps_detected: AtomicU64,
    /// The last read from the stream succeeded.
    pub source_connected: AtomicBool,
    /// Entries per batch read.
    pub batch_size: Histogram,
    /// The consumer group, as last read.
    pub group: GroupStats,
    sinks: OnceLock<Vec<SinkStats>>,
    stages: OnceLock<Vec<StageStats>>,
    dead_letter_reasons: Mutex<BTreeMap<&'static str, u64>>,
    latencies_ms: Mutex<Option<Vec<u32>>>,
    partitions: Mutex<BTreeMap<u32, Arc<PartitionStats>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            read: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            stale_filtered: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            fanout_divergent: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            tap_decisions_published: AtomicU64::new(0),
            failing_sinks: AtomicUsize::new(0),
            bootstrapping: AtomicBool::new(false),
            bootstrap_rows: AtomicU64::new(0),
            retention_gap: AtomicBool::new(false),
            gaps_detected: AtomicU64::new(0),
            source_connected: AtomicBool::new(false),
            batch_size: Histogram::batch_size(),
            group: GroupStats::default(),
            sinks: OnceLock::new(),
            stages: OnceLock::new(),
            dead_letter_reasons: Mutex::new(BTreeMap::new()),
            latencies_ms: Mutex::new(None),
            partitions: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Stats {
    /// Per-sink counters, in the DAG's sink order (empty before the worker built its DAG).
    pub fn sinks(&self) -> &[SinkStats] {
        self.sinks.get().map_or(&[], Vec::as_slice)
    }

    /// Per-stage timings (empty before the worker built its DAG).
    pub fn stages(&self) -> &[StageStats] {
        self.stages.get().map_or(&[], Vec::as_slice)
    }

    /// Names the stages and sinks of the worker's DAG; only the first call counts.
    pub(crate) fn register(&self, stages: Vec<StageStats>, sinks: Vec<SinkStats>) {
        let _ = self.stages.set(stages);
        let _ = self.sinks.set(sinks);
    }

    /// The counters of partition `p` (created on first use).
    pub fn partition(&self, partition: u32) -> Arc<PartitionStats> {
        match self.partitions.lock() {
            Ok(mut map) => map.entry(partition).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Every partition this worker has held, by number.
    pub fn partitions(&self) -> Vec<(u32, Arc<PartitionStats>)> {
        self.partitions
            .lock()
            .map(|m| m.iter().map(|(p, s)| (*p, s.clone())).collect())
            .unwrap_or_default()
    }

    /// Dead letters by reason class.
    pub fn dead_letter_reasons(&self) -> Vec<(&'static str, u64)> {
        self.dead_letter_reasons
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    pub(crate) fn count_dead_letter(&self, reason: &DeadLetterReason) {
        if let Ok(mut m) = self.dead_letter_reasons.lock() {
            *m.entry(reason.class()).or_default() += 1;
        }
        if reason.is_divergent() {
            self.fanout_divergent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts recording, per acked entry, the time from its XADD (its id) to its ack.
    pub fn record_latencies(&self) {
        if let Ok(mut guard) = self.latencies_ms.lock() {
            *guard = Some(Vec::new());
        }
    }

    /// Takes the recorded latencies, in milliseconds.
    pub fn take_latencies(&self) -> Vec<u32> {
        self.latencies_ms
            .lock()
            .ok()
            .and_then(|mut guard| guard.as_mut().map(std::mem::take))
            .unwrap_or_default()
    }

    pub(crate) fn note_latencies(&self, ids: &[String]) {
        let Ok(mut guard) = self.latencies_ms.lock() else {
            return;
        };
        let Some(samples) = guard.as_mut() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        samples.extend(ids.iter().map(|id| {
            u32::try_from(now.saturating_sub(crate::redis_reply::parse_id(id).0))
                .unwrap_or(u32::MAX)
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(9.0);
        assert_eq!(
            h.snapshot(),
            HistogramSnapshot {
                buckets: vec![(1.0, 1), (2.0, 2)],
                sum: 11.0,
                count: 3
            }
        );
    }
}
