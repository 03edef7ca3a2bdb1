//! Pipeline files: loading, `${VAR}` interpolation, typed configs and every error with its
//! file, line, column and key.

mod bootstrap;
mod suggest;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ecst_operators::registry::{STAGE_TYPES, is_root_type, is_sink_type};
use ecst_operators::stages::upcast::SCHEMA_VERSION_FIELD;
use ecst_operators::{ConfigDuration, SecretUrl, StageConfig};
use ecst_schemas::SchemaRegistry;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::graph::{self, GraphNode};
use yaml::{Node, Pos};

pub use bootstrap::{BootstrapConfig, OnGap};

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    /// From the first entry still in the stream (`0`).
    Beginning,
    /// Only entries added after the group is created (`$`).
    End,
}

impl StartPosition {
    /// The id XGROUP CREATE takes.
    pub fn as_id(&self) -> &'static str {
        match self {
            StartPosition::Beginning => "0",
            StartPosition::End => "$",
        }
    }
}

impl<'de> Deserialize<'de> for StartPosition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Number(n) if n.as_u64() == Some(0) => Ok(StartPosition::Beginning),
            Value::String(s) if s == "0" || s == "0-0" => Ok(StartPosition::Beginning),
            Value::String(s) if s == "$" => Ok(StartPosition::End),
            other => Err(serde::de::Error::custom(format!(
                "start must be \"0\" (the whole stream) or \"$\" (new entries only), got {other}"
            ))),
        }
    }
}

/// The `source:` section: a stream read by a consumer group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Redis URL (default `redis://127.0.0.1:6379`).
    #[serde(default = "default_redis")]
    pub redis: SecretUrl,
    /// Stream key.
    pub stream: String,
    /// Consumer group.
    pub group: String,
    /// Consumer name (default `<hostname>-<pid>`).
    #[serde(default)]
    pub consumer: Option<String>,
    /// Entries per XREADGROUP (default 500).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// XREADGROUP BLOCK time (default 2s).
    #[serde(default = "default_block")]
    pub block: ConfigDuration,
    /// Response timeout of the reader's connection; must exceed `block` by at least 1s
    /// (default `block` + 5s).
    #[serde(default)]
    pub read_timeout: Option<ConfigDuration>,
    /// Where a new group starts: `"0"` (default) or `"$"`.
    #[serde(default = "default_start")]
    pub start: StartPosition,
    /// Pending entries idle this long are claimed from their consumer (default 60s).
    #[serde(default = "default_claim_idle")]
    pub claim_idle: ConfigDuration,
    /// How often to look for such entries (default 10s).
    #[serde(default = "default_claim_every")]
    pub claim_every: ConfigDuration,
    /// How often a running worker checks for a retention gap (default 30s).
    #[serde(default = "default_gap_check_every")]
    pub gap_check_every: ConfigDuration,
    /// Entries delivered more often are dead-lettered (default 5).
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u64,
    /// Dead-letter stream (default `<stream>.dlq`).
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Approximate MAXLEN of the dead-letter stream (default 1000000).
    #[serde(default = "default_dead_letter_maxlen")]
    pub dead_letter_maxlen: u64,
    /// Batches read ahead while earlier ones are being written (default 2).
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Timeout of each non-blocking Redis command (default 5s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
    /// How long shutdown waits for in-flight batches (default 30s).
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: ConfigDuration,
    /// Partitions of the stream (default 1: the single key `stream`); see `ecst_schemas::partition`.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// How long a worker's partition lease lasts without renewal (default 5s).
    #[serde(default = "default_lease")]
    pub lease: ConfigDuration,
}

fn default_redis() -> SecretUrl {
    SecretUrl::new("redis://127.0.0.1:6379")
}
fn default_batch_size() -> usize {
    500
}
fn default_block() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn default_start() -> StartPosition {
    StartPosition::Beginning
}
fn default_claim_idle() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_gap_check_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_claim_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_max_deliveries() -> u64 {
    5
}
fn default_dead_letter_maxlen() -> u64 {
    1_000_000
}
fn default_in_flight() -> usize {
    2
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}
fn default_shutdown_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_partitions() -> u32 {
    1
}
fn default_lease() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}

/// Least margin between `block` and `read_timeout`.
pub const READ_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

