//! The stage graph of one worker: every stage and sink built, run over a batch in
//! topological order, handing each sink its share of the records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ecst_operators::{
    Action, AsyncStage, BuildContext, BuiltStage, DeadLetterReason, DropReason, Outcomes, RawEntry,
    Record, Sink, SinkReport, Stage,
};
use ecst_schemas::PayloadSelection;
use serde::Serialize;
use tracing::Instrument;

use crate::config::PipelineConfig;
use crate::error::RunError;
use crate::stats::{Histogram, SinkStats, StageStats, Stats};

enum Node {
    Transform(Box<dyn Stage>),
    AsyncTransform(Box<dyn AsyncStage>),
    Sink(usize),
}

/// The payload members some stage reads, so that `decode` skips the rest. A stage's records
/// count as projected when every input's records went through a `project` stage.
fn payload_reads(
    config: &PipelineConfig,
    order: &[usize],
    index: &HashMap<&str, usize>,
) -> PayloadSelection {
    let mut projected = vec![false; config.stages.len()];
    let mut reads = PayloadSelection::nothing();
    for &i in order {
        let stage = &config.stages[i];
        let inputs: Vec<usize> = stage
            .inputs
            .iter()
            .filter_map(|n| index.get(n.as_str()).copied())
            .collect();
        let fed_projected = !inputs.is_empty() && inputs.iter().all(|&j| projected[j]);
        reads = reads.union(stage.config.payload_reads(fed_projected));
        projected[i] = fed_projected || stage.config.is_projection();
    }
    reads
}

/// The payload members the stages of `config` read (what `decode` keeps), given the stages'
/// topological `order`: for tools that build the stages without a [`Dag`].
pub fn pipeline_payload_reads(config: &PipelineConfig, order: &[usize]) -> PayloadSelection {
    let index: HashMap<&str, usize> = config
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    payload_reads(config, order, &index)
}

/// Every stage and sink of a pipeline, built, in the order they run.
pub struct Dag {
    stats: Arc<Stats>,
    /// Index into `stats.stages()` of each transform node.
    stage_slots: Vec<Option<usize>>,
    order: Vec<usize>,
    nodes: Vec<Node>,
    inputs: Vec<Vec<usize>>,
    readers: Vec<usize>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
}

impl Dag {
    /// Builds every stage and sink of the pipeline.
    pub(crate) async fn build(
        config: &PipelineConfig,
        stats: Arc<Stats>,
    ) -> Result<Self, RunError> {
        let nodes_view = config.graph_nodes();
        let order = crate::graph::topo_order(&nodes_view)
            .ok_or_else(|| RunError::Config("the stage graph has a cycle".into()))?;
        let index: HashMap<&str, usize> = config
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut nodes = Vec::new();
        let mut sinks = Vec::new();
        let mut inputs = Vec::new();
        let mut readers = vec![0usize; config.stages.len()];
        let payload_reads = payload_reads(config, &order, &index);
        for stage in &config.stages {
            let ctx = BuildContext {
                pipeline: config.name.clone(),
                stage: stage.name.clone(),
                source_redis: config.source.redis.clone(),
                payload_reads: payload_reads.clone(),
                schemas: config.schemas.clone(),
            };
            nodes.push(match stage.config.build(&ctx).await? {
                BuiltStage::Stage(s) => Node::Transform(s),
                BuiltStage::AsyncStage(s) => Node::AsyncTransform(s),
                BuiltStage::Sink(s) => {
                    sinks.push((stage.name.clone(), s));
                    Node::Sink(sinks.len() - 1)
                }
            });
            let ins: Vec<usize> = stage
                .inputs
                .iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .collect();
            for i in &ins {
                readers[*i] += 1;
            }
            inputs.push(ins);
        }
        let mut stage_slots = Vec::with_capacity(nodes.len());
        let mut stage_stats = Vec::new();
        for (node, stage) in nodes.iter().zip(&config.stages) {
            stage_slots.push(match node {
                Node::Transform(_) | Node::AsyncTransform(_) => {
                    stage_stats.push(StageStats {
                        name: stage.name.clone(),
                        duration: Histogram::latency(),
                    });
                    Some(stage_stats.len() - 1)
                }
                Node::Sink(_) => None,
            });
        }
        stats.register(
            stage_stats,
            sinks.iter().map(|(name, _)| SinkStats::new(name)).collect(),
        );
        Ok(Dag {
            stats,
            stage_slots,
            order,
            nodes,
            inputs,
            readers,
            sinks,
        })
    }

