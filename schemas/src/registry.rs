//! The schema registry: the payload schemas of each aggregate type by version, and each
//! stream's spec, built from files already read and parsed (from a directory, or from
//! `git show REF:path`), so that this module does no I/O.
//!
//! The layout, relative to the schema directory:
//!
//! ```text
//! <aggregateType>/v<N>.json      JSON Schema 2020-12 of the payload at schemaVersion N
//! streams/<stream name>.yaml     the stream's spec (see StreamSpec)
//! ```
//!
//! Every problem names its file and the JSON pointer inside it, so a loader can turn it into
//! a line and column.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::sync::Arc;

use jsonschema::Validator;
use serde_json::Value;

use crate::envelope::Envelope;

/// Most failed rules [`SchemaVersion::violations`] names; the rest are counted.
pub const MAX_REPORTED_VIOLATIONS: usize = 8;

/// The directory of stream files inside a schema directory.
pub const STREAMS_DIR: &str = "streams";

/// The compatibility mode a stream's schema changes must keep, as Confluent Schema Registry
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compatibility {
    /// A consumer of the new schema reads data of the previous one.
    Backward,
    /// A consumer of the new schema reads data of every earlier one.
    BackwardTransitive,
    /// A consumer of the previous schema reads data of the new one.
    Forward,
    /// Consumers of every earlier schema read data of the new one.
    ForwardTransitive,
    /// Both backward and forward with the previous schema.
    Full,
    /// Both backward and forward with every earlier schema.
    FullTransitive,
    /// No check.
    None,
}

impl Compatibility {
    /// Every mode, by its name.
    pub const ALL: [(&'static str, Compatibility); 7] = [
        ("BACKWARD", Compatibility::Backward),
        ("BACKWARD_TRANSITIVE", Compatibility::BackwardTransitive),
        ("FORWARD", Compatibility::Forward),
        ("FORWARD_TRANSITIVE", Compatibility::ForwardTransitive),
        ("FULL", Compatibility::Full),
        ("FULL_TRANSITIVE", Compatibility::FullTransitive),
        ("NONE", Compatibility::None),
    ];

    /// The upper-case name written in a stream file.
    pub fn name(self) -> &'static str {
        Compatibility::ALL
            .iter()
            .find(|(_, mode)| *mode == self)
            .map_or("NONE", |(name, _)| name)
    }
}

