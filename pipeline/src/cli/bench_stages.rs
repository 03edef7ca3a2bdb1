//! `ecst bench stages`: the CPU each event costs in a pipeline's stages (everything but the
//! sinks), in this process, over generated athlete events of payload schema versions 1, 2
//! and 3 (the schemas of `examples/schemas/athlete`). No Redis, no store: the figure is the
//! stages' own work, measured as this thread's CPU time, so a loaded machine does not skew it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use ecst_operators::{BuildContext, BuiltStage, Outcomes, RawEntry, Record};
use ecst_pipeline::config;
use rustix::time::{ClockId, clock_gettime};
use serde_json::json;

/// Arguments of `ecst bench stages`.
#[derive(Args)]
pub(crate) struct StagesBenchArgs {
    /// Pipeline file whose stages to run (its sinks are not built).
    pipeline: PathBuf,
    /// Events to run through the stages.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    events: u64,
    /// Payload schema versions of the events, in turn (`--versions 1` for v1 only).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    versions: Vec<i64>,
}

/// An athlete event at payload schema version `schema` (v1 {id,name,country,status,points};
/// v2 renamed name -> displayName, country -> countryCode; v3 added an optional tier).
fn athlete(i: u64, schema: i64) -> serde_json::Value {
    let id = format!("ath-{i}");
    let countries = ["gb", "fr", "no", "ke"];
    let country = countries[(i % 4) as usize];
    let status = if i.is_multiple_of(5) {
        "retired"
    } else {
        "active"
    };
    let payload = match schema {
        1 => {
            json!({"id": id, "name": format!("Athlete {i}"), "country": country, "status": status, "points": i % 1000})
        }
        2 => {
            json!({"id": id, "displayName": format!("Athlete {i}"), "countryCode": country.to_uppercase(), "status": status, "points": i % 1000})
        }
        _ => {
            json!({"id": id, "displayName": format!("Athlete {i}"), "countryCode": country.to_uppercase(), "status": status, "points": i % 1000, "tier": "elite"})
        }
    };
    json!({"schemaVersion": schema, "eventId": format!("00000000-0000-4000-8000-{i:012}"),
           "eventType": "athlete.updated", "occurredAt": "2026-11-25T10:00:00Z",
           "aggregateType": "athlete", "aggregateId": id, "aggregateVersion": 1,
           "payload": payload})
}

/// This thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u128 {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
}

/// One transform of the pipeline, built, with the CPU it spent.
struct Timed {
    name: String,
    type_name: &'static str,
    inputs: Vec<usize>,
    stage: BuiltStage,
    cpu_ns: u128,
}

pub(crate) async fn bench_stages(args: StagesBenchArgs) -> anyhow::Result<ExitCode> {
    let config = config::load(&args.pipeline).map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.versions.is_empty() {
        bail!("--versions needs at least one version");
    }
    let nodes = config.graph_nodes();
    let order = ecst_pipeline::graph::topo_order(&nodes).context("the stage graph has a cycle")?;
    let payload_reads = ecst_pipeline::dag::pipeline_payload_reads(&config, &order);
    let mut slot_of: HashMap<&str, usize> = HashMap::new();
    let mut stages: Vec<Timed> = Vec::new();
    for &i in &order {
        let entry = &config.stages[i];
        if entry.config.is_sink() {
            continue;
        }
        let ctx = BuildContext {
            pipeline: config.name.clone(),
            stage: entry.name.clone(),
            source_redis: config.source.redis.clone(),
            payload_reads: payload_reads.clone(),
            schemas: config.schemas.clone(),
        };
        let stage = entry.config.build(&ctx).await?;
        if matches!(stage, BuiltStage::Sink(_)) {
            continue;
        }
        slot_of.insert(&entry.name, stages.len());
        stages.push(Timed {
            name: entry.name.clone(),
            type_name: entry.config.type_name(),
            inputs: entry
                .inputs
                .iter()
                .filter_map(|n| slot_of.get(n.as_str()).copied())
                .collect(),
            stage,
            cpu_ns: 0,
        });
    }

    let batch_size = config.source.batch_size.max(1) as u64;
    let (mut dead_lettered, mut dropped) = (0usize, 0usize);
    let mut dead_letter_sample = None;
    let mut done = 0u64;
    while done < args.events {
        let n = batch_size.min(args.events - done);
        // Generating the batch is not measured.
        let entries: Vec<RawEntry> = (done..done + n)
            .map(|i| {
                let schema = args.versions[(i % args.versions.len() as u64) as usize];
                RawEntry {
                    id: format!("{}-0", i + 1),
                    fields: vec![("v".into(), athlete(i, schema).to_string().into_bytes())],
                }
            })
            .collect();
        let mut outcomes = Outcomes::default();
        let mut outputs: Vec<Vec<Record>> = (0..stages.len()).map(|_| Vec::new()).collect();
        for s in 0..stages.len() {
            let input: Vec<Record> = stages[s]
                .inputs
                .iter()
                .flat_map(|&from| outputs[from].clone())
                .collect();
            let started = thread_cpu_ns();
            // An async stage's own CPU is measured on this thread only; its service's is not.
            outputs[s] = match &mut stages[s].stage {
                BuiltStage::Stage(stage) => stage.process(input, &entries, &mut outcomes),
                BuiltStage::AsyncStage(stage) => {
                    stage.process(input, &entries, &mut outcomes).await
                }
                BuiltStage::Sink(_) => Vec::new(),
            };
            stages[s].cpu_ns += thread_cpu_ns() - started;
        }
        dead_lettered += outcomes.dead_letters.len();
        dropped += outcomes.dropped.len();
        if dead_letter_sample.is_none()
            && let Some((entry, reason)) = outcomes.dead_letters.first()
        {
            dead_letter_sample = Some(format!("{}: {reason}", entries[*entry].id));
        }
        if let Some(reason) = outcomes.halt {
            bail!("stopped: {reason}");
        }
        done += n;
    }

    let per_event = |ns: u128| ns as f64 / 1000.0 / args.events as f64;
    let versions: Vec<String> = args.versions.iter().map(|v| format!("v{v}")).collect();
    println!(
        "{}: {} events ({} in turn), batches of {batch_size}; CPU per event, this thread",
        args.pipeline.display(),
        args.events,
        versions.join(" ")
    );
    for s in &stages {
        println!(
            "  {:<16} {:<16} {:>8.3} µs",
            s.name,
            s.type_name,
            per_event(s.cpu_ns)
        );
    }
    let total: u128 = stages.iter().map(|s| s.cpu_ns).sum();
    println!("  {:<33} {:>8.3} µs", "all stages", per_event(total));
    let schema: u128 = stages
        .iter()
        .filter(|s| matches!(s.type_name, "validate" | "upcast"))
        .map(|s| s.cpu_ns)
        .sum();
    println!(
        "  {:<33} {:>8.3} µs",
        "validate + upcast",
        per_event(schema)
    );
    println!("  dead-lettered {dead_lettered}, dropped {dropped}");
    if let Some(sample) = dead_letter_sample {
        println!("  first dead letter: {sample}");
    }
    Ok(ExitCode::SUCCESS)
}