    /// Forgets every stage's memory of earlier batches.
    pub(crate) fn reset(&mut self) {
        for node in &mut self.nodes {
            match node {
                Node::Transform(stage) => stage.reset(),
                Node::AsyncTransform(stage) => stage.reset(),
                Node::Sink(_) => {}
            }
        }
    }

    /// The sinks, by stage name.
    pub(crate) fn sinks(&self) -> &[(String, Arc<dyn Sink>)] {
        &self.sinks
    }

    /// Runs the transforms over a batch; returns each sink's records. An async stage may wait
    /// (its service down); dropping the future abandons the batch, which stays un-acked.
    pub(crate) async fn run(
        &mut self,
        entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Vec<Record>> {
        self.run_from(entries, None, out, None).await
    }

    /// Runs the transforms over a batch as `run` does, writing what each stage did with each
    /// entry to `trace` (which `commit::complete` then completes for the sinks).
    pub async fn run_traced(
        &mut self,
        entries: &[RawEntry],
        out: &mut Outcomes,
        trace: &mut Trace,
    ) -> Vec<Vec<Record>> {
        self.run_from(entries, None, out, Some(trace)).await
    }

    /// Runs a batch whose records are already decoded (snapshot rows): they stand in for the
    /// output of the root stages.
    pub(crate) async fn run_decoded(
        &mut self,
        entries: &[RawEntry],
        records: Vec<Record>,
        out: &mut Outcomes,
    ) -> Vec<Vec<Record>> {
        self.run_from(entries, Some(records), out, None).await
    }

    async fn run_from(
        &mut self,
        entries: &[RawEntry],
        decoded: Option<Vec<Record>>,
        out: &mut Outcomes,
        mut trace: Option<&mut Trace>,
    ) -> Vec<Vec<Record>> {
        let mut outputs: Vec<Option<Vec<Record>>> = (0..self.nodes.len()).map(|_| None).collect();
        let mut remaining = self.readers.clone();
        let mut per_sink: Vec<Vec<Record>> = (0..self.sinks.len()).map(|_| Vec::new()).collect();
        for &i in &self.order {
            let mut input = Vec::new();
            for &from in &self.inputs[i] {
                remaining[from] -= 1;
                let records = if remaining[from] == 0 {
                    outputs[from].take().unwrap_or_default()
                } else {
                    outputs[from].clone().unwrap_or_default()
                };
                input.extend(records);
            }
            let root = self.inputs[i].is_empty();
            match &mut self.nodes[i] {
                Node::Transform(_) | Node::AsyncTransform(_) if root && decoded.is_some() => {
                    outputs[i] = decoded.clone();
                }
                Node::Transform(stage) if decoded.is_some() && !stage.reads_snapshots() => {
                    outputs[i] = Some(input);
                }
                Node::Sink(s) => per_sink[*s] = refuse_unresolved(input, &self.sinks[*s].0, out),
                node => {
                    let timing = self.stage_slots[i].and_then(|slot| self.stats.stages().get(slot));
                    let span = tracing::info_span!(
                        "ecst.stage",
                        ecst.stage = timing.map_or("", |s| s.name.as_str()),
                        ecst.records = input.len()
                    );
                    let marks = (out.dead_letters.len(), out.dropped.len());
                    if let Some(trace) = trace.as_deref_mut() {
                        trace.note_events(entries.len(), &input);
                    }
                    let started = Instant::now();
                    let output = match node {
                        Node::Transform(stage) => {
                            span.in_scope(|| stage.process(input, entries, out))
                        }
                        Node::AsyncTransform(stage) => {
                            stage.process(input, entries, out).instrument(span).await
                        }
                        // Sinks took their input in the arm above.
                        Node::Sink(_) => Vec::new(),
                    };
                    if let Some(s) = timing {
                        s.duration.observe(started.elapsed().as_secs_f64());
                    }
                    if let Some(trace) = trace.as_deref_mut() {
                        let name = timing.map_or("", |s| s.name.as_str());
                        trace.stage(name, entries.len(), &output, out, marks);
                    }
                    outputs[i] = Some(output);
                }
            }
        }
        per_sink
    }
}

/// Takes out the records whose payload is still a claim reference: no `claim_check` stage ran
/// before sink `sink`, and writing them would replace the replica's state by an empty one.
fn refuse_unresolved(mut input: Vec<Record>, sink: &str, out: &mut Outcomes) -> Vec<Record> {
    if input.iter().all(|r| r.event.payload_ref.is_none()) {
        return input;
    }
    input.retain(|record| {
        let Some(claim) = &record.event.payload_ref else {
            return true;
        };
        // A fan-out's other sinks see the same entry: it is dead-lettered once.
        if !out
            .dead_letters
            .iter()
            .any(|(entry, _)| *entry == record.entry)
        {
            out.dead_letter(
                record.entry,
                DeadLetterReason::SinkRejected {
                    sink: sink.to_string(),
                    message: format!(
                        "payloadRef `{}` is not resolved: add a claim_check stage before this sink",
                        claim.key
                    ),
                },
            );
        }
        false
    });
    input
}

/// What one stage or sink did with one entry of a batch (`ecst test` checks these, `ecst tap`
/// shows them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Index of the entry in the batch.
    pub entry: usize,
    /// The stage's (or sink's) name in the pipeline file.
    pub stage: String,
    /// What it did.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What a stage or sink did with an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Passed on to the next stages as an upsert.
    Passed,
    /// Passed on as a delete.
    Deleted,
    /// Passed on as a deletion mark (`tombstone` `mode: mark`).
    Marked,
    /// Dropped: not newer than a version the stage saw in an earlier batch (or a duplicate).
    Stale,
    /// Dropped: a newer version of the same aggregate in the same batch won.
    Coalesced,
    /// Dropped by a `where:` expression.
    Filtered,
    /// A delete dropped by `tombstone` `mode: ignore`.
    IgnoredDelete,
    /// Sent to the dead-letter stream by the stage.
    DeadLettered {
        /// Why, as the dead letter's `error` field says.
        reason: String,
    },
    /// Written by the sink.
    Applied,
    /// Not written: the store's version guard holds this version or a newer one.
    StaleAtSink,
    /// A patch not written: the replica is older than its base (a version is missing), so
    /// the entry is left pending until the gap is filled.
    GapAtSink,
    /// Written or stale at the sink, which counted but did not name its stale records in a
    /// batch that had both (Postgres).
    AppliedOrStale,
    /// The sink cannot write the record (dead-lettered).
    Rejected {
        /// What the sink said.
        reason: String,
    },
    /// The store refused the record (dead-lettered).
    Refused {
        /// What the store said.
        reason: String,
    },
}

