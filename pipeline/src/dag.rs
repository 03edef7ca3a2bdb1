//! The stage graph of one worker: every stage and sink built, run over a batch in
//! topological order, handing each sink its share of the records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ecst_operators::{BuildContext, BuiltStage, Outcomes, RawEntry, Record, Sink, Stage};
use ecst_schemas::PayloadSelection;

use crate::config::PipelineConfig;
use crate::error::RunError;
use crate::stats::{Histogram, SinkStats, StageStats, Stats};

enum Node {
    Transform(Box<dyn Stage>),
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
                Node::Transform(_) => {
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
            if let Node::Transform(stage) = node {
                stage.reset();
            }
        }
    }

    /// The sinks, by stage name.
    pub(crate) fn sinks(&self) -> &[(String, Arc<dyn Sink>)] {
        &self.sinks
    }

    /// Runs the transforms over a batch; returns each sink's records.
    pub(crate) fn run(&mut self, entries: &[RawEntry], out: &mut Outcomes) -> Vec<Vec<Record>> {
        self.run_from(entries, None, out)
    }

    /// Runs a batch whose records are already decoded (snapshot rows): they stand in for the
    /// output of the root stages.
    pub(crate) fn run_decoded(
        &mut self,
        entries: &[RawEntry],
        records: Vec<Record>,
        out: &mut Outcomes,
    ) -> Vec<Vec<Record>> {
        self.run_from(entries, Some(records), out)
    }

    fn run_from(
        &mut self,
        entries: &[RawEntry],
        decoded: Option<Vec<Record>>,
        out: &mut Outcomes,
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
            match &mut self.nodes[i] {
                Node::Transform(_) if self.inputs[i].is_empty() && decoded.is_some() => {
                    outputs[i] = decoded.clone();
                }
                Node::Transform(stage) => {
                    let timing = self.stage_slots[i].and_then(|slot| self.stats.stages().get(slot));
                    let _span = tracing::info_span!(
                        "ecst.stage",
                        ecst.stage = timing.map_or("", |s| s.name.as_str()),
                        ecst.records = input.len()
                    )
                    .entered();
                    let started = Instant::now();
                    outputs[i] = Some(stage.process(input, entries, out));
                    if let Some(s) = timing {
                        s.duration.observe(started.elapsed().as_secs_f64());
                    }
                }
                Node::Sink(s) => per_sink[*s] = input,
            }
        }
        per_sink
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
