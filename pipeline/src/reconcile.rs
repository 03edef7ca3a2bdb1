//! `ecst reconcile`: the source's current state and every replica side by side, drift counted
//! per sink, and with `--repair` corrected through the sinks' own guarded writes.
//!
//! The snapshot (the pipeline's `bootstrap:` source) is paged through the pipeline's stages, so
//! each sink is compared with exactly what it would have written. Rows the replica holds that
//! no snapshot row produced are orphans, found by [`crate::orphans`] in bounded memory.
//!
//! A repair never overwrites a newer write: a corrupted row is removed only while it is still
//! at the version compared, and rewritten through the sink's guarded write.

use std::collections::BTreeMap;
use std::sync::Arc;

use ecst_operators::redis_pool::redis_pool;
use ecst_operators::replica::{Drift, Eviction};
use ecst_operators::{Action, Outcomes, Record, Sink};
use serde::Serialize;

use crate::bootstrap::{SnapshotReader, page_records};
use crate::config::PipelineConfig;
use crate::dag::Dag;
use crate::error::RunError;
use crate::orphans::SeenKeys;
use crate::stats::{Stats, now_ms};

/// Examples kept per kind of drift.
const EXAMPLES: usize = 5;

/// What reconciliation found (and fixed) in one sink.
#[derive(Debug, Default, Serialize)]
pub struct SinkDrift {
    /// Source rows compared.
    pub checked: u64,
    /// In the source, not in the replica.
    pub missing: u64,
    /// In the replica at a lower version.
    pub stale: u64,
    /// Same version, different content.
    pub mismatched: u64,
    /// In the replica, not in the source.
    pub orphans: u64,
    /// Rows written or removed by `--repair`.
    pub repaired: u64,
    /// A few keys of each kind, to look at.
    pub examples: BTreeMap<String, Vec<String>>,
    /// Why this sink could not be reconciled, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SinkDrift {
    /// Whether anything differed.
    pub fn drifted(&self) -> bool {
        self.missing + self.stale + self.mismatched + self.orphans > 0
    }

    fn note(&mut self, kind: &str, key: &str) {
        let examples = self.examples.entry(kind.to_string()).or_default();
        if examples.len() < EXAMPLES {
            examples.push(key.to_string());
        }
    }
}

/// The whole report, per sink name.
#[derive(Debug, Default, Serialize)]
pub struct ReconcileReport {
    /// Source rows read.
    pub source_rows: u64,
    /// Per sink.
    pub sinks: BTreeMap<String, SinkDrift>,
}

impl ReconcileReport {
    /// Whether any sink drifted (or could not be checked).
    pub fn drifted(&self) -> bool {
        self.sinks
            .values()
            .any(|s| s.drifted() || s.error.is_some())
    }
}

fn sink_error(e: impl std::fmt::Display) -> RunError {
    RunError::Config(format!("reconciling: {e}"))
}

/// Compares (and with `repair`, corrects) every sink of the pipeline against its snapshot.
pub async fn reconcile(config: &PipelineConfig, repair: bool) -> Result<ReconcileReport, RunError> {
    let Some(bootstrap) = &config.bootstrap else {
        return Err(RunError::Config(
            "reconcile compares with the pipeline's `bootstrap:` source, and this pipeline has none"
                .into(),
        ));
    };
    let started_ms = now_ms();
    let mut reader = SnapshotReader::new(bootstrap).map_err(RunError::Config)?;
    let mut dag = Dag::build(config, Arc::new(Stats::default())).await?;
    let sinks: Vec<(String, Arc<dyn Sink>)> = dag.sinks().to_vec();
    let mut report = ReconcileReport::default();
    let pool = redis_pool(&config.source.redis, 2, bootstrap.timeout.0)
        .map_err(|e| RunError::Config(format!("redis {}: {e}", config.source.redis)))?;
    let mut seen = SeenKeys::new(pool, &config.name, sinks.len(), bootstrap.timeout.0);
    for (name, sink) in &sinks {
        let entry = report.sinks.entry(name.clone()).or_default();
        if sink.replica().is_none() {
            entry.error = Some("this sink cannot be read back".into());
        }
    }
    let mut after: Option<String> = None;
    loop {
        let lines = reader
            .page(after.as_deref(), bootstrap.page_size, bootstrap.timeout.0)
            .await
            .map_err(|e| RunError::Config(format!("reading the snapshot: {e}")))?;
        if lines.is_empty() {
            break;
        }
        report.source_rows += lines.len() as u64;
        let mut outcomes = Outcomes::default();
        let (entries, records, cursor) =
            page_records(lines, &mut outcomes).map_err(RunError::Config)?;
        let per_sink = dag.run_decoded(&entries, records, &mut outcomes).await;
        if let Some(reason) = outcomes.halt.take() {
            return Err(RunError::Halted(format!("{reason}, in the snapshot")));
        }
        for (i, records) in per_sink.into_iter().enumerate() {
            let (name, sink) = &sinks[i];
            let Some(replica) = sink.replica() else {
                continue;
            };
            let drift = report.sinks.entry(name.clone()).or_default();
            let upserts: Vec<Record> = records
                .into_iter()
                .filter(|r| r.action == Action::Upsert)
                .collect();
            let keys: Vec<String> = upserts
                .iter()
                .filter_map(|r| replica.key_of(r).ok())
                .collect();
            seen.record(i, &keys).await.map_err(sink_error)?;
            let drifts = replica.compare(&upserts).await.map_err(sink_error)?;
            let mut to_apply = Vec::new();
            let mut to_evict = Vec::new();
            for (record, found) in upserts.iter().zip(drifts) {
                drift.checked += 1;
                let key = replica.key_of(record).unwrap_or_default();
                match found {
                    None => continue,
                    Some(Drift::Missing) => {
                        drift.missing += 1;
                        drift.note("missing", &key);
                    }
                    Some(Drift::Stale { stored }) => {
                        drift.stale += 1;
                        drift.note(
                            "stale",
                            &format!(
                                "{key} (version {stored} < {})",
                                record.event.aggregate_version
                            ),
                        );
                    }
                    Some(Drift::Mismatch { fields }) => {
                        drift.mismatched += 1;
                        drift.note("mismatched", &format!("{key} ({})", fields.join(", ")));
                        // The guard keeps an equal version: the corrupted row goes first, but
                        // only if still at this version (a live worker's newer one stays).
                        to_evict.push((key.clone(), record.event.aggregate_version));
                    }
                }
                to_apply.push(record.clone());
            }
            if repair && !to_apply.is_empty() {
                replica
                    .evict(&to_evict, Eviction::Rewrite)
                    .await
                    .map_err(sink_error)?;
                let applied = sink.apply_batch(&to_apply).await.map_err(sink_error)?;
                drift.repaired += applied.applied as u64;
            }
        }
        after = Some(cursor);
    }
    let swept = seen.sweep(&sinks, repair, started_ms).await;
    seen.discard().await;
    for ((name, _), found) in sinks.iter().zip(swept.map_err(sink_error)?) {
        let drift = report.sinks.entry(name.clone()).or_default();
        drift.orphans += found.orphans;
        drift.repaired += found.evicted;
        for example in &found.examples {
            drift.note("orphans", example);
        }
    }
    Ok(report)
}
