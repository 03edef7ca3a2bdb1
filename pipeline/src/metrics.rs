//! Prometheus metrics of a worker, `/healthz` and `/readyz`, served over HTTP.
//!
//! Freshness is measured from what the worker applied, per sink: `ecst_source_age_seconds`
//! (now minus the newest `occurredAt` applied), `ecst_replicated_age_seconds` (now minus the
//! last successful apply) and `ecst_apply_lag_seconds` (apply time minus `occurredAt`). Labels
//! are pipeline, sink, stage and dead-letter reason class: never an aggregate id.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::shutdown::Shutdown;
use crate::stats::{HistogramSnapshot, Stats, now_ms};

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, h: &HistogramSnapshot, name: &str, labels: &str) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, cumulative) in &h.buckets {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    let total = h.count;
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
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
    counter(
        &mut out,
        "ecst_fanout_divergent_total",
        "Records a store refused after other sinks of the fan-out applied them: the replicas disagree on them.",
        stats.fanout_divergent.load(Ordering::Relaxed),
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
        histogram(
            &mut out,
            &s.apply_lag.snapshot(),
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
        histogram(
            &mut out,
            &s.apply_duration.snapshot(),
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
        histogram(
            &mut out,
            &s.duration.snapshot(),
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
    histogram(
        &mut out,
        &stats.batch_size.snapshot(),
        "ecst_batch_size",
        &p,
    );

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_with_sum_and_count() {
        let h = HistogramSnapshot {
            buckets: vec![(1.0, 1), (2.0, 2)],
            sum: 11.0,
            count: 3,
        };
        let mut out = String::new();
        histogram(&mut out, &h, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 11\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }
}
