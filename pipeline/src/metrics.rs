//! Prometheus metrics of a worker, `/healthz` and `/readyz`, served over HTTP.
//!
//! Freshness is measured from what the worker applied, per sink: `ecst_source_age_seconds`
//! (now minus the newest `occurredAt` applied), `ecst_replicated_age_seconds` (now minus the
//! last successful apply) and `ecst_apply_lag_seconds` (apply time minus `occurredAt`). Labels
//! are pipeline, sink, stage and dead-letter reason class: never an aggregate id.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::runner::{Shutdown, Stats};

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

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
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

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Dead-letter reasons, folded into a few classes so that the label stays bounded.
pub fn reason_class(reason: &str) -> &'static str {
    if reason.starts_with("delivered ") {
        "max_deliveries"
    } else if reason.starts_with("trimmed") {
        "trimmed"
    } else if reason.starts_with("sink `") {
        "sink_rejected"
    } else if reason.starts_with("snapshot") {
        "snapshot"
    } else {
        "invalid_event"
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus text exposition of a worker's stats.
pub fn render(pipeline: &str, stats: &Stats) -> String {
    let now = now_ms();
    let p = format!("pipeline=\"{}\"", escape(pipeline));
    let mut out = String::with_capacity(8192);
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        metric(out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{p}}} {value}");
    };
    counter(
        &mut out,
        "ecst_events_read_total",
        "Stream entries read.",
        stats.read.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "ecst_events_acked_total",
        "Stream entries acknowledged after commit.",
        stats.acked.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "ecst_events_filtered_total",
        "Records dropped by where: or tombstone mode ignore.",
        stats.filtered.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "ecst_retries_total",
        "Sink, dead-letter and ack attempts that failed and were retried.",
        stats.retries.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "ecst_bootstrap_rows_total",
        "Snapshot rows applied by bootstraps.",
        stats.bootstrap_rows.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "ecst_retention_gaps_total",
        "Retention gaps detected.",
        stats.gaps_detected.load(Ordering::Relaxed),
    );

    metric(
        &mut out,
        "ecst_events_dead_lettered_total",
        "counter",
        "Entries sent to the dead-letter stream, by reason class.",
    );
    for (reason, count) in stats.dead_letter_reasons() {
        let _ = writeln!(
            out,
            "ecst_events_dead_lettered_total{{{p},reason=\"{reason}\"}} {count}"
        );
    }

    let sinks = stats.sinks();
    metric(
        &mut out,
        "ecst_events_applied_total",
        "counter",
        "Records written by a sink.",
    );
    for s in sinks {
        let _ = writeln!(
            out,
            "ecst_events_applied_total{{{p},sink=\"{}\"}} {}",
            escape(&s.name),
            s.applied.load(Ordering::Relaxed)
        );
    }
    counter(
        &mut out,
        "ecst_events_skipped_stale_total",
        "Records version_filter dropped as not newer than one it already passed.",
        stats.stale_filtered.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "ecst_events_stale_total",
        "counter",
        "Records a sink did not write because the replica already had a newer or equal version (the store's guard).",
    );
    for s in sinks {
        let _ = writeln!(
            out,
            "ecst_events_stale_total{{{p},sink=\"{}\"}} {}",
            escape(&s.name),
            s.stale.load(Ordering::Relaxed)
        );
    }
    let age = |ms: i64| {
        if ms == 0 {
            f64::NAN
        } else {
            (now - ms) as f64 / 1000.0
        }
    };
    metric(
        &mut out,
        "ecst_source_age_seconds",
        "gauge",
        "Now minus the newest occurredAt applied (end-to-end freshness). NaN before the first apply.",
    );
    for s in sinks {
        let _ = writeln!(
            out,
            "ecst_source_age_seconds{{{p},sink=\"{}\"}} {}",
            escape(&s.name),
            age(s.newest_source_ms.load(Ordering::Relaxed))
        );
    }
    metric(
        &mut out,
        "ecst_replicated_age_seconds",
        "gauge",
        "Now minus the last successful apply. NaN before the first apply.",
    );
    for s in sinks {
        let _ = writeln!(
            out,
            "ecst_replicated_age_seconds{{{p},sink=\"{}\"}} {}",
            escape(&s.name),
            age(s.last_apply_ms.load(Ordering::Relaxed))
        );
    }
    metric(
        &mut out,
        "ecst_apply_lag_last_seconds",
        "gauge",
        "Apply time minus occurredAt of the newest record of the last batch.",
    );
    for s in sinks {
        let _ = writeln!(
            out,
            "ecst_apply_lag_last_seconds{{{p},sink=\"{}\"}} {}",
            escape(&s.name),
            s.last_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
    metric(
        &mut out,
        "ecst_apply_lag_seconds",
        "histogram",
        "Apply time minus occurredAt, per record applied.",
    );
    for s in sinks {
        s.apply_lag.render(
            &mut out,
            "ecst_apply_lag_seconds",
            &format!("{p},sink=\"{}\"", escape(&s.name)),
        );
    }
    metric(
        &mut out,
        "ecst_sink_apply_duration_seconds",
        "histogram",
        "Time to apply one batch to a sink, retries included.",
    );
    for s in sinks {
        s.apply_duration.render(
            &mut out,
            "ecst_sink_apply_duration_seconds",
            &format!("{p},sink=\"{}\"", escape(&s.name)),
        );
    }
    metric(
        &mut out,
        "ecst_sink_failing",
        "gauge",
        "1 while the sink is failing and retrying with backoff.",
    );
    for s in sinks {
        let _ = writeln!(
            out,
            "ecst_sink_failing{{{p},sink=\"{}\"}} {}",
            escape(&s.name),
            u8::from(s.failing.load(Ordering::Relaxed))
        );
    }
    metric(
        &mut out,
        "ecst_stage_duration_seconds",
        "histogram",
        "Time a transform stage spent on one batch.",
    );
    for s in stats.stages() {
        s.duration.render(
            &mut out,
            "ecst_stage_duration_seconds",
            &format!("{p},stage=\"{}\"", escape(&s.name)),
        );
    }
    metric(
        &mut out,
        "ecst_batch_size",
        "histogram",
        "Entries per batch read.",
    );
    stats.batch_size.render(&mut out, "ecst_batch_size", &p);

    let g = &stats.group;
    let known = g.refreshed_ms.load(Ordering::Relaxed) != 0;
    let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
        metric(out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{p}}} {value}");
    };
    let lag = g.lag.load(Ordering::Relaxed);
    gauge(
        &mut out,
        "ecst_group_lag",
        "Entries in the stream not yet delivered to the group (XINFO GROUPS lag; NaN when Redis cannot tell).",
        if known && lag >= 0 {
            lag as f64
        } else {
            f64::NAN
        },
    );
    gauge(
        &mut out,
        "ecst_group_pending",
        "Entries delivered to the group and not acked.",
        if known {
            g.pending.load(Ordering::Relaxed) as f64
        } else {
            f64::NAN
        },
    );
    gauge(
        &mut out,
        "ecst_group_oldest_pending_idle_seconds",
        "Idle time of the oldest pending entry.",
        if known {
            g.oldest_pending_idle_ms.load(Ordering::Relaxed) as f64 / 1000.0
        } else {
            f64::NAN
        },
    );
    gauge(
        &mut out,
        "ecst_retention_gap",
        "1 while the group has missed entries that are gone from the stream.",
        f64::from(u8::from(stats.retention_gap.load(Ordering::Relaxed))),
    );
    gauge(
        &mut out,
        "ecst_bootstrap_in_progress",
        "1 while this worker bootstraps or waits for another worker's bootstrap.",
        f64::from(u8::from(stats.bootstrapping.load(Ordering::Relaxed))),
    );
    gauge(
        &mut out,
        "ecst_source_connected",
        "1 while the last read from the stream succeeded.",
        f64::from(u8::from(stats.source_connected.load(Ordering::Relaxed))),
    );
    out
}

