//! Prometheus metrics of a worker, `/healthz` and `/readyz`, served over HTTP.
//!
//! Freshness is measured from what the worker applied, per sink: `ecst_source_age_seconds`
//! (now minus the newest `occurredAt` applied), `ecst_replicated_age_seconds` (now minus the
//! last successful apply) and `ecst_apply_lag_seconds` (apply time minus `occurredAt`). Labels
//! are pipeline, sink, stage and dead-letter reason class: never an aggregate id.
//!
//! The run loop counts in [`Stats`] without locks; prometheus-client reads them only when
//! scraped (a `Collector`) and encodes them in the Prometheus text format, version 0.0.4, whose
//! `le` spelling (`le="1"`, where OpenMetrics has `le="1.0"`) keeps existing series unchanged.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::shutdown::Shutdown;
use crate::stats::{HistogramSnapshot, PartitionStats, SinkStats, Stats, now_ms};

/// Reads a worker's [`Stats`] each time the registry is encoded.
#[derive(Debug)]
struct StatsCollector {
    stats: Arc<Stats>,
}

/// Encodes one counter; `name` is without the `_total` the encoder appends.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// Encodes a counter family with one label; `name` is without `_total`.
fn counters<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (label_value, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&[(label, label_value)])?)?;
    }
    Ok(())
}

/// Encodes one gauge.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue + fmt::Debug + Send + Sync,
) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Encodes a gauge family with one label.
fn gauges<'a, V: EncodeGaugeValue + fmt::Debug + Send + Sync>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (label_value, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&[(label, label_value)])?)?;
    }
    Ok(())
}

/// Encodes one histogram snapshot into `metric` (the encoder adds the `+Inf` bucket).
fn histogram(mut metric: MetricEncoder, h: &HistogramSnapshot) -> fmt::Result {
    // The snapshot counts cumulatively; the encoder wants each bucket's own count.
    let mut below = 0;
    let own: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|&(bound, cumulative)| {
            let count = cumulative.saturating_sub(below);
            below = cumulative;
            (bound, count)
        })
        .collect();
    metric.encode_histogram::<NoLabelSet>(h.sum, h.count, &own, None)
}

