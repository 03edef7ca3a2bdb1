//! `delta`: marks events that carry only their changed fields as patches, with the version
//! each applies on top of. The sinks apply a patch only where the replica holds exactly that
//! base version; anything else is stale (the replica is as new or newer) or a gap (a version
//! in between is missing), which is never patched over. With `repair:`, the worker fetches a
//! gapped aggregate's full state from a snapshot-contract endpoint and applies that instead.

use std::sync::Arc;

use serde::Deserialize;

use crate::dead_letter::DeadLetterReason;
use crate::duration::ConfigDuration;
use crate::fetch::{FetchClient, FetchOptions};
use crate::record::{Action, Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, Stage};

/// Where a patch's base version comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum DeltaBase {
    /// The envelope's `baseVersion`; events without one are full state, written as usual.
    #[default]
    #[serde(rename = "baseVersion")]
    BaseVersion,
    /// Versions are contiguous: every event but a tombstone applies on top of `version - 1`
    /// (version 1 on top of nothing, as an absent entry counts as version 0).
    #[serde(rename = "contiguous")]
    Contiguous,
}

/// Configuration of the `delta` stage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaConfig {
    /// `baseVersion` (default) or `contiguous`.
    #[serde(default)]
    pub base: DeltaBase,
    /// Where a gapped aggregate's full state is fetched from (default: none, a gap waits for
    /// the missing version).
    #[serde(default)]
    pub repair: Option<RepairConfig>,
}

/// The endpoint gap repair fetches full states from: the `fetch` stage's client keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepairConfig {
    /// Base URL of the endpoint (`{url}/{entity}/{id}`, `{url}/{entity}:batch`).
    pub url: String,
    /// Bearer token (write `${ENV}`; default none).
    #[serde(default)]
    pub token: Option<String>,
    /// Entity name in the URL (default: the event's `aggregateType`).
    #[serde(default)]
    pub entity: Option<String>,
    /// Ids per request (default 100).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Requests in flight at once (default 4).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Longest one request may take (default 5s).
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
    /// Retries of a failed request before the gap waits for a redelivery (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// First retry delay, doubled each time (default 100ms).
    #[serde(default)]
    pub backoff: Option<ConfigDuration>,
    /// Longest retry delay (default 5s).
    #[serde(default)]
    pub backoff_max: Option<ConfigDuration>,
    /// Consecutive failed requests that open the circuit breaker (default 5, 0: never).
    #[serde(default)]
    pub breaker_failures: Option<u32>,
    /// How long an open breaker fails fast before one trial (default 10s).
    #[serde(default)]
    pub breaker_open_for: Option<ConfigDuration>,
    /// Largest response body accepted, in bytes (default 16 MiB).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
}

impl RepairConfig {
    fn options(&self) -> FetchOptions {
        let d = FetchOptions::default();
        FetchOptions {
            url: self.url.clone(),
            token: self.token.clone().filter(|t| !t.is_empty()),
            timeout: self.timeout.map_or(d.timeout, |t| t.0),
            retries: self.retries.unwrap_or(d.retries),
            backoff: self.backoff.map_or(d.backoff, |t| t.0),
            backoff_max: self.backoff_max.map_or(d.backoff_max, |t| t.0),
            breaker_failures: self.breaker_failures.unwrap_or(d.breaker_failures),
            breaker_open_for: self.breaker_open_for.map_or(d.breaker_open_for, |t| t.0),
            concurrency: self.concurrency.unwrap_or(d.concurrency),
            max_batch: self.batch_size.unwrap_or(d.max_batch),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
        }
    }

    /// The client of the repair endpoint.
    pub fn build(&self) -> Result<GapRepair, String> {
        let client = FetchClient::new(self.options()).map_err(|e| e.to_string())?;
        Ok(GapRepair {
            client: Arc::new(client),
            entity: self.entity.clone(),
        })
    }
}

/// Where gapped aggregates' full states come from: a snapshot-contract endpoint.
#[derive(Debug, Clone)]
pub struct GapRepair {
    /// The endpoint's client.
    pub client: Arc<FetchClient>,
    /// Entity name in the URL (`None`: the event's `aggregateType`).
    pub entity: Option<String>,
}

impl DeltaConfig {
    /// Builds the stage.
    pub fn build(&self) -> Delta {
        Delta { base: self.base }
    }
}

/// The running `delta` stage.
#[derive(Debug)]
pub struct Delta {
    base: DeltaBase,
}

impl Delta {
    /// The base version `record` patches, `None` for a full state or a delete.
    fn base_of(&self, record: &Record) -> Result<Option<u64>, String> {
        let event = &record.event;
        if event.is_tombstone() {
            return Ok(None);
        }
        match self.base {
            DeltaBase::BaseVersion => Ok(event.base_version),
            DeltaBase::Contiguous => match event.base_version {
                Some(base) if base + 1 != event.aggregate_version => Err(format!(
                    "baseVersion {base} contradicts contiguous versions (aggregateVersion {})",
                    event.aggregate_version
                )),
                _ => Ok(event.aggregate_version.checked_sub(1)),
            },
        }
    }
}

impl Stage for Delta {
    fn reads_snapshots(&self) -> bool {
        // A snapshot row is the aggregate's full state, whatever `base` says of events.
        false
    }