impl Outcome {
    /// The outcome's stable name (`passed`, `stale_at_sink`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Deleted => "deleted",
            Outcome::Marked => "marked",
            Outcome::Stale => "stale",
            Outcome::Coalesced => "coalesced",
            Outcome::Filtered => "filtered",
            Outcome::IgnoredDelete => "ignored_delete",
            Outcome::DeadLettered { .. } => "dead_lettered",
            Outcome::Applied => "applied",
            Outcome::StaleAtSink => "stale_at_sink",
            Outcome::GapAtSink => "gap_at_sink",
            Outcome::AppliedOrStale => "applied_or_stale",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Refused { .. } => "refused",
        }
    }

    /// Why the entry was dead-lettered, for the outcomes that dead-letter it.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::DeadLettered { reason }
            | Outcome::Rejected { reason }
            | Outcome::Refused { reason } => Some(reason),
            _ => None,
        }
    }
}

/// The event an entry decoded to, as the trace first saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TracedEvent {
    /// Index of the entry in the batch.
    pub entry: usize,
    /// `aggregateType`, if the event has one.
    pub aggregate_type: Option<String>,
    /// `aggregateId`.
    pub aggregate_id: String,
    /// `aggregateVersion`.
    pub aggregate_version: u64,
}

/// What every stage and sink did with each entry of one batch, in the order they decided.
/// Only made when asked for: a batch run without one costs a branch per stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trace {
    /// The events the entries decoded to (entries that did not decode have none).
    pub events: Vec<TracedEvent>,
    /// The decisions, stage by stage in the order the stages ran, then the sinks'.
    pub decisions: Vec<Decision>,
    /// Which entries have their event in `events`.
    #[serde(skip)]
    noted: Vec<bool>,
}

