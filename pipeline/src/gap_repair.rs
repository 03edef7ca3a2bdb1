//! Delta gap repair: a patch whose base the replica does not hold is never applied. When the
//! `delta` stage names a `repair:` endpoint, the batch's task fetches each gapped aggregate's
//! full state there, runs it through the stages as a snapshot row, and applies it under the
//! guard to every sink: a state at the patch's version or newer covers the patch, whose entry
//! is then acked, once the state reached every sink that gapped it. A state older than the
//! patch (a lagging endpoint), a 404, an endpoint that cannot answer, or a state the stages
//! drop or refuse on the way to a gapped sink leave the entry pending, delivered again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ecst_operators::fetch::FetchedState;
use ecst_operators::stages::delta::GapRepair;
use ecst_operators::{Outcomes, RawEntry, Record, SinkReport, StageConfig};
use ecst_schemas::EnvelopeKeys;
use serde_json::{Value, json};

use crate::commit::{Shared, apply_with_retry};
use crate::config::PipelineConfig;
use crate::dag::Dag;

/// A pipeline's gap repair: the endpoint, and the stages fetched states go through.
pub(crate) struct Repair {
    gap: GapRepair,
    dag: Arc<tokio::sync::Mutex<Dag>>,
}

impl Repair {
    /// The repair of the first `delta` stage of `config` that names a `repair:` endpoint.
    pub(crate) fn of(
        config: &PipelineConfig,
        dag: &Arc<tokio::sync::Mutex<Dag>>,
    ) -> Result<Option<Arc<Repair>>, String> {
        let Some((name, repair)) = config.stages.iter().find_map(|s| match &s.config {
            StageConfig::Delta(d) => d.repair.as_ref().map(|r| (&s.name, r)),
            _ => None,
        }) else {
            return Ok(None);
        };
        let gap = repair
            .build()
            .map_err(|e| format!("stage `{name}`, key `repair`: {e}"))?;
        Ok(Some(Arc::new(Repair {
            gap,
            dag: dag.clone(),
        })))
    }
}

/// One gapped aggregate: the patches it holds back.
struct Gapped {
    aggregate_type: Option<String>,
    /// (entry, the patch's version)
    patches: Vec<(usize, u64)>,
}