/// Why the worker is not ready, if it is not.
pub fn not_ready(stats: &Stats) -> Option<String> {
    let mut reasons = Vec::new();
    if !stats.source_connected.load(Ordering::Relaxed) {
        reasons.push("not connected to the source stream".to_string());
    }
    for s in stats.sinks() {
        if s.failing.load(Ordering::Relaxed) {
            reasons.push(format!("sink {} is failing", s.name));
        }
    }
    if stats.bootstrapping.load(Ordering::Relaxed) {
        reasons.push("a bootstrap is in progress".to_string());
    }
    if stats.retention_gap.load(Ordering::Relaxed) {
        reasons.push("retention gap".to_string());
    }
    reasons.extend(ecst_operators::redis_pool::access_problems());
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

struct Served {
    pipeline: String,
    stats: Arc<Stats>,
}

/// Binds the metrics address (so that a taken port fails the start, not a later probe).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pipeline: String,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "Metrics on /metrics, probes on /healthz and /readyz.");
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<Served>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&s.pipeline, &s.stats),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<Served>>| async move {
                match not_ready(&s.stats) {
                    None => (StatusCode::OK, "ready\n".to_string()).into_response(),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    )
                        .into_response(),
                }
            }),
        )
        .with_state(Arc::new(Served { pipeline, stats }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

/// How often the group's lag and pending count are read.
pub const GROUP_REFRESH: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(9.0);
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 11\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn reasons_fold_into_bounded_classes() {
        assert_eq!(
            reason_class("delivered 6 times, over max_deliveries 5"),
            "max_deliveries"
        );
        assert_eq!(
            reason_class("sink `table`: column `points`: ..."),
            "sink_rejected"
        );
        assert_eq!(
            reason_class("body is not JSON: expected value"),
            "invalid_event"
        );
    }
}