impl FromStr for Compatibility {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Compatibility::ALL
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, mode)| *mode)
            .ok_or_else(|| {
                let names: Vec<&str> = Compatibility::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown compatibility {name:?}, expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One stream file: what the stream's events are and how they are keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// The stream name (the logical name of a partitioned stream); equals the file name.
    pub stream: String,
    /// The aggregate type (subject) of its events.
    pub aggregate_type: String,
    /// The payload member path (dotted) whose value is the `aggregateId`.
    pub partition_key: String,
    /// Partition count; `None` for a stream that is not partitioned.
    pub partitions: Option<u32>,
    /// The compatibility mode of its schema changes.
    pub compatibility: Compatibility,
    /// The file, relative to the schema directory.
    pub path: String,
}

/// One schema version of a subject, compiled.
#[derive(Clone)]
pub struct SchemaVersion {
    /// The `schemaVersion` it describes.
    pub version: u32,
    /// The file, relative to the schema directory.
    pub path: String,
    /// The JSON Schema document.
    pub schema: Value,
    /// The compiled validator.
    pub validator: Arc<Validator>,
}

impl fmt::Debug for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaVersion")
            .field("version", &self.version)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SchemaVersion {
    /// `None` when `payload` fits the schema; otherwise every failed rule as `pointer:
    /// message` (`/countryCode: "gbr" does not match "^[A-Z]{2}$"`), joined by `; `, at most
    /// [`MAX_REPORTED_VIOLATIONS`] then a count. Asks only whether it is valid first: the
    /// errors are collected for an invalid payload alone.
    pub fn violations(&self, payload: &Value) -> Option<String> {
        if self.validator.is_valid(payload) {
            return None;
        }
        let mut reason = String::new();
        let mut count = 0usize;
        for error in self.validator.iter_errors(payload) {
            count += 1;
            if count > MAX_REPORTED_VIOLATIONS {
                continue;
            }
            if count > 1 {
                reason.push_str("; ");
            }
            let pointer = error.instance_path().as_str();
            let _ = write!(
                reason,
                "{}: {error}",
                if pointer.is_empty() { "/" } else { pointer }
            );
        }
        if count > MAX_REPORTED_VIOLATIONS {
            let _ = write!(reason, "; and {} more", count - MAX_REPORTED_VIOLATIONS);
        }
        Some(reason)
    }

    /// Whether the schema declares the dotted payload member `path` (following `properties`,
    /// `$ref` inside the file, `allOf`, `anyOf` and `oneOf`).
    pub fn declares(&self, path: &[&str]) -> bool {
        declares(&self.schema, &self.schema, path, 0)
    }
}

/// An aggregate type with its numbered schema versions (at least one).
#[derive(Debug, Clone)]
pub struct Subject {
    /// The aggregate type (its directory name).
    pub name: String,
    /// The highest version.
    latest: SchemaVersion,
    /// The other versions, by number.
    earlier: BTreeMap<u32, SchemaVersion>,
}

impl Subject {
    /// The subject of `versions`; `None` when there are none.
    fn new(name: String, mut versions: BTreeMap<u32, SchemaVersion>) -> Option<Self> {
        let (_, latest) = versions.pop_last()?;
        Some(Subject {
            name,
            latest,
            earlier: versions,
        })
    }

    /// The highest version.
    pub fn latest(&self) -> &SchemaVersion {
        &self.latest
    }

    /// The schema of `schemaVersion` `version`, if there is one.
    pub fn version(&self, version: u32) -> Option<&SchemaVersion> {
        if version == self.latest.version {
            Some(&self.latest)
        } else {
            self.earlier.get(&version)
        }
    }

    /// Every version, lowest first.
    pub fn versions(&self) -> impl Iterator<Item = &SchemaVersion> {
        self.earlier.values().chain(std::iter::once(&self.latest))
    }
}

/// A problem in one file of a schema directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// The file, relative to the schema directory.
    pub path: String,
    /// Where inside the file: the keys and indexes down to the faulty node (empty = the file).
    pub pointer: Vec<String>,
    /// What is wrong.
    pub message: String,
}

impl SchemaProblem {
    fn new(path: &str, pointer: &[&str], message: impl Into<String>) -> Self {
        SchemaProblem {
            path: path.to_string(),
            pointer: pointer.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "{}: {}", self.path, self.message)
        } else {
            write!(
                f,
                "{}: /{}: {}",
                self.path,
                self.pointer.join("/"),
                self.message
            )
        }
    }
}

/// What one file of a schema directory is, by its relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaFile {
    /// `<aggregateType>/v<N>.json`.
    Schema {
        /// The aggregate type.
        aggregate_type: String,
        /// N.
        version: u32,
    },
    /// `streams/<name>.yaml`.
    Stream {
        /// The name (file name without `.yaml`).
        stream: String,
    },
    /// A file at the top of the directory (a README): not part of the registry.
    Other,
}

