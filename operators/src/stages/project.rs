//! `project`: builds the replica record from envelope paths and filters events with CEL.

use std::collections::BTreeMap;
use std::sync::Arc;

use cel::{Context, Program, Value as CelValue};
use ecst_schemas::{Envelope, EnvelopePath, PayloadSelection};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::dead_letter::DeadLetterReason;
use crate::record::{
    Action, DEFAULT_TOMBSTONE_KEEP_FOR, DropReason, FieldNames, Fields, Outcomes, RawEntry, Record,
};
use crate::stage::{
    BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, PayloadPath, Stage,
};

/// Where one output field comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldSource {
    /// An envelope path: `aggregateId`, `occurredAt`, `payload.address.city`.
    Path(String),
    /// A path with a value used when the path is absent or null.
    WithDefault(FieldWithDefault),
}

/// A path with a default value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldWithDefault {
    /// Envelope path.
    pub path: String,
    /// Value when the path is absent or null.
    pub default: Value,
}

/// Configuration of the `project` stage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Output field name to source path.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSource>,
    /// Payload fields copied as they are (`["*"]` for all).
    #[serde(default)]
    pub include: Vec<String>,
    /// Payload fields never copied by `include`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// A CEL expression over the envelope (`payload.status != "retired"`); events for which it
    /// is false are acked and never written. Deletes always pass.
    #[serde(default, rename = "where")]
    pub where_: Option<String>,
    /// What an event that fails `where` does: `drop` (default: acked, never written) or
    /// `delete` (removes the aggregate from this branch's replica, for views such as "active
    /// athletes only" that entries must leave when they stop matching).
    #[serde(default)]
    pub unmatched: Unmatched,
}

/// What happens to an event for which `where` is false.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Acked, never written.
    #[default]
    Drop,
    /// Written as a delete of the aggregate at the event's version.
    Delete,
}

const ENVELOPE_ROOTS: &[&str] = &[
    "aggregateId",
    "aggregateVersion",
    "aggregateType",
    "eventId",
    "eventType",
    "schemaVersion",
    "occurredAt",
    "deleted",
    "baseVersion",
    "payload",
];

fn check_path(path: &str) -> Option<String> {
    let root = path.split('.').next().unwrap_or_default();
    if ENVELOPE_ROOTS.contains(&root) && !path.split('.').any(str::is_empty) {
        None
    } else {
        Some(format!(
            "path {path:?} must start with one of {} (e.g. payload.displayName)",
            ENVELOPE_ROOTS.join(", ")
        ))
    }
}

/// The member chains a CEL expression selects from `payload` (`payload.address.city` gives
/// `[address, city]`), read from its tokens: string literals are skipped, and a chain stops at
/// the first index or call.
fn payload_selections(expr: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            // A string literal (triple-quoted ones end at the same quote, which this finds
            // after skipping escapes).
            let triple = chars.get(i + 1) == Some(&c) && chars.get(i + 2) == Some(&c);
            i += if triple { 3 } else { 1 };
            while i < chars.len() {
                if chars[i] == '\\' {
                    i += 2;
                } else if chars[i] == c
                    && (!triple || (chars.get(i + 1) == Some(&c) && chars.get(i + 2) == Some(&c)))
                {
                    i += if triple { 3 } else { 1 };
                    break;
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let selected = start > 0 && chars[start - 1] == '.';
            if word == "payload" && !selected {
                let mut members = Vec::new();
                while i < chars.len() && chars[i] == '.' {
                    let from = i + 1;
                    let mut end = from;
                    while end < chars.len() && (chars[end].is_alphanumeric() || chars[end] == '_') {
                        end += 1;
                    }
                    if end == from {
                        break;
                    }
                    members.push(chars[from..end].iter().collect());
                    i = end;
                }
                // `payload.tags.exists(...)`: the last name is a method, not a member.
                if chars.get(i) == Some(&'(') {
                    members.pop();
                }
                if !members.is_empty() {
                    found.push(members);
                }
            }
            continue;
        }
        i += 1;
    }
    found
}