    fn process(
        &mut self,
        input: Vec<Record>,
        _entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut kept = Vec::with_capacity(input.len());
        for mut record in input {
            match self.base_of(&record) {
                Ok(Some(base)) => record.action = Action::Patch { base },
                Ok(None) => {}
                Err(message) => {
                    out.dead_letter(record.entry, DeadLetterReason::StageRejected { message });
                    continue;
                }
            }
            kept.push(record);
        }
        kept
    }
}

impl ComponentConfig for DeltaConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::optional(
            "base",
            "baseVersion | contiguous",
            "baseVersion",
            "where a patch's base version comes from (`contiguous`: version - 1)",
        ),
        KeyDoc::optional(
            "repair",
            "map",
            "none",
            "gap repair endpoint: `url` plus the `fetch` stage's client keys (`token`, `entity`, `batch_size`, `concurrency`, `timeout`, `retries`, `backoff`, `backoff_max`, `breaker_failures`, `breaker_open_for`, `max_body_bytes`)",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        let Some(repair) = &self.repair else {
            return Vec::new();
        };
        match url::Url::parse(&repair.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Vec::new(),
            Ok(_) => vec![ConfigProblem::new(
                "repair.url",
                "only http and https are supported",
            )],
            Err(e) => vec![ConfigProblem::new("repair.url", e.to_string())],
        }
    }

    fn payload_reads(&self, _projected: bool) -> ecst_schemas::PayloadSelection {
        ecst_schemas::PayloadSelection::nothing()
    }

    async fn build_component(&self, _ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::Stage(Box::new(self.build())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::EnvelopeKeys;
    use serde_json::json;

    fn record(entry: usize, body: serde_json::Value) -> Record {
        Record::new(entry, EnvelopeKeys::default().read(&body).unwrap())
    }

    fn run(base: DeltaBase, input: Vec<Record>) -> (Vec<Record>, Outcomes) {
        let mut out = Outcomes::default();
        (
            DeltaConfig { base, repair: None }
                .build()
                .process(input, &[], &mut out),
            out,
        )
    }

    #[test]
    fn base_version_marks_events_that_carry_one() {
        let (kept, out) = run(
            DeltaBase::BaseVersion,
            vec![
                record(
                    0,
                    json!({"aggregateId": "a", "aggregateVersion": 5, "baseVersion": 4, "payload": {"x": null}}),
                ),
                record(
                    1,
                    json!({"aggregateId": "a", "aggregateVersion": 6, "payload": {"x": 1}}),
                ),
                record(
                    2,
                    json!({"aggregateId": "a", "aggregateVersion": 7, "baseVersion": 6, "deleted": true}),
                ),
            ],
        );
        assert!(out.dead_letters.is_empty());
        assert_eq!(kept[0].action, Action::Patch { base: 4 });
        assert_eq!(kept[1].action, Action::Upsert);
        assert!(matches!(kept[2].action, Action::Delete { .. }));
    }

    #[test]
    fn contiguous_patches_every_state_on_the_version_before() {
        let (kept, out) = run(
            DeltaBase::Contiguous,
            vec![
                record(
                    0,
                    json!({"aggregateId": "a", "aggregateVersion": 1, "payload": {"x": 1}}),
                ),
                record(
                    1,
                    json!({"aggregateId": "a", "aggregateVersion": 9, "payload": {"x": 2}}),
                ),
                record(
                    2,
                    json!({"aggregateId": "a", "aggregateVersion": 0, "payload": {"x": 3}}),
                ),
                record(
                    3,
                    json!({"aggregateId": "a", "aggregateVersion": 10, "baseVersion": 9, "payload": {}}),
                ),
                record(
                    4,
                    json!({"aggregateId": "a", "aggregateVersion": 12, "baseVersion": 10, "payload": {}}),
                ),
            ],
        );
        let actions: Vec<Action> = kept.iter().map(|r| r.action).collect();
        assert_eq!(
            actions,
            [
                Action::Patch { base: 0 },
                Action::Patch { base: 8 },
                Action::Upsert,
                Action::Patch { base: 9 }
            ]
        );
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].0, 4);
        assert!(
            out.dead_letters[0]
                .1
                .to_string()
                .contains("baseVersion 10 contradicts contiguous versions (aggregateVersion 12)"),
            "{}",
            out.dead_letters[0].1
        );
    }

    #[test]
    fn config_reads_from_json_and_rejects_unknown_keys() {
        let c: DeltaConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(c.base, DeltaBase::BaseVersion);
        let c: DeltaConfig = serde_json::from_value(json!({"base": "contiguous"})).unwrap();
        assert_eq!(c.base, DeltaBase::Contiguous);
        assert!(serde_json::from_value::<DeltaConfig>(json!({"base": "previous"})).is_err());
        assert!(serde_json::from_value::<DeltaConfig>(json!({"bsae": "contiguous"})).is_err());
        let c: DeltaConfig = serde_json::from_value(
            json!({"repair": {"url": "http://127.0.0.1:1/snapshot", "entity": "athlete", "timeout": "2s"}}),
        )
        .unwrap();
        let repair = c.repair.as_ref().unwrap();
        assert_eq!(repair.options().timeout, std::time::Duration::from_secs(2));
        assert_eq!(repair.options().retries, FetchOptions::default().retries);
        assert!(c.problems().is_empty());
        assert!(
            serde_json::from_value::<DeltaConfig>(
                json!({"repair": {"url": "http://x", "when": "payload_missing"}})
            )
            .is_err()
        );
        let c: DeltaConfig =
            serde_json::from_value(json!({"repair": {"url": "ftp://x/snapshot"}})).unwrap();
        assert_eq!(c.problems()[0].key, "repair.url");
    }
}