impl SchemaFile {
    /// What the file at relative `path` (with `/` separators) is, or why it does not fit the
    /// layout.
    pub fn classify(path: &str) -> Result<SchemaFile, String> {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            [_] => Ok(SchemaFile::Other),
            [STREAMS_DIR, file] => match file.strip_suffix(".yaml") {
                Some(stream) if !stream.is_empty() => Ok(SchemaFile::Stream {
                    stream: stream.to_string(),
                }),
                _ => Err(format!(
                    "a stream file is {STREAMS_DIR}/<stream name>.yaml"
                )),
            },
            [aggregate_type, file] => file
                .strip_suffix(".json")
                .and_then(|v| v.strip_prefix('v'))
                .filter(|n| !n.starts_with('0'))
                .and_then(|n| n.parse::<u32>().ok())
                .map(|version| SchemaFile::Schema {
                    aggregate_type: aggregate_type.to_string(),
                    version,
                })
                .ok_or_else(|| {
                    "a schema file is <aggregateType>/v<N>.json (N from 1, no leading zero)".into()
                }),
            _ => Err("the schema directory holds <aggregateType>/v<N>.json and streams/<stream>.yaml, nothing deeper".into()),
        }
    }
}

/// The subjects and streams of a schema directory.
#[derive(Debug, Clone, Default)]
pub struct SchemaRegistry {
    subjects: BTreeMap<String, Subject>,
    streams: BTreeMap<String, StreamSpec>,
}