impl SourceConfig {
    /// The reader connection's response timeout.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
            .map(|d| d.0)
            .unwrap_or(self.block.0 + Duration::from_secs(5))
    }

    /// The dead-letter stream key.
    pub fn dead_letter_stream(&self) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.stream))
    }

    /// The consumer name: configured, or `<hostname>-<pid>`.
    pub fn consumer_name(&self) -> String {
        self.consumer.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "ecst".into());
            format!("{host}-{}", std::process::id())
        })
    }

    fn check(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.stream.is_empty() {
            problems.push(("stream", "must not be empty".to_string()));
        }
        if self.group.is_empty() {
            problems.push(("group", "must not be empty".to_string()));
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            problems.push((
                "batch_size",
                format!("must be between 1 and 100000, got {}", self.batch_size),
            ));
        }
        if self.in_flight == 0 {
            problems.push(("in_flight", "must be at least 1".to_string()));
        }
        if self.max_deliveries == 0 {
            problems.push(("max_deliveries", "must be at least 1".to_string()));
        }
        if self.block.0 < Duration::from_millis(1) {
            problems.push((
                "block",
                "must be at least 1ms (0 would block forever)".to_string(),
            ));
        }
        if let Some(read_timeout) = self.read_timeout
            && read_timeout.0 < self.block.0 + READ_TIMEOUT_MARGIN
        {
            problems.push((
                "read_timeout",
                format!(
                    "{read_timeout} must exceed block ({}) by at least {}: a blocking XREADGROUP would time out on a healthy connection",
                    self.block,
                    ConfigDuration(READ_TIMEOUT_MARGIN)
                ),
            ));
        }
        if self.timeout.0.is_zero() {
            problems.push(("timeout", "must be more than 0ms".to_string()));
        }
        if self.partitions == 0 || self.partitions > 1024 {
            problems.push((
                "partitions",
                format!("must be between 1 and 1024, got {}", self.partitions),
            ));
        }
        if self.partitions > 1
            && let Err(e) = ecst_schemas::partition::check_partitioned_name(&self.stream)
        {
            problems.push(("stream", e));
        }
        if self.lease.0 < Duration::from_millis(500) {
            problems.push((
                "lease",
                format!("must be at least 500ms, got {}", self.lease),
            ));
        }
        if self.dead_letter_stream() == self.stream {
            problems.push((
                "dead_letter",
                "must differ from the source stream".to_string(),
            ));
        }
        if let Err(e) = ecst_operators::redis_pool::check_redis_url(&self.redis) {
            problems.push(("redis", format!("invalid Redis URL {}: {e}", self.redis)));
        }
        problems
    }
}

/// One named stage of a pipeline file.
#[derive(Debug, Clone)]
pub struct StageEntry {
    /// Name (the key under `stages:`).
    pub name: String,
    /// Names of the stages it reads.
    pub inputs: Vec<String>,
    /// Typed configuration.
    pub config: StageConfig,
}

/// A whole, valid pipeline file.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// File it came from.
    pub file: PathBuf,
    /// Pipeline name.
    pub name: String,
    /// The stream and group.
    pub source: SourceConfig,
    /// Stages in file order.
    pub stages: Vec<StageEntry>,
    /// Where a new, reset or gapped group gets the current state from.
    pub bootstrap: Option<BootstrapConfig>,
    /// The schema directory named by `schemas:` (relative to the pipeline file), read.
    pub schemas: Option<Arc<SchemaRegistry>>,
}

impl PipelineConfig {
    /// The DAG view of the stages, in file order.
    pub fn graph_nodes(&self) -> Vec<GraphNode<'_>> {
        self.stages
            .iter()
            .map(|s| GraphNode {
                name: &s.name,
                type_name: s.config.type_name(),
                inputs: &s.inputs,
                is_sink: s.config.is_sink(),
                is_root: s.config.is_root(),
                known: true,
            })
            .collect()
    }
}

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File.
    pub file: PathBuf,
    /// Line and column.
    pub pos: Pos,
    /// Dotted key (`stages.cache.key`), empty for the whole file.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.pos.line,
            self.pos.col
        )?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.0 {
            writeln!(f, "{error}")?;
        }
        let n = self.0.len();
        write!(f, "{n} error{}", if n == 1 { "" } else { "s" })
    }
}

