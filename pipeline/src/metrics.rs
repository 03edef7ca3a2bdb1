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
    use crate::stats::{SinkStats, StageStats};
    use std::collections::{BTreeMap, BTreeSet};

    /// A sample line's name, its labels (in order) and its value.
    type Sample = (String, Vec<(String, String)>, String);

    /// Splits `name{a="x",b="y"} value` into its parts, undoing the label-value escapes.
    fn parse_sample(line: &str) -> Sample {
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let Some((name, rest)) = series.split_once('{') else {
            return (series.to_string(), Vec::new(), value.to_string());
        };
        let mut labels = Vec::new();
        let mut chars = rest.chars();
        loop {
            let label: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if label.is_empty() || label == "}" {
                break;
            }
            assert_eq!(chars.next(), Some('"'), "{line}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => panic!("{line}"),
                    },
                    c => value.push(c),
                }
            }
            labels.push((label.trim_start_matches(',').to_string(), value));
        }
        (name.to_string(), labels, value.to_string())
    }

    /// Parses an exposition into its `# TYPE`s (family -> type) and its samples.
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let (name, kind) = declared.split_once(' ').expect("a type");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "{name} declared twice"
                );
            } else if !line.starts_with('#') && !line.is_empty() {
                samples.push(parse_sample(line));
            }
        }
        (types, samples)
    }

    /// A worker with two sinks and a stage, some of everything counted.
    fn busy_stats() -> Stats {
        let stats = Stats::default();
        stats.register(
            vec![StageStats {
                name: "decode".into(),
                duration: crate::stats::Histogram::latency(),
            }],
            vec![SinkStats::new("cache"), SinkStats::new("table")],
        );
        stats.read.store(7, Ordering::Relaxed);
        stats.acked.store(6, Ordering::Relaxed);
        stats.count_dead_letter("body is not JSON: expected value");
        stats.count_dead_letter("delivered 6 times, over max_deliveries 5");
        let cache = &stats.sinks()[0];
        cache.applied.store(5, Ordering::Relaxed);
        cache
            .newest_source_ms
            .store(now_ms() - 2_000, Ordering::Relaxed);
        cache
            .last_apply_ms
            .store(now_ms() - 1_000, Ordering::Relaxed);
        cache.apply_lag.observe(0.004);
        cache.failing.store(true, Ordering::Relaxed);
        stats.stages()[0].duration.observe(0.5);
        stats.batch_size.observe(7.0);
        stats.source_connected.store(true, Ordering::Relaxed);
        stats
    }

    /// Every series as `type name{label="value",...}`, labels sorted, `le` left out (the
    /// bucket bounds are checked on their own).
    const EXPECTED_SERIES: &[&str] = &[
        r#"counter ecst_bootstrap_rows_total{pipeline="p"}"#,
        r#"counter ecst_events_acked_total{pipeline="p"}"#,
        r#"counter ecst_events_applied_total{pipeline="p",sink="cache"}"#,
        r#"counter ecst_events_applied_total{pipeline="p",sink="table"}"#,
        r#"counter ecst_events_dead_lettered_total{pipeline="p",reason="invalid_event"}"#,
        r#"counter ecst_events_dead_lettered_total{pipeline="p",reason="max_deliveries"}"#,
        r#"counter ecst_events_filtered_total{pipeline="p"}"#,
        r#"counter ecst_events_read_total{pipeline="p"}"#,
        r#"counter ecst_events_skipped_stale_total{pipeline="p"}"#,
        r#"counter ecst_events_stale_total{pipeline="p",sink="cache"}"#,
        r#"counter ecst_events_stale_total{pipeline="p",sink="table"}"#,
        r#"counter ecst_retention_gaps_total{pipeline="p"}"#,
        r#"counter ecst_retries_total{pipeline="p"}"#,
        r#"gauge ecst_apply_lag_last_seconds{pipeline="p",sink="cache"}"#,
        r#"gauge ecst_apply_lag_last_seconds{pipeline="p",sink="table"}"#,
        r#"gauge ecst_bootstrap_in_progress{pipeline="p"}"#,
        r#"gauge ecst_group_lag{pipeline="p"}"#,
        r#"gauge ecst_group_oldest_pending_idle_seconds{pipeline="p"}"#,
        r#"gauge ecst_group_pending{pipeline="p"}"#,
        r#"gauge ecst_replicated_age_seconds{pipeline="p",sink="cache"}"#,
        r#"gauge ecst_replicated_age_seconds{pipeline="p",sink="table"}"#,
        r#"gauge ecst_retention_gap{pipeline="p"}"#,
        r#"gauge ecst_sink_failing{pipeline="p",sink="cache"}"#,
        r#"gauge ecst_sink_failing{pipeline="p",sink="table"}"#,
        r#"gauge ecst_source_age_seconds{pipeline="p",sink="cache"}"#,
        r#"gauge ecst_source_age_seconds{pipeline="p",sink="table"}"#,
        r#"gauge ecst_source_connected{pipeline="p"}"#,
        r#"histogram ecst_apply_lag_seconds_bucket{pipeline="p",sink="cache"}"#,
        r#"histogram ecst_apply_lag_seconds_bucket{pipeline="p",sink="table"}"#,
        r#"histogram ecst_apply_lag_seconds_count{pipeline="p",sink="cache"}"#,
        r#"histogram ecst_apply_lag_seconds_count{pipeline="p",sink="table"}"#,
        r#"histogram ecst_apply_lag_seconds_sum{pipeline="p",sink="cache"}"#,
        r#"histogram ecst_apply_lag_seconds_sum{pipeline="p",sink="table"}"#,
        r#"histogram ecst_batch_size_bucket{pipeline="p"}"#,
        r#"histogram ecst_batch_size_count{pipeline="p"}"#,
        r#"histogram ecst_batch_size_sum{pipeline="p"}"#,
        r#"histogram ecst_sink_apply_duration_seconds_bucket{pipeline="p",sink="cache"}"#,
        r#"histogram ecst_sink_apply_duration_seconds_bucket{pipeline="p",sink="table"}"#,
        r#"histogram ecst_sink_apply_duration_seconds_count{pipeline="p",sink="cache"}"#,
        r#"histogram ecst_sink_apply_duration_seconds_count{pipeline="p",sink="table"}"#,
        r#"histogram ecst_sink_apply_duration_seconds_sum{pipeline="p",sink="cache"}"#,
        r#"histogram ecst_sink_apply_duration_seconds_sum{pipeline="p",sink="table"}"#,
        r#"histogram ecst_stage_duration_seconds_bucket{pipeline="p",stage="decode"}"#,
        r#"histogram ecst_stage_duration_seconds_count{pipeline="p",stage="decode"}"#,
        r#"histogram ecst_stage_duration_seconds_sum{pipeline="p",stage="decode"}"#,
    ];

    #[test]
    fn every_metric_keeps_its_name_type_and_labels() {
        let (types, samples) = parse(&render("p", &busy_stats()));
        let mut series = BTreeSet::new();
        for (name, labels, _) in &samples {
            let kind = types.get(name).cloned().unwrap_or_else(|| {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or_else(|| panic!("{name} has no # TYPE"));
                assert_eq!(types[family], "histogram", "{name}");
                "histogram".to_string()
            });
            let mut labels: Vec<String> = labels
                .iter()
                .filter(|(label, _)| label != "le")
                .map(|(label, value)| format!("{label}={value:?}"))
                .collect();
            labels.sort();
            series.insert(format!("{kind} {name}{{{}}}", labels.join(",")));
        }
        let expected: BTreeSet<String> = EXPECTED_SERIES.iter().map(|s| s.to_string()).collect();
        assert_eq!(series, expected);

        // A worker that has not built its DAG yet still declares every family, with its type
        // (the deploy tests read the alert rules' and dashboard's names from these lines).
        let (declared, _) = parse(&render("p", &Stats::default()));
        let families: BTreeMap<String, String> = EXPECTED_SERIES
            .iter()
            .map(|s| {
                let (kind, name) = s.split_once(' ').expect("kind");
                let name = name.split_once('{').expect("labels").0;
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter(|_| kind == "histogram")
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                (family.to_string(), kind.to_string())
            })
            .collect();
        assert_eq!(declared, families);
    }

    #[test]
    fn bucket_bounds_keep_their_spelling() {
        let (_, samples) = parse(&render("p", &busy_stats()));
        let bounds = |series: &str| -> Vec<String> {
            samples
                .iter()
                .filter(|(name, labels, _)| {
                    name == series && !labels.iter().any(|(_, v)| v == "table")
                })
                .flat_map(|(_, labels, _)| labels.iter().filter(|(l, _)| l == "le"))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let latency = [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
            "5", "10", "30", "60", "300", "+Inf",
        ];
        assert_eq!(bounds("ecst_apply_lag_seconds_bucket"), latency);
        assert_eq!(bounds("ecst_sink_apply_duration_seconds_bucket"), latency);
        assert_eq!(bounds("ecst_stage_duration_seconds_bucket"), latency);
        assert_eq!(
            bounds("ecst_batch_size_bucket"),
            [
                "1", "10", "50", "100", "250", "500", "1000", "2500", "5000", "+Inf"
            ]
        );
    }

    #[test]
    fn values_are_read_from_the_stats_at_scrape_time() {
        let stats = busy_stats();
        let (_, samples) = parse(&render("p", &stats));
        let value = |series: &str| -> f64 {
            let found: Vec<f64> = samples
                .iter()
                .filter(|(name, labels, _)| {
                    let labels: Vec<String> =
                        labels.iter().map(|(l, v)| format!("{l}={v}")).collect();
                    format!("{name}{{{}}}", labels.join(",")) == series
                })
                .map(|(_, _, v)| v.parse().expect("a number"))
                .collect();
            assert_eq!(found.len(), 1, "{series}");
            found[0]
        };
        assert_eq!(value("ecst_events_read_total{pipeline=p}"), 7.0);
        assert_eq!(value("ecst_events_acked_total{pipeline=p}"), 6.0);
        assert_eq!(
            value("ecst_events_dead_lettered_total{pipeline=p,reason=max_deliveries}"),
            1.0
        );
        assert_eq!(
            value("ecst_events_applied_total{pipeline=p,sink=cache}"),
            5.0
        );
        assert_eq!(
            value("ecst_events_applied_total{pipeline=p,sink=table}"),
            0.0
        );
        let age = value("ecst_source_age_seconds{pipeline=p,sink=cache}");
        assert!((2.0..60.0).contains(&age), "{age}");
        let replicated = value("ecst_replicated_age_seconds{pipeline=p,sink=cache}");
        assert!((1.0..60.0).contains(&replicated), "{replicated}");
        // Before a sink's first apply its ages are unknown, and before the first XINFO so is
        // the group: NaN, not 0, which would read as perfectly fresh.
        assert!(value("ecst_source_age_seconds{pipeline=p,sink=table}").is_nan());
        assert!(value("ecst_replicated_age_seconds{pipeline=p,sink=table}").is_nan());
        assert!(value("ecst_group_lag{pipeline=p}").is_nan());
        assert!(value("ecst_group_pending{pipeline=p}").is_nan());
        assert_eq!(value("ecst_sink_failing{pipeline=p,sink=cache}"), 1.0);
        assert_eq!(value("ecst_sink_failing{pipeline=p,sink=table}"), 0.0);
        assert_eq!(value("ecst_source_connected{pipeline=p}"), 1.0);
        assert_eq!(
            value("ecst_apply_lag_seconds_bucket{pipeline=p,sink=cache,le=0.0025}"),
            0.0
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_bucket{pipeline=p,sink=cache,le=0.005}"),
            1.0
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_bucket{pipeline=p,sink=cache,le=+Inf}"),
            1.0
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_sum{pipeline=p,sink=cache}"),
            0.004
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_count{pipeline=p,sink=cache}"),
            1.0
        );
        assert_eq!(value("ecst_batch_size_bucket{pipeline=p,le=1}"), 0.0);
        assert_eq!(value("ecst_batch_size_bucket{pipeline=p,le=10}"), 1.0);
        assert_eq!(
            value("ecst_stage_duration_seconds_count{pipeline=p,stage=decode}"),
            1.0
        );

        stats.read.store(8, Ordering::Relaxed);
        let (_, samples) = parse(&render("p", &stats));
        assert!(samples.contains(&(
            "ecst_events_read_total".to_string(),
            vec![("pipeline".to_string(), "p".to_string())],
            "8".to_string()
        )));
    }

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

    /// Prometheus's own parser and linter accept the exposition (when `promtool` is installed,
    /// as scripts/test.sh does).
    #[test]
    fn promtool_accepts_the_exposition() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};

        let spawned = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut promtool) = spawned else {
            eprintln!("promtool is not installed: skipped");
            return;
        };
        let text = render("p", &busy_stats());
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let (_, samples) = parse(&render("a \"b\" \\ c\nd", &Stats::default()));
        let read = samples
            .iter()
            .find(|(name, _, _)| name == "ecst_events_read_total")
            .expect("read");
        assert_eq!(
            read.1,
            [("pipeline".to_string(), "a \"b\" \\ c\nd".to_string())]
        );
    }
}