impl SchemaRegistry {
    /// Builds the registry from `(relative path, parsed content)` pairs: JSON Schema documents
    /// for `<aggregateType>/v<N>.json`, stream files (as JSON values) for
    /// `streams/<name>.yaml`. Returns what is valid and every problem found; a file with a
    /// problem is left out.
    pub fn from_files(
        files: impl IntoIterator<Item = (String, Value)>,
    ) -> (SchemaRegistry, Vec<SchemaProblem>) {
        let mut registry = SchemaRegistry::default();
        let mut problems = Vec::new();
        let mut stream_files = Vec::new();
        let mut versions: BTreeMap<String, BTreeMap<u32, SchemaVersion>> = BTreeMap::new();
        for (path, content) in files {
            match SchemaFile::classify(&path) {
                Ok(SchemaFile::Other) => {}
                Ok(SchemaFile::Stream { stream }) => stream_files.push((path, stream, content)),
                Ok(SchemaFile::Schema {
                    aggregate_type,
                    version,
                }) => match compile(&path, &content) {
                    Ok(validator) => {
                        versions.entry(aggregate_type).or_default().insert(
                            version,
                            SchemaVersion {
                                version,
                                path,
                                schema: content,
                                validator: Arc::new(validator),
                            },
                        );
                    }
                    Err(mut found) => problems.append(&mut found),
                },
                Err(message) => problems.push(SchemaProblem::new(&path, &[], message)),
            }
        }
        registry.subjects = versions
            .into_iter()
            .filter_map(|(name, versions)| Some((name.clone(), Subject::new(name, versions)?)))
            .collect();
        for subject in registry.subjects.values() {
            let mut expected = subject.versions().next().map_or(1, |v| v.version);
            for schema in subject.versions() {
                let version = schema.version;
                if version != expected {
                    problems.push(SchemaProblem::new(
                        &schema.path,
                        &[],
                        format!(
                            "versions of {} must be consecutive: v{expected} is missing",
                            subject.name
                        ),
                    ));
                }
                expected = version + 1;
            }
        }
        for (path, stream, content) in stream_files {
            match registry.stream_spec(&path, &stream, &content) {
                Ok(spec) => {
                    registry.streams.insert(stream, spec);
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        (registry, problems)
    }

    /// The subject of an aggregate type.
    pub fn subject(&self, aggregate_type: &str) -> Option<&Subject> {
        self.subjects.get(aggregate_type)
    }

    /// Every subject, by name.
    pub fn subjects(&self) -> impl Iterator<Item = &Subject> {
        self.subjects.values()
    }

    /// The spec of a stream (by its logical name).
    pub fn stream(&self, stream: &str) -> Option<&StreamSpec> {
        self.streams.get(stream)
    }

    /// Every stream spec, by name.
    pub fn streams(&self) -> impl Iterator<Item = &StreamSpec> {
        self.streams.values()
    }

    /// The schema of `(aggregate_type, version)`, if the registry has it.
    pub fn schema(&self, aggregate_type: &str, version: u32) -> Option<&SchemaVersion> {
        self.subject(aggregate_type)?.version(version)
    }

    /// Checks an event a producer is about to publish to `stream`: its payload fits the
    /// schema of its `(aggregateType, schemaVersion)` and its `aggregateId` is the payload's
    /// partition key. Tombstones (no payload, or `deleted: true`) pass.
    pub fn check_event(&self, stream: &str, event: &Envelope) -> Result<(), String> {
        let spec = self
            .stream(stream)
            .ok_or_else(|| format!("no stream file {STREAMS_DIR}/{stream}.yaml"))?;
        if event.is_tombstone() {
            return Ok(());
        }
        let Some(payload) = event.payload.as_ref().filter(|p| !p.is_null()) else {
            return Ok(());
        };
        let aggregate_type = event
            .aggregate_type
            .as_deref()
            .unwrap_or(&spec.aggregate_type);
        if aggregate_type != spec.aggregate_type {
            return Err(format!(
                "aggregateType {aggregate_type:?}, but {stream} carries {:?}",
                spec.aggregate_type
            ));
        }
        let version = event
            .schema_version
            .ok_or("no schemaVersion to validate the payload against")?;
        let schema = u32::try_from(version)
            .ok()
            .and_then(|v| self.schema(aggregate_type, v))
            .ok_or_else(|| {
                format!("no schema for aggregateType {aggregate_type:?} schemaVersion {version}")
            })?;
        if let Some(violations) = schema.violations(payload) {
            return Err(format!("schema {}: {violations}", schema.path));
        }
        let key = spec
            .partition_key
            .split('.')
            .try_fold(payload, |node, member| node.get(member));
        let matches = match key {
            Some(Value::String(s)) => *s == event.aggregate_id,
            Some(Value::Number(n)) => n.to_string() == event.aggregate_id,
            _ => false,
        };
        if !matches {
            return Err(format!(
                "aggregateId {:?} is not the partition key payload.{} ({})",
                event.aggregate_id,
                spec.partition_key,
                key.map_or_else(|| "absent".to_string(), Value::to_string)
            ));
        }
        Ok(())
    }

    fn stream_spec(
        &self,
        path: &str,
        stream: &str,
        content: &Value,
    ) -> Result<StreamSpec, Vec<SchemaProblem>> {
        let mut problems = Vec::new();
        let Some(object) = content.as_object() else {
            return Err(vec![SchemaProblem::new(
                path,
                &[],
                "a stream file is a mapping of stream, aggregate_type, partition_key, partitions, compatibility",
            )]);
        };
        let text = |key: &str, problems: &mut Vec<SchemaProblem>| match object.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => {
                problems.push(SchemaProblem::new(
                    path,
                    &[key],
                    "must be a non-empty string",
                ));
                None
            }
            None => {
                problems.push(SchemaProblem::new(
                    path,
                    &[],
                    format!("missing key `{key}`"),
                ));
                None
            }
        };
        for key in object.keys() {
            if !matches!(
                key.as_str(),
                "stream" | "aggregate_type" | "partition_key" | "partitions" | "compatibility"
            ) {
                problems.push(SchemaProblem::new(
                    path,
                    &[key],
                    format!(
                        "unknown key `{key}`, expected stream, aggregate_type, partition_key, partitions, compatibility"
                    ),
                ));
            }
        }
        let name = text("stream", &mut problems);
        let aggregate_type = text("aggregate_type", &mut problems);
        let partition_key = text("partition_key", &mut problems);
        let compatibility = text("compatibility", &mut problems).and_then(|name| {
            name.parse::<Compatibility>()
                .map_err(|message| {
                    problems.push(SchemaProblem::new(path, &["compatibility"], message))
                })
                .ok()
        });
        let partitions = match object.get("partitions") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n >= 1 => Some(n),
                _ => {
                    problems.push(SchemaProblem::new(
                        path,
                        &["partitions"],
                        format!("must be a whole number from 1, got {value}"),
                    ));
                    None
                }
            },
        };
        if let Some(name) = &name
            && name != stream
        {
            problems.push(SchemaProblem::new(
                path,
                &["stream"],
                format!("must equal the file name ({stream}), got {name}"),
            ));
        }
        if let Some(aggregate_type) = &aggregate_type {
            match self.subject(aggregate_type) {
                None => problems.push(SchemaProblem::new(
                    path,
                    &["aggregate_type"],
                    format!("no schema directory {aggregate_type}/ with a v<N>.json"),
                )),
                Some(subject) => {
                    if let Some(key) = &partition_key {
                        let members: Vec<&str> = key.split('.').collect();
                        if !subject.latest().declares(&members) {
                            problems.push(SchemaProblem::new(
                                path,
                                &["partition_key"],
                                format!(
                                    "{key} is not a property of the latest schema ({})",
                                    subject.latest().path
                                ),
                            ));
                        }
                    }
                }
            }
        }
        match (name, aggregate_type, partition_key, compatibility) {
            (Some(stream), Some(aggregate_type), Some(partition_key), Some(compatibility))
                if problems.is_empty() =>
            {
                Ok(StreamSpec {
                    stream,
                    aggregate_type,
                    partition_key,
                    partitions,
                    compatibility,
                    path: path.to_string(),
                })
            }
            _ => Err(problems),
        }
    }
}