impl Trace {
    /// The decoded event of entry `entry`, if it decoded.
    pub fn event(&self, entry: usize) -> Option<&TracedEvent> {
        self.events.iter().find(|e| e.entry == entry)
    }

    /// The decisions about entry `entry`, in order.
    pub fn of_entry(&self, entry: usize) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(move |d| d.entry == entry)
    }

    fn decide(&mut self, entry: usize, stage: &str, outcome: Outcome) {
        self.decisions.push(Decision {
            entry,
            stage: stage.to_string(),
            outcome,
        });
    }

    fn note_events(&mut self, entries: usize, records: &[Record]) {
        if self.noted.len() < entries {
            self.noted.resize(entries, false);
        }
        for record in records {
            let Some(noted) = self.noted.get_mut(record.entry) else {
                continue;
            };
            if !*noted {
                *noted = true;
                self.events.push(TracedEvent {
                    entry: record.entry,
                    aggregate_type: record.event.aggregate_type.clone(),
                    aggregate_id: record.event.aggregate_id.clone(),
                    aggregate_version: record.event.aggregate_version,
                });
            }
        }
    }

    /// Records what stage `name` did: `output` passed, and what it added to `out` since
    /// `marks` (the lengths of its dead letters and drops before the stage ran).
    fn stage(
        &mut self,
        name: &str,
        entries: usize,
        output: &[Record],
        out: &Outcomes,
        (dead_from, dropped_from): (usize, usize),
    ) {
        self.note_events(entries, output);
        for record in output {
            let outcome = match record.action {
                Action::Upsert | Action::Patch { .. } => Outcome::Passed,
                Action::Delete { .. } => Outcome::Deleted,
                Action::Mark => Outcome::Marked,
            };
            self.decide(record.entry, name, outcome);
        }
        for &(entry, reason) in out.dropped.get(dropped_from..).unwrap_or_default() {
            let outcome = match reason {
                DropReason::Stale if self.coalesced(entry, output) => Outcome::Coalesced,
                DropReason::Stale => Outcome::Stale,
                DropReason::Filtered => Outcome::Filtered,
                DropReason::IgnoredDelete => Outcome::IgnoredDelete,
            };
            self.decide(entry, name, outcome);
        }
        for (entry, reason) in out.dead_letters.get(dead_from..).unwrap_or_default() {
            let reason = reason.to_string();
            self.decide(*entry, name, Outcome::DeadLettered { reason });
        }
    }

    /// Whether a newer version of entry `entry`'s aggregate is in `output`.
    fn coalesced(&self, entry: usize, output: &[Record]) -> bool {
        let Some(event) = self.event(entry) else {
            return false;
        };
        output.iter().any(|r| {
            r.event.aggregate_id == event.aggregate_id
                && r.event.aggregate_type == event.aggregate_type
                && r.event.aggregate_version > event.aggregate_version
        })
    }

    /// Records that sink `name` could not write entry `entry` (the check every sink of a
    /// fan-out makes before any applies).
    pub(crate) fn sink_rejected(&mut self, entry: usize, reason: &DeadLetterReason) {
        if let DeadLetterReason::SinkRejected { sink, message } = reason {
            let reason = message.clone();
            self.decide(entry, sink, Outcome::Rejected { reason });
        }
    }

    /// Records what sink `name` did with its `records` of the batch, from its `report`.
    pub(crate) fn sink(&mut self, name: &str, records: &[Record], report: &SinkReport) {
        let failed = |entry: usize| {
            report
                .rejected
                .iter()
                .chain(&report.refused)
                .any(|(e, _)| *e == entry)
        };
        let unnamed: Vec<usize> = records
            .iter()
            .map(|r| r.entry)
            .filter(|&e| {
                !failed(e) && !report.stale_entries.contains(&e) && !report.gaps.contains(&e)
            })
            .collect();
        let unnamed_stale = report.stale.saturating_sub(report.stale_entries.len());
        let outcome = match unnamed_stale {
            0 => Outcome::Applied,
            n if n >= unnamed.len() => Outcome::StaleAtSink,
            _ => Outcome::AppliedOrStale,
        };
        for entry in unnamed {
            self.decide(entry, name, outcome.clone());
        }
        for &entry in &report.stale_entries {
            self.decide(entry, name, Outcome::StaleAtSink);
        }
        for &entry in &report.gaps {
            self.decide(entry, name, Outcome::GapAtSink);
        }
        for (entry, reason) in &report.rejected {
            let reason = reason.clone();
            self.decide(*entry, name, Outcome::Rejected { reason });
        }
        for (entry, reason) in &report.refused {
            let reason = reason.clone();
            self.decide(*entry, name, Outcome::Refused { reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn reads(stages: &str) -> PayloadSelection {
        let text = format!(
            "name: p\nsource: {{ redis: \"redis://127.0.0.1:6379\", stream: s, group: g }}\nstages:\n{stages}"
        );
        let config = crate::config::load_str(Path::new("p.yaml"), &text, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let nodes = config.graph_nodes();
        let order = crate::graph::topo_order(&nodes).unwrap();
        let index = config
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        payload_reads(&config, &order, &index)
    }

    fn entry(id: &str, v: &str) -> RawEntry {
        RawEntry {
            id: id.into(),
            fields: vec![("v".into(), v.as_bytes().to_vec())],
        }
    }

    fn event(id: &str, version: u64, status: &str) -> String {
        format!(
            r#"{{"schemaVersion":1,"eventId":"e-{id}-{version}","eventType":"athlete.updated","occurredAt":"2026-01-01T00:00:00Z","aggregateType":"athlete","aggregateId":"{id}","aggregateVersion":{version},"payload":{{"status":"{status}"}}}}"#
        )
    }

    fn decided(trace: &Trace, entry: usize) -> Vec<(&str, &str)> {
        trace
            .of_entry(entry)
            .map(|d| (d.stage.as_str(), d.outcome.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn snapshot_rows_pass_a_delta_stage_as_full_states() {
        let text = "name: p\nsource: { redis: \"redis://127.0.0.1:6379\", stream: s, group: g }\nstages:\n  decode: { type: decode }\n  patches: { type: delta, input: decode, base: contiguous }\n  cache: { type: redis_hash, input: patches, key: \"dag-delta-test:{aggregateId}\" }\n";
        let config = crate::config::load_str(Path::new("p.yaml"), text, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut dag = Dag::build(&config, Arc::new(Stats::default()))
            .await
            .unwrap();
        let body = event("a", 7, "active");
        let entries = vec![entry("1-0", &body)];
        let mut out = Outcomes::default();
        let live = dag.run(&entries, &mut out).await;
        assert_eq!(live[0][0].action, Action::Patch { base: 6 });
        let row = Record::new(0, serde_json::from_str(&body).unwrap());
        let snapshot = dag.run_decoded(&entries, vec![row], &mut out).await;
        assert_eq!(snapshot[0][0].action, Action::Upsert);
    }

    #[tokio::test]
    async fn the_trace_says_what_each_stage_did_with_each_entry() {
        let text = "name: p\nsource: { redis: \"redis://127.0.0.1:6379\", stream: s, group: g }\nstages:\n  decode: { type: decode }\n  latest: { type: version_filter, input: decode }\n  deletes: { type: tombstone, input: latest, mode: ignore }\n  active: { type: project, input: deletes, where: \"payload.status == 'active'\", fields: { status: payload.status } }\n  cache: { type: redis_hash, input: active, key: \"dag-trace-test:{aggregateId}\" }\n";
        let config = crate::config::load_str(Path::new("p.yaml"), text, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut dag = Dag::build(&config, Arc::new(Stats::default()))
            .await
            .unwrap();
        let deleted = r#"{"schemaVersion":1,"eventId":"e-d","eventType":"athlete.deleted","occurredAt":"2026-01-01T00:00:00Z","aggregateType":"athlete","aggregateId":"c","aggregateVersion":3,"payload":null,"deleted":true}"#;
        let entries = vec![
            entry("1-0", &event("a", 1, "active")),
            entry("2-0", &event("a", 2, "active")),
            entry("3-0", &event("b", 1, "retired")),
            entry("4-0", "{not json"),
            entry("5-0", deleted),
        ];
        let mut out = Outcomes::default();
        let mut trace = Trace::default();
        let per_sink = dag.run_traced(&entries, &mut out, &mut trace).await;
        assert_eq!(per_sink[0].len(), 1);
        assert_eq!(
            decided(&trace, 0),
            [("decode", "passed"), ("latest", "coalesced")]
        );
        assert_eq!(
            decided(&trace, 1),
            [
                ("decode", "passed"),
                ("latest", "passed"),
                ("deletes", "passed"),
                ("active", "passed")
            ]
        );
        assert_eq!(
            decided(&trace, 2),
            [
                ("decode", "passed"),
                ("latest", "passed"),
                ("deletes", "passed"),
                ("active", "filtered")
            ]
        );
        assert_eq!(decided(&trace, 3), [("decode", "dead_lettered")]);
        assert!(trace.of_entry(3).all(|d| d.outcome.reason().is_some()));
        assert_eq!(
            decided(&trace, 4),
            [
                ("decode", "deleted"),
                ("latest", "deleted"),
                ("deletes", "ignored_delete")
            ]
        );
        assert_eq!(trace.event(4).map(|e| e.aggregate_version), Some(3));
        assert!(trace.event(3).is_none());

        // A later batch: what the stage saw before is stale, not coalesced.
        let mut trace = Trace::default();
        let later = [entry("6-0", &event("a", 2, "active"))];
        dag.run_traced(&later, &mut Outcomes::default(), &mut trace)
            .await;
        assert_eq!(
            decided(&trace, 0),
            [("decode", "passed"), ("latest", "stale")]
        );
    }

    #[test]
    fn a_sinks_report_names_each_records_outcome_when_it_can() {
        let records: Vec<Record> = (0..5)
            .map(|i| {
                let event = serde_json::from_str(&event(&format!("k{i}"), 1, "active")).unwrap();
                Record::new(i, event)
            })
            .collect();
        let outcomes = |report: SinkReport| {
            let mut trace = Trace::default();
            trace.sink("table", &records, &report);
            let mut seen: Vec<(usize, &'static str)> = trace
                .decisions
                .iter()
                .map(|d| (d.entry, d.outcome.as_str()))
                .collect();
            seen.sort();
            seen
        };
        // Named stale records (Redis), a rejection, a refusal and a patch over a gap.
        let named = SinkReport {
            applied: 1,
            stale: 1,
            stale_entries: vec![2],
            rejected: vec![(0, "bad key".into())],
            refused: vec![(3, "check".into())],
            gaps: vec![4],
        };
        assert_eq!(
            outcomes(named),
            [
                (0, "rejected"),
                (1, "applied"),
                (2, "stale_at_sink"),
                (3, "refused"),
                (4, "gap_at_sink")
            ]
        );
        // A count the sink cannot attribute (Postgres's guard in a mixed batch).
        let counted = SinkReport {
            applied: 4,
            stale: 1,
            ..SinkReport::default()
        };
        assert!(
            outcomes(counted)
                .iter()
                .all(|(_, o)| *o == "applied_or_stale")
        );
        let all_stale = SinkReport {
            stale: 5,
            ..SinkReport::default()
        };
        assert!(
            outcomes(all_stale)
                .iter()
                .all(|(_, o)| *o == "stale_at_sink")
        );
    }

    #[test]
    fn decode_keeps_only_the_payload_members_the_stages_read() {
        let projected = "  decode: { type: decode }\n  latest: { type: version_filter, input: decode }\n  athlete: { type: project, input: latest, fields: { name: payload.displayName, city: payload.address.city, id: aggregateId } }\n  cache: { type: redis_hash, input: athlete, key: \"a:{payload.region}:{aggregateId}\" }\n";
        assert_eq!(
            reads(projected),
            PayloadSelection::only(["displayName", "address", "region"])
        );
        // A sink fed without a projection writes the whole payload.
        let unprojected = "  decode: { type: decode }\n  athlete: { type: project, input: decode, fields: { name: payload.displayName } }\n  cache: { type: redis_hash, input: athlete, key: \"a:{aggregateId}\" }\n  raw: { type: redis_hash, input: decode, key: \"r:{aggregateId}\" }\n";
        assert_eq!(reads(unprojected), PayloadSelection::All);
        // `where` sees the whole event.
        let filtered = "  decode: { type: decode }\n  athlete: { type: project, input: decode, where: \"payload.status == 'active'\", fields: { name: payload.displayName } }\n  cache: { type: redis_hash, input: athlete, key: \"a:{aggregateId}\" }\n";
        assert_eq!(reads(filtered), PayloadSelection::All);
    }
}