/// Encodes a histogram family with one label.
fn histograms<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, HistogramSnapshot)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (label_value, snapshot) in values {
        histogram(family.encode_family(&[(label, label_value)])?, &snapshot)?;
    }
    Ok(())
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn flag(flag: &AtomicBool) -> i64 {
    i64::from(flag.load(Ordering::Relaxed))
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &*self.stats;
        let e = &mut encoder;
        counter(
            e,
            "ecst_events_read",
            "Stream entries read.",
            load(&stats.read),
        )?;
        counter(
            e,
            "ecst_events_acked",
            "Stream entries acknowledged after commit.",
            load(&stats.acked),
        )?;
        counter(
            e,
            "ecst_events_filtered",
            "Records dropped by where: or tombstone mode ignore.",
            load(&stats.filtered),
        )?;
        counter(
            e,
            "ecst_retries",
            "Sink, dead-letter and ack attempts that failed and were retried.",
            load(&stats.retries),
        )?;
        counter(
            e,
            "ecst_tap_decisions_published",
            "Decisions published to an attached ecst tap.",
            load(&stats.tap_decisions_published),
        )?;
        counter(
            e,
            "ecst_bootstrap_rows",
            "Snapshot rows applied by bootstraps.",
            load(&stats.bootstrap_rows),
        )?;
        counter(
            e,
            "ecst_retention_gaps",
            "Retention gaps detected.",
            load(&stats.gaps_detected),
        )?;
        counter(
            e,
            "ecst_fanout_divergent",
            "Records a store refused after other sinks of the fan-out applied them: the replicas disagree on them.",
            load(&stats.fanout_divergent),
        )?;
        counters(
            e,
            "ecst_events_dead_lettered",
            "Entries sent to the dead-letter stream, by reason class.",
            "reason",
            stats.dead_letter_reasons(),
        )?;

        let sinks = stats.sinks();
        let per_sink =
            |value: fn(&SinkStats) -> u64| sinks.iter().map(move |s| (s.name.as_str(), value(s)));
        counters(
            e,
            "ecst_events_applied",
            "Records written by a sink.",
            "sink",
            per_sink(|s| load(&s.applied)),
        )?;
        counter(
            e,
            "ecst_events_skipped_stale",
            "Records version_filter dropped as not newer than one it already passed.",
            load(&stats.stale_filtered),
        )?;
        counters(
            e,
            "ecst_events_stale",
            "Records a sink did not write because the replica already had a newer or equal version (the store's guard).",
            "sink",
            per_sink(|s| load(&s.stale)),
        )?;
        counters(
            e,
            "ecst_delta_gaps",
            "Patches a sink did not apply because the replica is older than their base (a version is missing); left pending until the gap is filled.",
            "sink",
            per_sink(|s| load(&s.delta_gaps)),
        )?;
        counters(
            e,
            "ecst_delta_gaps_repaired",
            "Gapped patches covered by the aggregate's full state fetched through the delta stage's repair endpoint, and acked.",
            "sink",
            per_sink(|s| load(&s.delta_repaired)),
        )?;

        let now = now_ms();
        // 0 means "never": an age would then read as 56 years, and 0 s as perfectly fresh.
        let age = |ms: i64| {
            if ms == 0 {
                f64::NAN
            } else {
                (now - ms) as f64 / 1000.0
            }
        };
        gauges(
            e,
            "ecst_source_age_seconds",
            "Now minus the newest occurredAt applied (end-to-end freshness), from the replica's own record until the first apply; NaN when the replica has none.",
            "sink",
            sinks.iter().map(|s| {
                let newest = s.newest_source_ms.load(Ordering::Relaxed);
                (s.name.as_str(), age(newest))
            }),
        )?;
        gauges(
            e,
            "ecst_replicated_age_seconds",
            "Now minus the last successful apply, from the replica's own record until the first apply; NaN when the replica has none.",
            "sink",
            sinks.iter().map(|s| {
                let last = s.last_apply_ms.load(Ordering::Relaxed);
                (s.name.as_str(), age(last))
            }),
        )?;
        gauges(
            e,
            "ecst_apply_lag_last_seconds",
            "Apply time minus occurredAt of the newest record of the last batch.",
            "sink",
            sinks.iter().map(|s| {
                let lag = s.last_lag_ms.load(Ordering::Relaxed);
                (s.name.as_str(), lag as f64 / 1000.0)
            }),
        )?;
        histograms(
            e,
            "ecst_apply_lag_seconds",
            "Apply time minus occurredAt, per record applied.",
            "sink",
            sinks
                .iter()
                .map(|s| (s.name.as_str(), s.apply_lag.snapshot())),
        )?;
        histograms(
            e,
            "ecst_sink_apply_duration_seconds",
            "Time to apply one batch to a sink, retries included.",
            "sink",
            sinks
                .iter()
                .map(|s| (s.name.as_str(), s.apply_duration.snapshot())),
        )?;
        gauges(
            e,
            "ecst_sink_failing",
            "1 while the sink is failing and retrying with backoff.",
            "sink",
            sinks.iter().map(|s| (s.name.as_str(), flag(&s.failing))),
        )?;
        histograms(
            e,
            "ecst_stage_duration_seconds",
            "Time a transform stage spent on one batch.",
            "stage",
            stats
                .stages()
                .iter()
                .map(|s| (s.name.as_str(), s.duration.snapshot())),
        )?;
        histogram(
            e.encode_descriptor(
                "ecst_batch_size",
                "Entries per batch read.",
                None,
                MetricType::Histogram,
            )?,
            &stats.batch_size.snapshot(),
        )?;

        let partitions = stats.partitions();
        let owned: Vec<_> = partitions
            .iter()
            .filter(|(_, p)| p.owned.load(Ordering::Relaxed))
            .filter(|(_, p)| p.group.refreshed_ms.load(Ordering::Relaxed) != 0)
            .collect();
        // A partitioned worker's group figures are the sums over the partitions it holds.
        let (known, lag, pending, oldest_idle_ms) = if partitions.is_empty() {
            let g = &stats.group;
            (
                g.refreshed_ms.load(Ordering::Relaxed) != 0,
                g.lag.load(Ordering::Relaxed),
                g.pending.load(Ordering::Relaxed),
                g.oldest_pending_idle_ms.load(Ordering::Relaxed),
            )
        } else {
            let lags: Vec<i64> = owned
                .iter()
                .map(|(_, p)| p.group.lag.load(Ordering::Relaxed))
                .collect();
            (
                !owned.is_empty(),
                if lags.iter().any(|l| *l < 0) {
                    -1
                } else {
                    lags.iter().sum()
                },
                owned
                    .iter()
                    .map(|(_, p)| p.group.pending.load(Ordering::Relaxed))
                    .sum(),
                owned
                    .iter()
                    .map(|(_, p)| p.group.oldest_pending_idle_ms.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0),
            )
        };
        gauge(
            e,
            "ecst_group_lag",
            "Entries in the stream not yet delivered to the group (XINFO GROUPS lag; NaN when Redis cannot tell).",
            if known && lag >= 0 {
                lag as f64
            } else {
                f64::NAN
            },
        )?;
        gauge(
            e,
            "ecst_group_pending",
            "Entries delivered to the group and not acked.",
            if known { pending as f64 } else { f64::NAN },
        )?;
        gauge(
            e,
            "ecst_group_oldest_pending_idle_seconds",
            "Idle time of the oldest pending entry.",
            if known {
                oldest_idle_ms as f64 / 1000.0
            } else {
                f64::NAN
            },
        )?;
        if !partitions.is_empty() {
            let names: Vec<(String, &Arc<PartitionStats>)> =
                partitions.iter().map(|(n, p)| (n.to_string(), p)).collect();
            gauges(
                e,
                "ecst_partition_owned",
                "1 while this worker holds the partition's lease.",
                "partition",
                names.iter().map(|(n, p)| (n.as_str(), flag(&p.owned))),
            )?;
            gauges(
                e,
                "ecst_partition_lease_generation",
                "Fencing generation of this worker's latest lease on the partition.",
                "partition",
                names
                    .iter()
                    .map(|(n, p)| (n.as_str(), p.generation.load(Ordering::Relaxed) as i64)),
            )?;
            counters(
                e,
                "ecst_partition_lease_acquired",
                "Times this worker took the partition.",
                "partition",
                names.iter().map(|(n, p)| (n.as_str(), load(&p.acquired))),
            )?;
            counters(
                e,
                "ecst_partition_lease_lost",
                "Times another worker took the partition from this one (fenced off) before it was given back.",
                "partition",
                names.iter().map(|(n, p)| (n.as_str(), load(&p.lost))),
            )?;
            let held: Vec<(String, &Arc<PartitionStats>)> =
                owned.iter().map(|(n, p)| (n.to_string(), p)).collect();
            gauges(
                e,
                "ecst_partition_lag",
                "Entries of the partition not yet delivered to the group (NaN when Redis cannot tell); partitions this worker holds.",
                "partition",
                held.iter().map(|(n, p)| {
                    let lag = p.group.lag.load(Ordering::Relaxed);
                    (n.as_str(), if lag >= 0 { lag as f64 } else { f64::NAN })
                }),
            )?;
            gauges(
                e,
                "ecst_partition_pending",
                "Entries of the partition delivered to the group and not acked; partitions this worker holds.",
                "partition",
                held.iter()
                    .map(|(n, p)| (n.as_str(), p.group.pending.load(Ordering::Relaxed))),
            )?;
        }
        gauge(
            e,
            "ecst_retention_gap",
            "1 while the group has missed entries that are gone from the stream.",
            flag(&stats.retention_gap),
        )?;
        gauge(
            e,
            "ecst_bootstrap_in_progress",
            "1 while this worker bootstraps or waits for another worker's bootstrap.",
            flag(&stats.bootstrapping),
        )?;
        gauge(
            e,
            "ecst_source_connected",
            "1 while the last read from the stream succeeded.",
            flag(&stats.source_connected),
        )?;
        encode_fetch(e)
    }
}