impl ProjectConfig {
    pub(crate) fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        for (name, source) in &self.fields {
            let path = match source {
                FieldSource::Path(p) => p,
                FieldSource::WithDefault(f) => &f.path,
            };
            if let Some(message) = check_path(path) {
                problems.push(ConfigProblem::new(format!("fields.{name}"), message));
            }
        }
        if let Some(expr) = &self.where_
            && let Err(e) = Program::compile(expr)
        {
            problems.push(ConfigProblem::new(
                "where",
                format!("invalid CEL expression: {e}"),
            ));
        }
        if self.fields.is_empty() && self.include.is_empty() {
            problems.push(ConfigProblem::new(
                "fields",
                "a project stage needs `fields` or `include` (use include: [\"*\"] to copy the payload)",
            ));
        }
        problems
    }

    /// Builds the stage.
    pub fn build(&self) -> Result<Project, String> {
        let program = match &self.where_ {
            Some(expr) => {
                Some(Arc::new(Program::compile(expr).map_err(|e| {
                    format!("invalid CEL expression in `where`: {e}")
                })?))
            }
            None => None,
        };
        let sources = self
            .fields
            .iter()
            .map(|(name, source)| {
                let (path, default) = match source {
                    FieldSource::Path(path) => (path, None),
                    FieldSource::WithDefault(f) => (&f.path, Some(f.default.clone())),
                };
                let path = EnvelopePath::parse(path).ok_or_else(|| {
                    format!("fields.{name}: {}", check_path(path).unwrap_or_default())
                })?;
                Ok(FieldPath { path, default })
            })
            .collect::<Result<_, String>>()?;
        Ok(Project {
            config: self.clone(),
            include_all: self.include.iter().any(|f| f == "*"),
            names: self.fields.keys().cloned().collect(),
            sources,
            program,
        })
    }
}

/// The running `project` stage.
#[derive(Debug)]
pub struct Project {
    config: ProjectConfig,
    include_all: bool,
    /// The output names of `fields`, shared by every record: without `include` they are the
    /// whole field set, which sinks can then name once per batch.
    names: FieldNames,
    /// Where each of `names` comes from, parsed once.
    sources: Vec<FieldPath>,
    program: Option<Arc<Program>>,
}

/// One `fields` entry, parsed: its envelope path and the value used when that is absent.
#[derive(Debug)]
struct FieldPath {
    path: EnvelopePath,
    default: Option<Value>,
}

impl Project {
    /// Evaluates `where:`; `Err` is an expression that failed on this event.
    fn matches(&self, event: &Envelope) -> Result<bool, String> {
        let Some(program) = &self.program else {
            return Ok(true);
        };
        let mut context = Context::default();
        if let Value::Object(map) = event.to_value() {
            for (name, value) in map {
                context
                    .add_variable(name, value)
                    .map_err(|e| format!("cannot expose event to CEL: {e}"))?;
            }
        }
        match program.execute(&context) {
            Ok(CelValue::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("`where` returned {other:?}, not a boolean")),
            Err(e) => Err(format!("`where` failed: {e}")),
        }
    }

    /// The value of one `fields` entry for `event`, null included; `None` when the path is
    /// absent and there is no default.
    fn field_value(source: &FieldPath, event: &Envelope) -> Option<Value> {
        match &source.default {
            None => event.get(&source.path),
            Some(default) => event
                .get(&source.path)
                .filter(|v| !v.is_null())
                .or_else(|| Some(default.clone())),
        }
    }

    /// The value of one `fields` entry for a patch: `None` (untouched) when the path is
    /// absent, whatever the default; a null (removed) takes the default if there is one.
    fn patch_value(source: &FieldPath, event: &Envelope) -> Option<Value> {
        match (event.get(&source.path)?, &source.default) {
            (Value::Null, Some(default)) => Some(default.clone()),
            (value, _) => Some(value),
        }
    }