/// Reads and validates a pipeline file, with `${VAR}` taken from the process environment.
pub fn load(path: &Path) -> Result<PipelineConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            pos: Pos::default(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_str(path, &text, &|name| std::env::var(name).ok())
}

struct Collector<'a> {
    file: &'a Path,
    root: &'a Node,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn at(&mut self, path: &[String], message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            pos: self.root.locate(path),
            key: path.join("."),
            message: suggest::with_suggestion(message.into()),
        });
    }
}

/// Unknown top-level keys reported one by one; past this many, the rest are counted.
pub const MAX_REPORTED_UNKNOWN_KEYS: usize = 20;

/// Reports the unknown keys of the top-level mapping at their own positions. One pass with no
/// lookup per key (the position is the key's own), so n keys cost O(n), and the report stays
/// readable however many there are: the first [`MAX_REPORTED_UNKNOWN_KEYS`], then a count.
fn report_unknown_keys(c: &mut Collector<'_>, top: &[(yaml::Key, Node)]) {
    // `tests` holds the file's `ecst test` cases, which `test_case` reads.
    const KNOWN: [&str; 6] = ["name", "source", "stages", "bootstrap", "schemas", "tests"];
    let mut unknown = top
        .iter()
        .map(|(key, _)| key)
        .filter(|key| !KNOWN.contains(&key.name.as_str()));
    for key in unknown.by_ref().take(MAX_REPORTED_UNKNOWN_KEYS) {
        c.errors.push(ConfigError {
            file: c.file.to_path_buf(),
            pos: key.pos,
            key: key.name.clone(),
            message: format!(
                "unknown key `{}` (expected name, source, stages, bootstrap, schemas, tests){}",
                key.name,
                suggest::closest(&key.name, KNOWN)
                    .map(|near| format!("; did you mean `{near}`?"))
                    .unwrap_or_default()
            ),
        });
    }
    if let Some(next) = unknown.next() {
        let more = 1 + unknown.count();
        c.errors.push(ConfigError {
            file: c.file.to_path_buf(),
            pos: next.pos,
            key: next.name.clone(),
            message: format!(
                "and {more} more unknown top-level key{} (expected name, source, stages, bootstrap, schemas, tests)",
                if more == 1 { "" } else { "s" }
            ),
        });
    }
}