/// The `fetch` stages' endpoints: requests by outcome, latency, circuit breaker.
fn encode_fetch(e: &mut DescriptorEncoder) -> fmt::Result {
    let endpoints = ecst_operators::fetch::endpoints();
    if endpoints.is_empty() {
        return Ok(());
    }
    let mut family = e.encode_descriptor(
        "ecst_fetch_requests",
        "Requests to fetch endpoints, by outcome (ok, not_found, error, timeout, refused, invalid, circuit_open).",
        None,
        MetricType::Counter,
    )?;
    for endpoint in &endpoints {
        for (outcome, n) in endpoint.requests() {
            ConstCounter::new(n).encode(family.encode_family(&[
                ("endpoint", endpoint.endpoint.as_str()),
                ("outcome", outcome),
            ])?)?;
        }
    }
    let mut family = e.encode_descriptor(
        "ecst_fetch_request_duration_seconds",
        "Duration of each request to a fetch endpoint (retries are separate requests).",
        None,
        MetricType::Histogram,
    )?;
    for endpoint in &endpoints {
        let (buckets, sum, count) = endpoint.latency();
        let snapshot = HistogramSnapshot {
            buckets,
            sum,
            count,
        };
        histogram(
            family.encode_family(&[("endpoint", endpoint.endpoint.as_str())])?,
            &snapshot,
        )?;
    }
    counters(
        e,
        "ecst_fetch_ids",
        "Ids answered by fetch endpoints (found or missing).",
        "endpoint",
        endpoints.iter().map(|s| (s.endpoint.as_str(), s.ids())),
    )?;
    gauges(
        e,
        "ecst_fetch_circuit_open",
        "1 while the endpoint's circuit breaker is open or half-open.",
        "endpoint",
        endpoints.iter().map(|s| {
            let open = s.breaker() != ecst_operators::fetch::BreakerState::Closed;
            (s.endpoint.as_str(), i64::from(open))
        }),
    )?;
    gauges(
        e,
        "ecst_fetch_unavailable",
        "1 while a fetch stage holds its batch waiting for the endpoint.",
        "endpoint",
        endpoints
            .iter()
            .map(|s| (s.endpoint.as_str(), i64::from(s.unavailable().is_some()))),
    )
}