/// The 2020-12 meta-schema URI a schema's `$schema` may name.
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// Checks a schema document against the 2020-12 meta-schema and compiles it (which also
/// finds bad patterns and `$ref`s that do not resolve inside the file).
fn compile(path: &str, schema: &Value) -> Result<Validator, Vec<SchemaProblem>> {
    let mut problems = Vec::new();
    if !schema.is_object() {
        problems.push(SchemaProblem::new(
            path,
            &[],
            "a payload schema is a JSON object",
        ));
        return Err(problems);
    }
    match schema.get("$schema") {
        None => {}
        Some(Value::String(uri)) if uri.trim_end_matches('#') == DRAFT_2020_12 => {}
        Some(other) => problems.push(SchemaProblem::new(
            path,
            &["$schema"],
            format!("must be {DRAFT_2020_12:?} (JSON Schema 2020-12), got {other}"),
        )),
    }
    let meta = jsonschema::draft202012::meta::validator();
    for error in meta.iter_errors(schema).take(MAX_PROBLEMS_PER_FILE) {
        let pointer: Vec<String> = error
            .instance_path()
            .as_str()
            .split('/')
            .skip(1)
            .map(unescape_pointer)
            .collect();
        problems.push(SchemaProblem {
            path: path.to_string(),
            pointer,
            message: format!("not a valid JSON Schema 2020-12: {error}"),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    jsonschema::draft202012::options()
        .build(schema)
        .map_err(|error| vec![SchemaProblem::new(path, &[], error.to_string())])
}

/// Most meta-schema errors reported per file.
const MAX_PROBLEMS_PER_FILE: usize = 20;

/// Deepest `$ref` / combinator nesting followed when looking for a property (refs may cycle).
const MAX_LOOKUP_DEPTH: usize = 32;

fn unescape_pointer(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Whether `node` (inside `root`) declares the member `path`.
fn declares(root: &Value, node: &Value, path: &[&str], depth: usize) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return true;
    };
    if depth > MAX_LOOKUP_DEPTH {
        return false;
    }
    if let Some(property) = node.get("properties").and_then(|p| p.get(*first))
        && declares(root, property, rest, depth + 1)
    {
        return true;
    }
    if let Some(target) = node
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|pointer| root.pointer(pointer))
        && declares(root, target, path, depth + 1)
    {
        return true;
    }
    ["allOf", "anyOf", "oneOf"].iter().any(|combinator| {
        node.get(*combinator)
            .and_then(Value::as_array)
            .is_some_and(|branches| {
                branches
                    .iter()
                    .any(|branch| declares(root, branch, path, depth + 1))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn athlete_v1() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": {"type": "string"},
                "address": {"$ref": "#/$defs/address"},
            },
            "allOf": [{"properties": {"points": {"type": "integer"}}}],
            "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}}}}
        })
    }

    fn stream_file() -> Value {
        json!({
            "stream": "athletes.v1",
            "aggregate_type": "athlete",
            "partition_key": "id",
            "partitions": 8,
            "compatibility": "BACKWARD_TRANSITIVE",
        })
    }

    #[test]
    fn builds_subjects_and_streams_from_files() {
        let (registry, problems) = SchemaRegistry::from_files([
            ("athlete/v1.json".to_string(), athlete_v1()),
            ("athlete/v2.json".to_string(), athlete_v1()),
            ("streams/athletes.v1.yaml".to_string(), stream_file()),
            ("README.md".to_string(), Value::Null),
        ]);
        assert_eq!(problems, vec![]);
        let subject = registry.subject("athlete").unwrap();
        assert_eq!(subject.latest().version, 2);
        assert_eq!(subject.latest().path, "athlete/v2.json");
        assert!(registry.schema("athlete", 1).is_some());
        assert!(registry.schema("athlete", 3).is_none());
        let spec = registry.stream("athletes.v1").unwrap();
        assert_eq!(spec.partitions, Some(8));
        assert_eq!(spec.partition_key, "id");
        assert_eq!(spec.compatibility, Compatibility::BackwardTransitive);
    }

    #[test]
    fn compatibility_names_round_trip_and_unknown_names_are_refused() {
        for (name, mode) in Compatibility::ALL {
            assert_eq!(name.parse::<Compatibility>(), Ok(mode));
            assert_eq!(mode.to_string(), name);
        }
        let error = "backward".parse::<Compatibility>().unwrap_err();
        assert!(error.contains("BACKWARD_TRANSITIVE"), "{error}");
    }

    #[test]
    fn finds_properties_through_refs_and_combinators() {
        let schema = athlete_v1();
        assert!(declares(&schema, &schema, &["id"], 0));
        assert!(declares(&schema, &schema, &["address", "city"], 0));
        assert!(declares(&schema, &schema, &["points"], 0));
        assert!(!declares(&schema, &schema, &["address", "zip"], 0));
        assert!(!declares(&schema, &schema, &["name"], 0));
        let cycle = json!({"$ref": "#"});
        assert!(!declares(&cycle, &cycle, &["a"], 0));
    }

    #[test]
    fn reports_invalid_schemas_with_their_pointer() {
        let (registry, problems) = SchemaRegistry::from_files([
            (
                "athlete/v1.json".to_string(),
                json!({"type": "object", "properties": {"id": {"type": "strin"}}}),
            ),
            (
                "team/v1.json".to_string(),
                json!({"properties": {"id": {"pattern": "(["}}}),
            ),
            ("team/v01.json".to_string(), json!({})),
            ("team/x/v1.json".to_string(), json!({})),
        ]);
        assert!(registry.subject("athlete").is_none());
        assert_eq!(problems[0].path, "athlete/v1.json");
        assert_eq!(problems[0].pointer, ["properties", "id", "type"]);
        assert!(
            problems[0]
                .message
                .starts_with("not a valid JSON Schema 2020-12"),
            "{problems:?}"
        );
        assert_eq!(problems[1].path, "team/v1.json");
        assert!(problems[2].message.contains("v<N>.json"), "{problems:?}");
        assert!(
            problems[3].message.contains("nothing deeper"),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn reports_gaps_and_bad_stream_files() {
        let mut bad = stream_file();
        bad["stream"] = json!("other");
        bad["partition_key"] = json!("athleteId");
        bad["compatibility"] = json!("SOMETIMES");
        bad["partitions"] = json!(0);
        bad["extra"] = json!(1);
        let (registry, problems) = SchemaRegistry::from_files([
            ("athlete/v1.json".to_string(), athlete_v1()),
            ("athlete/v3.json".to_string(), athlete_v1()),
            ("streams/athletes.v1.yaml".to_string(), bad),
            (
                "streams/teams.v1.yaml".to_string(),
                json!({"stream": "teams.v1", "aggregate_type": "team", "partition_key": "id", "compatibility": "NONE"}),
            ),
        ]);
        assert!(registry.stream("athletes.v1").is_none());
        let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "athlete/v3.json: versions of athlete must be consecutive: v2 is missing",
                "streams/athletes.v1.yaml: /extra: unknown key `extra`, expected stream, aggregate_type, partition_key, partitions, compatibility",
                "streams/athletes.v1.yaml: /compatibility: unknown compatibility \"SOMETIMES\", expected one of BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE, NONE",
                "streams/athletes.v1.yaml: /partitions: must be a whole number from 1, got 0",
                "streams/athletes.v1.yaml: /stream: must equal the file name (athletes.v1), got other",
                "streams/athletes.v1.yaml: /partition_key: athleteId is not a property of the latest schema (athlete/v3.json)",
                "streams/teams.v1.yaml: /aggregate_type: no schema directory team/ with a v<N>.json",
            ]
        );
    }

    #[test]
    fn producers_check_payload_and_partition_key() {
        let (registry, problems) = SchemaRegistry::from_files([
            (
                "athlete/v1.json".to_string(),
                json!({"required": ["id"], "properties": {"id": {"type": "string"}, "points": {"type": "integer"}}}),
            ),
            (
                "streams/athletes.v1.yaml".to_string(),
                json!({"stream": "athletes.v1", "aggregate_type": "athlete", "partition_key": "id", "compatibility": "NONE"}),
            ),
        ]);
        assert_eq!(problems, vec![]);
        let event = |id: &str, version: i64, payload: Value| {
            crate::EnvelopeKeys::default()
                .read(
                    &json!({"aggregateType": "athlete", "schemaVersion": version,
                              "aggregateId": id, "aggregateVersion": 1, "payload": payload}),
                )
                .unwrap()
        };
        let check = |e: &Envelope| registry.check_event("athletes.v1", e);
        assert_eq!(check(&event("a", 1, json!({"id": "a"}))), Ok(()));
        assert_eq!(check(&event("a", 1, Value::Null)), Ok(()));
        assert_eq!(
            check(&event("a", 1, json!({"id": "a", "points": "x"}))),
            Err(r#"schema athlete/v1.json: /points: "x" is not of type "integer""#.into())
        );
        assert_eq!(
            check(&event("b", 1, json!({"id": "a"}))),
            Err(r#"aggregateId "b" is not the partition key payload.id ("a")"#.into())
        );
        assert_eq!(
            check(&event("a", 2, json!({"id": "a"}))),
            Err(r#"no schema for aggregateType "athlete" schemaVersion 2"#.into())
        );
        assert_eq!(
            registry.check_event("teams.v1", &event("a", 1, json!({}))),
            Err("no stream file streams/teams.v1.yaml".into())
        );
    }

    #[test]
    fn validators_report_the_pointer_and_keyword() {
        let (registry, _) = SchemaRegistry::from_files([(
            "athlete/v1.json".to_string(),
            json!({"properties": {"countryCode": {"type": "string", "pattern": "^[A-Z]{2}$"}}}),
        )]);
        let validator = &registry.schema("athlete", 1).unwrap().validator;
        let payload = json!({"countryCode": "gbr"});
        let error = validator.iter_errors(&payload).next().unwrap();
        assert_eq!(error.instance_path().as_str(), "/countryCode");
        assert_eq!(error.to_string(), r#""gbr" does not match "^[A-Z]{2}$""#);
    }
}