fn path(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// Validates pipeline text; `env` resolves `${VAR}`.
pub fn load_str(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineConfig, ConfigErrors> {
    let mut root = yaml::parse(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            pos: e.pos,
            key: String::new(),
            message: e.message,
        }])
    })?;
    let interpolation = yaml::interpolate(&mut root, env);
    let root = root;
    let mut c = Collector {
        file,
        root: &root,
        errors: Vec::new(),
    };
    for (key, e) in interpolation {
        c.errors.push(ConfigError {
            file: file.to_path_buf(),
            pos: e.pos,
            key,
            message: e.message,
        });
    }

    let Some(top) = root.entries() else {
        c.at(
            &[],
            "a pipeline file is a mapping with `name`, `source` and `stages`",
        );
        return Err(ConfigErrors(c.errors));
    };
    report_unknown_keys(&mut c, top);

    let name = match root.get("name") {
        Some((_, node)) => match node.to_json() {
            Value::String(s) if valid_name(&s) => Some(s),
            _ => {
                c.at(
                    &path(&["name"]),
                    "must be a name of letters, digits, `.`, `_` or `-`",
                );
                None
            }
        },
        None => {
            c.at(&[], "missing key `name`");
            None
        }
    };

    let source = match root.get("source") {
        Some((_, node)) => {
            match serde_path_to_error::deserialize::<_, SourceConfig>(node.to_json()) {
                Ok(source) => {
                    for (key, message) in source.check() {
                        c.at(&path(&["source", key]), message);
                    }
                    Some(source)
                }
                Err(e) => {
                    let mut p = vec!["source".to_string()];
                    p.extend(error_path(&e));
                    c.at(&p, with_cluster_hint(e.into_inner().to_string()));
                    None
                }
            }
        }
        None => {
            c.at(&[], "missing key `source`");
            None
        }
    };

    let bootstrap = match root.get("bootstrap") {
        None => None,
        Some((_, node)) => {
            match serde_path_to_error::deserialize::<_, BootstrapConfig>(node.to_json()) {
                Ok(bootstrap) => {
                    for (key, message) in bootstrap.check() {
                        c.at(&path(&["bootstrap", key]), message);
                    }
                    Some(bootstrap)
                }
                Err(e) => {
                    let mut p = vec!["bootstrap".to_string()];
                    p.extend(error_path(&e));
                    c.at(&p, e.into_inner().to_string());
                    None
                }
            }
        }
    };

    let mut reads: Vec<StageRead> = Vec::new();
    match root.get("stages") {
        Some((_, node)) => match node.entries() {
            Some(entries) if !entries.is_empty() => {
                for (key, stage_node) in entries {
                    reads.push(read_stage(&mut c, &key.name, stage_node));
                }
            }
            _ => c.at(
                &path(&["stages"]),
                "must be a mapping of stage name to stage",
            ),
        },
        None => c.at(&[], "missing key `stages`"),
    }

    // The graph is checked over every stage, including those whose keys are wrong, so that
    // one bad stage neither hides nor invents graph problems. A stage of unknown type counts
    // is left out of the checks that depend on what it would have done.
    let nodes: Vec<GraphNode<'_>> = reads
        .iter()
        .map(|r| {
            let known = STAGE_TYPES.contains(&r.type_name.as_str());
            GraphNode {
                name: &r.name,
                type_name: &r.type_name,
                inputs: &r.inputs,
                is_sink: is_sink_type(&r.type_name),
                is_root: is_root_type(&r.type_name),
                known,
            }
        })
        .collect();
    for problem in graph::check(&nodes) {
        let mut p = vec!["stages".to_string(), problem.stage.clone()];
        if let Some(key) = &problem.key {
            let stage_node = root
                .get("stages")
                .and_then(|(_, n)| n.get(&problem.stage))
                .map(|(_, n)| n);
            let key = if stage_node.is_some_and(|n| n.get(key).is_none()) && key == "input" {
                "inputs".to_string()
            } else {
                key.clone()
            };
            p.push(key);
        }
        c.at(&p, problem.message);
    }

    let schemas = read_schemas(&mut c, &root, source.as_ref(), &reads);

    if !c.errors.is_empty() {
        // The pipeline file's errors in file order, then the schema directory's.
        c.errors
            .sort_by_key(|e| (e.file != file, e.file.clone(), e.pos.line, e.pos.col));
        return Err(ConfigErrors(c.errors));
    }
    let stages: Vec<StageEntry> = reads
        .into_iter()
        .filter_map(|r| {
            Some(StageEntry {
                name: r.name,
                inputs: r.inputs,
                config: r.config?,
            })
        })
        .collect();
    match (name, source) {
        (Some(name), Some(source)) => Ok(PipelineConfig {
            file: file.to_path_buf(),
            name,
            source,
            stages,
            bootstrap,
            schemas,
        }),
        _ => Err(ConfigErrors(c.errors)),
    }
}

/// Reads the schema directory `schemas:` names, reporting its problems, and checks the
/// pipeline against it: the source's stream has a stream file, and every payload path a stage
/// reads is in the latest schema of the stream's aggregate type. Stages that need schemas
/// are reported when there is no `schemas:`.
fn read_schemas(
    c: &mut Collector<'_>,
    root: &Node,
    source: Option<&SourceConfig>,
    reads: &[StageRead],
) -> Option<Arc<SchemaRegistry>> {
    let Some((_, node)) = root.get("schemas") else {
        for read in reads {
            if read.config.as_ref().is_some_and(StageConfig::needs_schemas) {
                c.at(
                    &path(&["stages", &read.name, "type"]),
                    format!(
                        "a {} stage needs the schema directory: add `schemas: ./schemas` at the top of the file",
                        read.type_name
                    ),
                );
            }
        }
        return None;
    };
    let dir = match node.to_json() {
        Value::String(dir) if !dir.is_empty() => dir,
        _ => {
            c.at(
                &path(&["schemas"]),
                "must be the path of a schema directory, relative to this file",
            );
            return None;
        }
    };
    let dir = c
        .file
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join(dir)
        // `a/./schemas` reads `a/schemas` in messages.
        .components()
        .collect::<PathBuf>();
    let (registry, errors) = crate::schema_dir::read(&dir);
    c.errors.extend(errors);
    if let Some(source) = source {
        check_against_schemas(c, &registry, &dir, source, reads);
    }
    Some(Arc::new(registry))
}