/// A registry of a worker's metrics, every series labelled with its `pipeline`.
fn registry(pipeline: &str, stats: Arc<Stats>) -> Registry {
    let mut registry =
        Registry::with_labels([("pipeline".into(), pipeline.to_string().into())].into_iter());
    registry.register_collector(Box::new(StatsCollector { stats }));
    registry
}

/// The Prometheus text exposition of `registry`.
fn exposition(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(8192);
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// The Prometheus text exposition of a worker's stats (empty if encoding failed, which writing
/// to a `String` cannot).
pub fn render(pipeline: &str, stats: &Arc<Stats>) -> String {
    exposition(&registry(pipeline, Arc::clone(stats))).unwrap_or_else(|e| {
        tracing::error!(error = %e, "Encoding the metrics failed.");
        String::new()
    })
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
    reasons.extend(ecst_operators::fetch::unavailable_endpoints());
    reasons.extend(ecst_operators::claim::unavailable_stores());
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

struct Served {
    registry: Registry,
    stats: Arc<Stats>,
}

/// Seeds each sink's freshness gauges from what its store recorded, so that a restarted worker
/// reports the replica's age (not NaN) before its first apply. `sinks` are the DAG's, in the
/// order of [`Stats::sinks`]; an apply that lands first wins (the newer figure is kept).
pub(crate) async fn seed_freshness(sinks: Vec<Arc<dyn ecst_operators::Sink>>, stats: Arc<Stats>) {
    for (sink, counters) in sinks.iter().zip(stats.sinks()) {
        let Some(recorded) = sink.freshness().await else {
            continue;
        };
        if let Some(ms) = recorded.newest_occurred_ms {
            counters.newest_source_ms.fetch_max(ms, Ordering::Relaxed);
        }
        if let Some(ms) = recorded.replicated_ms {
            counters.last_apply_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }
}

/// Binds the metrics address (so that a taken port fails the start, not a later probe). A
/// taken port, typically a second worker on one host, says which flag picks another.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() != std::io::ErrorKind::AddrInUse {
            return e;
        }
        std::io::Error::new(
            e.kind(),
            format!(
                "{addr} is already in use (another ecst worker on this host?): pass --metrics-addr \
                 (or ECST_METRICS_ADDR) with another address, 127.0.0.1:0 for any free port \
                 (the bound address is logged), or `off`"
            ),
        )
    })
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
                match exposition(&s.registry) {
                    Ok(text) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                        text,
                    )
                        .into_response(),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding the metrics failed: {e}\n"),
                    )
                        .into_response(),
                }
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
        .with_state(Arc::new(Served {
            registry: registry(&pipeline, Arc::clone(&stats)),
            stats,
        }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StageStats;
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
    fn busy_stats() -> Arc<Stats> {
        let stats = Arc::new(Stats::default());
        stats.register(
            vec![StageStats {
                name: "decode".into(),
                duration: crate::stats::Histogram::latency(),
            }],
            vec![SinkStats::new("cache"), SinkStats::new("table")],
        );
        stats.read.store(7, Ordering::Relaxed);
        stats.acked.store(6, Ordering::Relaxed);
        stats.count_dead_letter(&ecst_operators::DeadLetterReason::InvalidEvent(
            "body is not JSON: expected value".into(),
        ));
        stats.count_dead_letter(&ecst_operators::DeadLetterReason::MaxDeliveries {
            count: 6,
            max: 5,
        });
        let cache = &stats.sinks()[0];
        cache.applied.store(5, Ordering::Relaxed);
        cache
            .newest_source_ms
            .store(now_ms() - 2_000, Ordering::Relaxed);
        cache
            .last_apply_ms
            .store(now_ms() - 1_000, Ordering::Relaxed);
        cache.apply_lag.observe(0.004);
        cache.apply_lag.observe(0.2);
        cache.apply_lag.observe(400.0);
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
        r#"counter ecst_delta_gaps_total{pipeline="p",sink="cache"}"#,
        r#"counter ecst_delta_gaps_total{pipeline="p",sink="table"}"#,
        r#"counter ecst_delta_gaps_repaired_total{pipeline="p",sink="cache"}"#,
        r#"counter ecst_delta_gaps_repaired_total{pipeline="p",sink="table"}"#,
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
        r#"counter ecst_fanout_divergent_total{pipeline="p"}"#,
        r#"counter ecst_retention_gaps_total{pipeline="p"}"#,
        r#"counter ecst_retries_total{pipeline="p"}"#,
        r#"counter ecst_tap_decisions_published_total{pipeline="p"}"#,
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
        let missing: Vec<_> = expected.difference(&series).collect();
        let unexpected: Vec<_> = series.difference(&expected).collect();
        assert!(
            missing.is_empty() && unexpected.is_empty(),
            "missing: {missing:#?}\nunexpected: {unexpected:#?}"
        );

        // A worker that has not built its DAG yet still declares every family, with its type
        // (the deploy tests read the alert rules' and dashboard's names from these lines).
        let (declared, _) = parse(&render("p", &Arc::new(Stats::default())));
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
    fn a_partitioned_worker_reports_each_partition_and_sums_the_ones_it_holds() {
        let stats = busy_stats();
        for (p, lag, pending, owned) in [(0, 3, 1, true), (5, 4, 2, true), (7, 100, 50, false)] {
            let s = stats.partition(p);
            s.owned.store(owned, Ordering::Relaxed);
            s.generation.store(u64::from(p) + 1, Ordering::Relaxed);
            s.acquired.store(1, Ordering::Relaxed);
            s.lost.store(u64::from(!owned), Ordering::Relaxed);
            s.group.lag.store(lag, Ordering::Relaxed);
            s.group.pending.store(pending, Ordering::Relaxed);
            s.group.refreshed_ms.store(now_ms(), Ordering::Relaxed);
        }
        let (types, samples) = parse(&render("p", &stats));
        let value = |series: &str| -> Option<f64> {
            samples
                .iter()
                .find(|(name, labels, _)| {
                    let labels: Vec<String> =
                        labels.iter().map(|(l, v)| format!("{l}={v}")).collect();
                    format!("{name}{{{}}}", labels.join(",")) == series
                })
                .map(|(_, _, v)| v.parse().expect("a number"))
        };
        assert_eq!(value("ecst_group_lag{pipeline=p}"), Some(7.0));
        assert_eq!(value("ecst_group_pending{pipeline=p}"), Some(3.0));
        assert_eq!(
            value("ecst_partition_lag{pipeline=p,partition=5}"),
            Some(4.0)
        );
        assert_eq!(value("ecst_partition_lag{pipeline=p,partition=7}"), None);
        assert_eq!(
            value("ecst_partition_owned{pipeline=p,partition=7}"),
            Some(0.0)
        );
        assert_eq!(
            value("ecst_partition_lease_generation{pipeline=p,partition=5}"),
            Some(6.0)
        );
        assert_eq!(
            value("ecst_partition_lease_lost_total{pipeline=p,partition=7}"),
            Some(1.0)
        );
        assert_eq!(types["ecst_partition_lease_acquired_total"], "counter");
        assert_eq!(types["ecst_partition_pending"], "gauge");
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
            value("ecst_apply_lag_seconds_bucket{pipeline=p,sink=cache,le=0.25}"),
            2.0
        );
        // An observation above the last bound is counted only in +Inf and the count.
        assert_eq!(
            value("ecst_apply_lag_seconds_bucket{pipeline=p,sink=cache,le=300}"),
            2.0
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_bucket{pipeline=p,sink=cache,le=+Inf}"),
            3.0
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_sum{pipeline=p,sink=cache}"),
            400.204
        );
        assert_eq!(
            value("ecst_apply_lag_seconds_count{pipeline=p,sink=cache}"),
            3.0
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
        let (_, samples) = parse(&render("a \"b\" \\ c\nd", &Arc::new(Stats::default())));
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