    /// The record's fields; for a `patch` a null (a removed field) is kept as null, apart
    /// from an absent one (untouched), which a full state does not tell apart.
    fn project(&self, event: &Envelope, patch: bool) -> Fields {
        if self.config.include.is_empty() {
            let values = self
                .sources
                .iter()
                .map(|source| {
                    if patch {
                        Self::patch_value(source, event)
                    } else {
                        Self::field_value(source, event).filter(|v| !v.is_null())
                    }
                })
                .collect();
            return Fields::Fixed {
                names: self.names.clone(),
                values,
            };
        }
        let mut fields = Map::new();
        if let Some(Value::Object(payload)) = &event.payload {
            for (name, value) in payload {
                let included = self.include_all || self.config.include.iter().any(|f| f == name);
                if included && !self.config.exclude.iter().any(|f| f == name) {
                    fields.insert(name.clone(), value.clone());
                }
            }
        }
        // A null from `fields` stays in the map (sinks skip it), hiding an included member
        // of the same name.
        for (name, source) in self.names.iter().zip(&self.sources) {
            let value = if patch {
                Self::patch_value(source, event)
            } else {
                Self::field_value(source, event)
            };
            if let Some(value) = value {
                fields.insert(name.clone(), value);
            }
        }
        Fields::Map(fields)
    }
}

impl Stage for Project {
    fn process(
        &mut self,
        input: Vec<Record>,
        _entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut kept = Vec::with_capacity(input.len());
        for mut record in input {
            if record.event.is_tombstone() {
                record.fields = Some(Fields::none());
                kept.push(record);
                continue;
            }
            match self.matches(&record.event) {
                Ok(true) => {
                    let patch = matches!(record.action, Action::Patch { .. });
                    record.fields = Some(self.project(&record.event, patch));
                    kept.push(record);
                }
                Ok(false) if self.config.unmatched == Unmatched::Delete => {
                    record.fields = Some(Fields::none());
                    record.action = Action::Delete {
                        keep_for: DEFAULT_TOMBSTONE_KEEP_FOR,
                    };
                    kept.push(record);
                }
                Ok(false) => out.drop_entry(record.entry, DropReason::Filtered),
                Err(message) => {
                    out.dead_letter(record.entry, DeadLetterReason::StageRejected { message })
                }
            }
        }
        kept
    }
}