fn check_against_schemas(
    c: &mut Collector<'_>,
    registry: &SchemaRegistry,
    dir: &Path,
    source: &SourceConfig,
    reads: &[StageRead],
) {
    let Some(spec) = registry.stream(&source.stream) else {
        c.at(
            &path(&["source", "stream"]),
            format!(
                "the schema directory has no stream file {}",
                dir.join("streams")
                    .join(format!("{}.yaml", source.stream))
                    .display()
            ),
        );
        return;
    };
    if spec.partitions.unwrap_or(1) != source.partitions {
        c.at(
            &path(&["source", "partitions"]),
            format!(
                "{} partition(s), but the stream file {} says {}",
                source.partitions,
                dir.join(&spec.path).display(),
                spec.partitions.unwrap_or(1)
            ),
        );
    }
    let Some(subject) = registry.subject(&spec.aggregate_type) else {
        return;
    };
    let latest = subject.latest();
    let nodes: Vec<GraphNode<'_>> = reads
        .iter()
        .map(|r| GraphNode {
            name: &r.name,
            type_name: &r.type_name,
            inputs: &r.inputs,
            is_sink: is_sink_type(&r.type_name),
            is_root: is_root_type(&r.type_name),
            known: true,
        })
        .collect();
    let Some(order) = graph::topo_order(&nodes) else {
        return;
    };
    // A stage's records are projected when every input's went through a `project` stage
    // (as `dag` decides what `decode` keeps).
    let mut projected = vec![false; reads.len()];
    // Records that went through `upcast` also carry the member it adds.
    let mut upcast = vec![false; reads.len()];
    for i in order {
        let read = &reads[i];
        let inputs: Vec<usize> = read
            .inputs
            .iter()
            .filter_map(|name| reads.iter().position(|r| &r.name == name))
            .collect();
        let fed_projected = !inputs.is_empty() && inputs.iter().all(|&j| projected[j]);
        let Some(config) = &read.config else {
            continue;
        };
        projected[i] = fed_projected || config.is_projection();
        let fed_upcast = inputs.iter().any(|&j| upcast[j]);
        upcast[i] = fed_upcast || matches!(config, StageConfig::Upcast(_));
        for payload_path in config.payload_paths(fed_projected) {
            let members: Vec<&str> = payload_path.members.iter().map(String::as_str).collect();
            let added_by_upcast = fed_upcast && members == [SCHEMA_VERSION_FIELD];
            if !added_by_upcast && !latest.declares(&members) {
                let mut at = path(&["stages", &read.name]);
                at.extend(payload_path.key.split('.').map(str::to_string));
                c.at(
                    &at,
                    format!(
                        "payload.{} is not in the latest schema of {} ({})",
                        payload_path.members.join("."),
                        subject.name,
                        dir.join(&latest.path).display()
                    ),
                );
            }
        }
    }
}

/// Reads a one-document YAML file (`relay.yaml`, `snapshot.yaml`): `${VAR}` from the
/// environment, then `T`, then `check`'s (key path, message) problems, all positioned.
pub fn load_document<T: serde::de::DeserializeOwned>(
    path: &Path,
    check: impl Fn(&T) -> Vec<(Vec<String>, String)>,
) -> Result<T, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            pos: Pos::default(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_document_str(path, &text, &|name| std::env::var(name).ok(), check)
}

/// [`load_document`] over text; `env` resolves `${VAR}`.
pub fn load_document_str<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    check: impl Fn(&T) -> Vec<(Vec<String>, String)>,
) -> Result<T, ConfigErrors> {
    let mut root = yaml::parse(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            pos: e.pos,
            key: String::new(),
            message: e.message,
        }])
    })?;
    let interpolation = yaml::interpolate(&mut root, env);
    let mut c = Collector {
        file,
        root: &root,
        errors: Vec::new(),
    };
    for (key, e) in interpolation {
        c.errors.push(ConfigError {
            file: file.to_path_buf(),
            pos: e.pos,
            key,
            message: e.message,
        });
    }
    let parsed = match serde_path_to_error::deserialize::<_, T>(root.to_json()) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            let p = error_path(&e);
            c.at(&p, e.into_inner().to_string());
            None
        }
    };
    if let Some(parsed) = &parsed {
        for (key, message) in check(parsed) {
            c.at(&key, message);
        }
    }
    match parsed {
        Some(parsed) if c.errors.is_empty() => Ok(parsed),
        _ => {
            c.errors.sort_by_key(|e| (e.pos.line, e.pos.col));
            Err(ConfigErrors(c.errors))
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
}

/// Serde's message, plus how to name a Redis Cluster when a `cluster:` key was tried: ecst
/// takes the seed nodes in the URL instead.
fn with_cluster_hint(message: String) -> String {
    if message.starts_with("unknown field `cluster`") {
        format!(
            "{message}; a Redis Cluster is named by its URL, e.g. `redis: redis+cluster://host1:7001,host2:7002`"
        )
    } else {
        message
    }
}

fn error_path<E>(e: &serde_path_to_error::Error<E>) -> Vec<String>
where
    E: fmt::Display,
{
    let mut parts: Vec<String> = e
        .path()
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
            _ => None,
        })
        .collect();
    let message = e.inner().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
        && parts.last().map(String::as_str) != Some(&rest[..end])
    {
        parts.push(rest[..end].to_string());
    }
    parts
}

