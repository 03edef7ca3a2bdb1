//! The bench's synthetic workload: athlete events of N aggregates × V versions, shuffled in
//! windows, a share duplicated and a share deleted, and how they are written to the stream.

use anyhow::Context;
use ecst_schemas::partition::{partition_of, partition_stream};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::bench::BenchArgs;
use super::bench_target::Target;

/// One event of the workload, regenerated from these numbers when it is written.
#[derive(Clone, Copy)]
pub(crate) struct Event {
    pub(crate) aggregate: u32,
    pub(crate) version: u32,
}

pub(crate) struct Workload {
    pub(crate) events: Vec<Event>,
    /// Per aggregate, whether its last version deletes it.
    pub(crate) deleted: Vec<bool>,
    pub(crate) versions: u32,
}

pub(crate) fn workload(args: &BenchArgs) -> Workload {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let deleted: Vec<bool> = (0..args.aggregates)
        .map(|_| rng.random_bool(args.deletes.clamp(0.0, 1.0)))
        .collect();
    let mut order: Vec<u32> = (0..args.aggregates).collect();
    let mut events: Vec<Event> =
        Vec::with_capacity((args.aggregates as usize) * (args.versions as usize));
    for version in 1..=args.versions {
        order.shuffle(&mut rng);
        events.extend(order.iter().map(|&aggregate| Event { aggregate, version }));
    }
    let window = args.window.max(1);
    for chunk in events.chunks_mut(window) {
        chunk.shuffle(&mut rng);
    }
    // Each duplicate lands up to a window after its original; spliced in one pass.
    let duplicates = (events.len() as f64 * args.duplicates.clamp(0.0, 1.0)) as usize;
    let mut copies: Vec<(usize, Event)> = (0..duplicates)
        .map(|_| {
            let at = rng.random_range(0..events.len());
            (
                (at + rng.random_range(0..window)).min(events.len()),
                events[at],
            )
        })
        .collect();
    copies.sort_by_key(|(to, _)| std::cmp::Reverse(*to));
    let mut spliced = Vec::with_capacity(events.len() + duplicates);
    for (i, event) in events.into_iter().enumerate() {
        while copies.last().is_some_and(|(to, _)| *to == i) {
            if let Some((_, copy)) = copies.pop() {
                spliced.push(copy);
            }
        }
        spliced.push(event);
    }
    spliced.extend(copies.into_iter().rev().map(|(_, copy)| copy));
    let events = spliced;
    Workload {
        events,
        deleted,
        versions: args.versions,
    }
}

pub(crate) const STATUSES: [&str; 3] = ["active", "retired", "suspended"];

fn body(event: Event, deleted: bool, occurred_at: &str) -> Vec<u8> {
    let id = format!("ath-{}", event.aggregate);
    let value = if deleted {
        json!({"schemaVersion": 1, "eventId": format!("{id}-{}", event.version), "eventType": "athlete.deleted",
               "occurredAt": occurred_at, "aggregateType": "athlete", "aggregateId": id,
               "aggregateVersion": event.version, "payload": null, "deleted": true})
    } else {
        json!({"schemaVersion": 1, "eventId": format!("{id}-{}", event.version), "eventType": "athlete.updated",
               "occurredAt": occurred_at, "aggregateType": "athlete", "aggregateId": id,
               "aggregateVersion": event.version,
               "payload": {"athleteId": id, "displayName": display_name(event), "countryCode": "GB",
                           "weightClass": "lightweight", "status": STATUSES[(event.version % 3) as usize],
                           "updatedAt": occurred_at}})
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

pub(crate) fn display_name(event: Event) -> String {
    format!("Athlete {} v{}", event.aggregate, event.version)
}

fn is_delete(w: &Workload, e: Event) -> bool {
    w.deleted[e.aggregate as usize] && e.version == w.versions
}

pub(crate) fn now_rfc3339() -> String {
    ecst_schemas::envelope::format_timestamp(time::OffsetDateTime::now_utc())
}

pub(crate) fn aggregate_id(aggregate: u32) -> String {
    format!("ath-{aggregate}")
}

/// Appends `events` to their partitions of `stream`, as a producer routes them.
pub(crate) async fn write_stream(
    target: &Target,
    stream: &str,
    partitions: u32,
    w: &Workload,
    events: &[Event],
) -> anyhow::Result<()> {
    let occurred = now_rfc3339();
    let keys: Vec<String> = (0..partitions)
        .map(|p| partition_stream(stream, p, partitions))
        .collect();
    // A slice at a time bounds the memory of the bodies.
    for slice in events.chunks(10_000) {
        target
            .exec(slice.iter().map(|&e| {
                let key = &keys[partition_of(&aggregate_id(e.aggregate), partitions) as usize];
                let mut cmd = redis::cmd("XADD");
                cmd.arg(key)
                    .arg("*")
                    .arg("v")
                    .arg(body(e, is_delete(w, e), &occurred));
                (key.clone(), cmd)
            }))
            .await
            .context("XADD failed")?;
    }
    Ok(())
}

/// Events of the workload per partition.
pub(crate) fn partition_counts(w: &Workload, partitions: u32) -> Vec<u64> {
    let of: Vec<u32> = (0..w.deleted.len() as u32)
        .map(|a| partition_of(&aggregate_id(a), partitions))
        .collect();
    let mut counts = vec![0u64; partitions as usize];
    for e in &w.events {
        counts[of[e.aggregate as usize] as usize] += 1;
    }
    counts
}