impl ComponentConfig for ProjectConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::optional(
            "fields",
            "map of field to envelope path (or { path, default })",
            "{}",
            "the replica's fields and where each comes from",
        ),
        KeyDoc::optional(
            "include",
            "list of payload members",
            "[]",
            "payload members copied as they are (`[\"*\"]`: all)",
        ),
        KeyDoc::optional(
            "exclude",
            "list of payload members",
            "[]",
            "payload members `include` never copies",
        ),
        KeyDoc::optional(
            "where",
            "CEL expression",
            "none",
            "events for which it is false are not written",
        ),
        KeyDoc::optional(
            "unmatched",
            "drop | delete",
            "drop",
            "what an event failing `where` does to the replica",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        self.check()
    }

    fn payload_reads(&self, _projected: bool) -> PayloadSelection {
        // `include` copies members by name and `where` sees the whole event.
        if !self.include.is_empty() || self.where_.is_some() {
            return PayloadSelection::All;
        }
        crate::stage::payload_reads_of(self.fields.values().map(|source| match source {
            FieldSource::Path(path) => path.as_str(),
            FieldSource::WithDefault(f) => f.path.as_str(),
        }))
    }

    fn payload_paths(&self, _projected: bool) -> Vec<PayloadPath> {
        let mut paths: Vec<PayloadPath> = self
            .fields
            .iter()
            .filter_map(|(name, source)| {
                let path = match source {
                    FieldSource::Path(path) => path,
                    FieldSource::WithDefault(f) => &f.path,
                };
                PayloadPath::of(format!("fields.{name}"), path)
            })
            .collect();
        paths.extend(
            self.include
                .iter()
                .enumerate()
                .filter(|(_, member)| *member != "*")
                .map(|(i, member)| PayloadPath {
                    key: format!("include.{i}"),
                    members: vec![member.clone()],
                }),
        );
        if let Some(expr) = &self.where_ {
            paths.extend(
                payload_selections(expr)
                    .into_iter()
                    .map(|members| PayloadPath {
                        key: "where".into(),
                        members,
                    }),
            );
        }
        paths
    }

    async fn build_component(&self, _ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::Stage(Box::new(self.build()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::EnvelopeKeys;
    use serde_json::json;

    fn record(entry: usize, body: Value) -> Record {
        Record::new(entry, EnvelopeKeys::default().read(&body).unwrap())
    }

    fn config(value: Value) -> ProjectConfig {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn names_the_payload_paths_it_reads_with_their_keys() {
        let stage = config(json!({
            "fields": {"name": "payload.displayName", "city": {"path": "payload.address.city", "default": ""},
                       "id": "aggregateId"},
            "include": ["status", "*"],
            "where": "payload.status == 'payload.nope' && payload.tags.exists(t, t == \"x\") && has(payload.tier)",
        }));
        let paths: Vec<(String, String)> = stage
            .payload_paths(false)
            .into_iter()
            .map(|p| (p.key, p.members.join(".")))
            .collect();
        let expected: Vec<(String, String)> = [
            ("fields.city", "address.city"),
            ("fields.name", "displayName"),
            ("include.0", "status"),
            ("where", "status"),
            ("where", "tags"),
            ("where", "tier"),
        ]
        .iter()
        .map(|(k, p)| (k.to_string(), p.to_string()))
        .collect();
        assert_eq!(paths, expected);
    }

    #[test]
    fn maps_paths_defaults_and_includes() {
        let stage = config(json!({
            "fields": {"display_name": "payload.displayName", "city": "payload.address.city",
                       "id": "aggregateId", "tier": {"path": "payload.tier", "default": "basic"}},
            "include": ["status", "missing"], "exclude": ["secret"]
        }));
        let mut project = stage.build().unwrap();
        let mut out = Outcomes::default();
        let kept = project.process(vec![record(0, json!({"aggregateId": "a", "aggregateVersion": 1,
            "payload": {"displayName": "Ada", "status": "active", "secret": "x", "address": {"city": "London"}}}))], &[], &mut out);
        assert_eq!(
            kept[0].fields.as_ref().unwrap(),
            &Fields::Map(
                json!({"status": "active", "city": "London",
                "display_name": "Ada", "id": "a", "tier": "basic"})
                .as_object()
                .unwrap()
                .clone()
            )
        );
    }

    #[test]
    fn without_include_the_fields_are_a_fixed_set_and_a_null_from_fields_hides_an_include() {
        let fixed = config(
            json!({"fields": {"b": "payload.b", "a": {"path": "payload.a", "default": 1}, "n": "payload.n"}}),
        );
        let mut project = fixed.build().unwrap();
        let mut out = Outcomes::default();
        let body =
            json!({"aggregateId": "a", "aggregateVersion": 1, "payload": {"b": "x", "n": null}});
        let kept = project.process(
            vec![record(0, body.clone()), record(1, body.clone())],
            &[],
            &mut out,
        );
        let (Some(Fields::Fixed { names, values }), Some(Fields::Fixed { names: other, .. })) =
            (&kept[0].fields, &kept[1].fields)
        else {
            panic!("{kept:?}");
        };
        assert!(Arc::ptr_eq(names, other), "one shared name list");
        assert_eq!(names.as_ref(), ["a", "b", "n"]);
        assert_eq!(values, &vec![Some(json!(1)), Some(json!("x")), None]);
        let include = config(json!({"include": ["*"], "fields": {"status": "payload.newStatus"}}));
        let kept = include.build().unwrap().process(
            vec![record(
                0,
                json!({"aggregateId": "a", "aggregateVersion": 1,
                "payload": {"status": "active", "newStatus": null}}),
            )],
            &[],
            &mut out,
        );
        let fields = kept[0].fields.as_ref().unwrap();
        assert_eq!(
            fields.get("status"),
            None,
            "the null from `fields` wins over the included member"
        );
    }

    #[test]
    fn a_patch_keeps_removed_fields_apart_from_untouched_ones() {
        let body = json!({"aggregateId": "a", "aggregateVersion": 2, "baseVersion": 1,
            "payload": {"b": "x", "n": null}});
        let patch = |body: Value| {
            let mut r = record(0, body);
            r.action = Action::Patch { base: 1 };
            r
        };
        let fixed = config(
            json!({"fields": {"b": "payload.b", "a": {"path": "payload.a", "default": 1}, "n": "payload.n", "id": "aggregateId"}}),
        );
        let mut out = Outcomes::default();
        let kept = fixed.build().unwrap().process(
            vec![patch(body.clone()), record(1, body.clone())],
            &[],
            &mut out,
        );
        let Some(Fields::Fixed { values, .. }) = &kept[0].fields else {
            panic!("{kept:?}");
        };
        // a absent (untouched, no default), b changed, n removed; the upsert drops the null.
        assert_eq!(
            values,
            &vec![None, Some(json!("x")), Some(json!("a")), Some(Value::Null)]
        );
        assert_eq!(
            kept[0].fields.as_ref().unwrap().nulls().collect::<Vec<_>>(),
            ["n"]
        );
        assert_eq!(kept[0].removed_fields(), ["n"]);
        let Some(Fields::Fixed { values, .. }) = &kept[1].fields else {
            panic!("{kept:?}");
        };
        assert_eq!(
            values,
            &vec![Some(json!(1)), Some(json!("x")), Some(json!("a")), None]
        );
        let include = config(
            json!({"include": ["*"], "fields": {"tier": {"path": "payload.tier", "default": "basic"}}}),
        );
        let kept = include
            .build()
            .unwrap()
            .process(vec![patch(body)], &[], &mut out);
        let fields = kept[0].fields.as_ref().unwrap();
        assert_eq!(
            fields,
            &Fields::Map(json!({"b": "x", "n": null}).as_object().unwrap().clone())
        );
        assert_eq!(kept[0].removed_fields(), ["n"]);
    }

    #[test]
    fn where_filters_upserts_passes_deletes_and_dead_letters_errors() {
        let stage = config(json!({"include": ["*"], "where": "payload.status != \"retired\""}));
        let mut project = stage.build().unwrap();
        let mut out = Outcomes::default();
        let kept = project.process(vec![
            record(0, json!({"aggregateId": "a", "aggregateVersion": 1, "payload": {"status": "active"}})),
            record(1, json!({"aggregateId": "b", "aggregateVersion": 1, "payload": {"status": "retired"}})),
            record(2, json!({"aggregateId": "c", "aggregateVersion": 1, "payload": null})),
            record(3, json!({"aggregateId": "d", "aggregateVersion": 1, "payload": {"other": 1}})),
        ], &[], &mut out);
        assert_eq!(kept.iter().map(|r| r.entry).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(out.dropped, vec![(1, DropReason::Filtered)]);
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].0, 3);
    }

    #[test]
    fn unmatched_delete_turns_a_non_matching_update_into_a_delete() {
        let stage = config(
            json!({"include": ["*"], "where": "payload.status == \"active\"", "unmatched": "delete"}),
        );
        let mut out = Outcomes::default();
        let kept = stage.build().unwrap().process(
            vec![record(0, json!({"aggregateId": "a", "aggregateVersion": 4, "payload": {"status": "retired"}}))],
            &[],
            &mut out,
        );
        assert!(matches!(kept[0].action, Action::Delete { .. }));
        assert!(out.dropped.is_empty());
    }

    #[test]
    fn check_reports_bad_paths_and_expressions() {
        let problems =
            config(json!({"fields": {"x": "payloads.name"}, "where": "payload.status ==="}))
                .check();
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].key, "fields.x");
        assert_eq!(problems[1].key, "where");
        assert!(problems[1].message.starts_with("invalid CEL expression"));
    }
}