/// What could be read of one stage, even when its keys are wrong.
struct StageRead {
    name: String,
    type_name: String,
    inputs: Vec<String>,
    config: Option<StageConfig>,
}

fn read_stage(c: &mut Collector<'_>, name: &str, node: &Node) -> StageRead {
    let base = path(&["stages", name]);
    let at = |c: &mut Collector<'_>, key: &[&str], message: String| {
        let mut p = base.clone();
        p.extend(key.iter().map(|k| k.to_string()));
        c.at(&p, message);
    };
    if !valid_name(name) {
        at(
            c,
            &[],
            format!("stage name `{name}` must be letters, digits, `.`, `_` or `-`"),
        );
    }
    let mut read = StageRead {
        name: name.to_string(),
        type_name: "?".into(),
        inputs: Vec::new(),
        config: None,
    };
    let Value::Object(mut body) = node.to_json() else {
        at(c, &[], "a stage is a mapping with at least `type`".into());
        return read;
    };
    let type_name = match body.remove("type") {
        Some(Value::String(t)) => Some(t),
        Some(_) => {
            at(
                c,
                &["type"],
                format!("must be one of {}", STAGE_TYPES.join(", ")),
            );
            None
        }
        None => {
            at(
                c,
                &[],
                format!("missing key `type` (one of {})", STAGE_TYPES.join(", ")),
            );
            None
        }
    };
    match (body.remove("input"), body.remove("inputs")) {
        (Some(_), Some(_)) => at(
            c,
            &["inputs"],
            "give either `input` or `inputs`, not both".into(),
        ),
        (Some(Value::String(s)), None) => read.inputs.push(s),
        (Some(_), None) => at(
            c,
            &["input"],
            "must be the name of one stage (use `inputs` for several)".into(),
        ),
        (None, Some(Value::Array(items))) => {
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) => read.inputs.push(s),
                    _ => at(
                        c,
                        &["inputs", &i.to_string()],
                        "must be a stage name".into(),
                    ),
                }
            }
        }
        (None, Some(_)) => at(c, &["inputs"], "must be a list of stage names".into()),
        (None, None) => {}
    }
    let Some(type_name) = type_name else {
        return read;
    };
    read.type_name = type_name.clone();
    match StageConfig::from_type(&type_name, Value::Object(body)) {
        Ok(Some(config)) => {
            for problem in config.check() {
                let keys: Vec<&str> = problem.key.split('.').collect();
                at(c, &keys, problem.message);
            }
            read.config = Some(config);
        }
        Ok(None) => at(
            c,
            &["type"],
            format!(
                "unknown stage type `{type_name}` (expected one of {}){}",
                STAGE_TYPES.join(", "),
                suggest::closest(&type_name, STAGE_TYPES.iter().copied())
                    .map(|near| format!("; did you mean `{near}`?"))
                    .unwrap_or_default()
            ),
        ),
        Err(e) => {
            let keys: Vec<&str> = e.path.iter().map(String::as_str).collect();
            at(c, &keys, with_cluster_hint(e.message));
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "name: p\nsource: {stream: s, group: g}\nstages:\n  decode: {type: decode}\n  cache: {type: redis_hash, input: decode, key: \"k:{aggregateId}\"}\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn forty_thousand_unknown_keys_are_listed_then_counted() {
        // Before: one position lookup and one duplicate scan per key, O(n^2), 9 s at 40k.
        // Now both are O(1) per key; this test asserts the report, the comment the cost.
        let mut text = String::from(VALID);
        for i in 0..40_000 {
            text.push_str(&format!("junk{i}: 1\n"));
        }
        let errors = load_str(Path::new("p.yaml"), &text, &no_env).unwrap_err().0;
        assert_eq!(errors.len(), MAX_REPORTED_UNKNOWN_KEYS + 1);
        assert_eq!(errors[0].key, "junk0");
        assert_eq!(errors[0].pos, Pos { line: 6, col: 1 });
        assert_eq!(
            errors[0].message,
            "unknown key `junk0` (expected name, source, stages, bootstrap, schemas, tests)"
        );
        let last = &errors[MAX_REPORTED_UNKNOWN_KEYS];
        assert_eq!(last.pos.line, 6 + MAX_REPORTED_UNKNOWN_KEYS);
        assert_eq!(
            last.to_string(),
            format!(
                "p.yaml:{}:1: junk20: and 39980 more unknown top-level keys (expected name, source, stages, bootstrap, schemas, tests)",
                6 + MAX_REPORTED_UNKNOWN_KEYS
            )
        );
    }

    #[test]
    fn a_validate_stage_without_schemas_is_refused_at_its_type() {
        let text = "name: p\nsource: { stream: s, group: g }\nstages:\n  decode: { type: decode }\n  checked: { type: validate, input: decode }\n  cache: { type: redis_hash, input: checked, key: \"a:{aggregateId}\" }\n";
        let errors = load_str(Path::new("p.yaml"), text, &no_env).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "p.yaml:5:14: stages.checked.type: a validate stage needs the schema directory: add `schemas: ./schemas` at the top of the file\n1 error"
        );
    }

    #[test]
    fn a_few_unknown_keys_are_each_reported() {
        let text = format!("{VALID}extra: 1\n");
        let errors = load_str(Path::new("p.yaml"), &text, &no_env).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "p.yaml:6:1: extra: unknown key `extra` (expected name, source, stages, bootstrap, schemas, tests)\n1 error"
        );
    }

    #[test]
    fn an_alias_bomb_names_the_file_line_and_limit() {
        let bomb = yaml::tests::alias_bomb();
        let errors = load_str(Path::new("bomb.yaml"), &bomb, &no_env).unwrap_err();
        assert_eq!(
            errors.to_string(),
            format!(
                "bomb.yaml:5:7: anchors and aliases copy more than {} nodes (an alias bomb?)\n1 error",
                yaml::MAX_ALIAS_NODES
            )
        );
    }

    #[test]
    fn a_cluster_is_written_as_a_url() {
        let text = VALID.replace("group: g", "group: g, cluster: [\"a:7001\", \"b:7002\"]");
        let errors = load_str(Path::new("p.yaml"), &text, &no_env).unwrap_err().0;
        assert_eq!(errors[0].key, "source.cluster");
        assert!(
            errors[0].message.ends_with(
                "; a Redis Cluster is named by its URL, e.g. `redis: redis+cluster://host1:7001,host2:7002`"
            ),
            "{}",
            errors[0].message
        );
        let text = VALID.replace("group: g", "group: g, redis: \"redis://:pw@a:7001,b:7002\"");
        let errors = load_str(Path::new("p.yaml"), &text, &no_env).unwrap_err().0;
        assert_eq!(errors[0].key, "source.redis");
        assert_eq!(
            errors[0].message,
            "invalid Redis URL redis://:***@a:7001,b:7002: a redis:// URL names one server; for a Redis Cluster list its seed nodes as redis+cluster://:***@a:7001,b:7002"
        );
        let text = VALID.replace(
            "group: g",
            "group: g, redis: \"redis+cluster://a:7001,b:7002\"",
        );
        assert!(load_str(Path::new("p.yaml"), &text, &no_env).is_ok());
    }

    #[test]
    fn unset_variables_name_their_key() {
        let text = VALID.replace("group: g", "group: \"${NOPE_UNSET}\"");
        let errors = load_str(Path::new("p.yaml"), &text, &no_env).unwrap_err().0;
        assert_eq!(errors[0].key, "source.group");
        assert!(errors[0].message.contains("NOPE_UNSET is not set"));
    }
}