/// Repairs the gaps `reports` found: returns the gap entries now covered by a full state
/// every sink applied (or found stale), to be acked.
pub(crate) async fn repair_gaps(
    shared: &Shared,
    repair: &Repair,
    entries: &[RawEntry],
    per_sink: &[Vec<Record>],
    reports: &[(usize, SinkReport)],
) -> HashSet<usize> {
    // The gapped patches by entity, then aggregate id.
    let mut wanted: HashMap<String, HashMap<String, Gapped>> = HashMap::new();
    let mut seen = HashSet::new();
    for (i, report) in reports {
        for &entry in &report.gaps {
            let Some(record) = per_sink[*i].iter().find(|r| r.entry == entry) else {
                continue;
            };
            if !seen.insert(entry) {
                continue;
            }
            let event = &record.event;
            let Some(entity) = repair
                .gap
                .entity
                .as_deref()
                .or(event.aggregate_type.as_deref())
            else {
                tracing::warn!(pipeline = %shared.pipeline, entry_id = %entries.get(entry).map_or("", |e| e.id.as_str()), "A gapped patch has no aggregateType and the repair names no entity; it waits for the missing version.");
                continue;
            };
            wanted
                .entry(entity.to_string())
                .or_default()
                .entry(event.aggregate_id.clone())
                .or_insert_with(|| Gapped {
                    aggregate_type: event.aggregate_type.clone(),
                    patches: Vec::new(),
                })
                .patches
                .push((entry, event.aggregate_version));
        }
    }

    // The full states that cover gaps, as snapshot rows, with the gap entries each covers.
    let keys = EnvelopeKeys::default();
    let mut rows: Vec<RawEntry> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    let mut covers: Vec<Vec<usize>> = Vec::new();
    for (entity, aggregates) in wanted {
        let mut ids: Vec<String> = aggregates.keys().cloned().collect();
        ids.sort();
        let states = match repair.gap.client.fetch_batch(&entity, &ids).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(pipeline = %shared.pipeline, endpoint = %repair.gap.client.endpoint(), entity = %entity, gaps = ids.len(), error = %e, "Cannot fetch the full state of gapped aggregates; their patches stay pending.");
                continue;
            }
        };
        for state in states {
            let Some(gapped) = aggregates.get(state.id()) else {
                continue;
            };
            let newest = gapped.patches.iter().map(|(_, v)| *v).max().unwrap_or(0);
            let (row, covered): (Value, Vec<usize>) = match state {
                FetchedState::Found {
                    id,
                    version,
                    payload,
                    occurred_at,
                } => {
                    let covered: Vec<usize> = gapped
                        .patches
                        .iter()
                        .filter(|(_, v)| *v <= version)
                        .map(|(e, _)| *e)
                        .collect();
                    if covered.is_empty() {
                        tracing::debug!(pipeline = %shared.pipeline, entity = %entity, aggregate_id = %id, fetched = version, patch = newest, "The repair endpoint answers a state older than the gapped patch; it stays pending.");
                        continue;
                    }
                    let mut row = json!({
                        "aggregateId": id,
                        "aggregateVersion": version,
                        "payload": payload,
                    });
                    if let Some(at) = occurred_at {
                        row["occurredAt"] = Value::String(at);
                    }
                    (row, covered)
                }
                // Not at the source, or not yet at a lagging one: a 404 has no version to cover a
                // patch with. The patches wait; the delete event, when there is one, makes
                // them stale.
                FetchedState::Missing { id } => {
                    tracing::debug!(pipeline = %shared.pipeline, entity = %entity, aggregate_id = %id, patch = newest, "The repair endpoint does not know the gapped aggregate; its patches stay pending.");
                    continue;
                }
                FetchedState::Invalid { id, reason } => {
                    tracing::warn!(pipeline = %shared.pipeline, entity = %entity, aggregate_id = %id, reason = %reason, "The repair endpoint answered an unusable state; the gapped patch stays pending.");
                    continue;
                }
                _ => continue,
            };
            let mut row = row;
            if let Some(t) = &gapped.aggregate_type {
                row["aggregateType"] = Value::String(t.clone());
            }
            let Some(raw) = entries.get(covered[0]).cloned() else {
                continue;
            };
            match keys.read_owned(row) {
                Ok(event) => {
                    records.push(Record::new(rows.len(), event));
                    rows.push(raw);
                    covers.push(covered);
                }
                Err(e) => {
                    tracing::warn!(pipeline = %shared.pipeline, entity = %entity, error = %e, "The repair endpoint's state is not an event; the gapped patch stays pending.")
                }
            }
        }
    }
    if records.is_empty() {
        return HashSet::new();
    }

    let mut outcomes = Outcomes::default();
    let fixed = {
        let mut dag = repair.dag.lock().await;
        dag.run_decoded(&rows, records, &mut outcomes).await
    };
    if let Some(reason) = outcomes.halt.take() {
        tracing::warn!(pipeline = %shared.pipeline, reason = %reason, "A stage stopped on a repaired state; the gapped patches stay pending.");
        return HashSet::new();
    }
    let mut failed: HashSet<usize> = outcomes.dead_letters.iter().map(|(r, _)| *r).collect();
    for (row, reason) in &outcomes.dead_letters {
        tracing::warn!(pipeline = %shared.pipeline, entry_id = %rows[*row].id, reason = %reason, "A stage refused a repaired state; the gapped patch stays pending.");
    }
    for (i, records) in fixed.iter().enumerate() {
        if records.is_empty() {
            continue;
        }
        let report = apply_with_retry(shared, i, records).await;
        failed.extend(
            report
                .rejected
                .iter()
                .chain(&report.refused)
                .map(|(r, _)| *r)
                .chain(report.gaps.iter().copied()),
        );
    }
    // A row covers a gapped patch only if it reached every sink that gapped it: a stage may
    // drop the row on one branch (a `where`, a tombstone `mode: ignore`) while another applies it.
    let mut gapped_at: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, report) in reports {
        for &entry in &report.gaps {
            gapped_at.entry(entry).or_default().push(*i);
        }
    }
    let reached: HashSet<(usize, usize)> = fixed
        .iter()
        .enumerate()
        .flat_map(|(i, records)| records.iter().map(move |r| (i, r.entry)))
        .collect();
    let repaired: HashSet<usize> = covers
        .iter()
        .enumerate()
        .filter(|(row, _)| !failed.contains(row))
        .filter(|(row, covered)| {
            covered.iter().all(|entry| {
                gapped_at
                    .get(entry)
                    .into_iter()
                    .flatten()
                    .all(|&sink| reached.contains(&(sink, *row)))
            })
        })
        .flat_map(|(_, covered)| covered.iter().copied())
        .collect();
    for (i, report) in reports {
        if let Some(s) = shared.stats.sinks().get(*i) {
            let n = report.gaps.iter().filter(|e| repaired.contains(e)).count();
            s.delta_repaired.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    repaired
}
