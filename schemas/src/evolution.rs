//! What changed between two schema registries (the base and the proposed one) and which of
//! those changes are refused: a new version that breaks its subject's compatibility mode, a
//! stream that keeps its name but changes its partitioning, a version edited in place or
//! removed, a version number that skips.
//!
//! A subject (an aggregate type) takes the mode of the stream files naming it. Partitioning is
//! part of a stream's contract: consumers key replicas and leases by it, so a change to
//! `partition_key`, `aggregate_type` or `partitions` needs a new stream name (`...v2`) that
//! consumers move to on purpose.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::compat::{self, Direction};
use crate::registry::{Compatibility, SchemaRegistry, StreamSpec};

/// A rule of the check that is not a schema difference (those carry Confluent's names).
pub mod rule {
    /// A stream file kept its name but changed `partition_key`.
    pub const PARTITION_KEY_CHANGED: &str = "STREAM_PARTITION_KEY_CHANGED";
    /// A stream file kept its name but changed `aggregate_type`.
    pub const AGGREGATE_TYPE_CHANGED: &str = "STREAM_AGGREGATE_TYPE_CHANGED";
    /// A stream file kept its name but changed `partitions`.
    pub const PARTITIONS_CHANGED: &str = "STREAM_PARTITIONS_CHANGED";
    /// An existing version file's schema changed.
    pub const VERSION_EDITED_IN_PLACE: &str = "VERSION_EDITED_IN_PLACE";
    /// An existing version file was removed.
    pub const VERSION_REMOVED: &str = "VERSION_REMOVED";
    /// A version number skips one.
    pub const VERSION_SKIPPED: &str = "VERSION_SKIPPED";
}

/// One refused change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file, relative to the schema directory.
    pub file: String,
    /// Whether `file` is in the base (a removed file) rather than in the proposed directory.
    pub in_base: bool,
    /// The subject (aggregate type) or stream it concerns.
    pub subject: String,
    /// The JSON pointer inside the file (`""` = the whole file).
    pub pointer: String,
    /// The rule broken (`TYPE_CHANGED`, `STREAM_PARTITION_KEY_CHANGED`...).
    pub rule: String,
    /// What happened and what to do instead.
    pub message: String,
}

/// The outcome of comparing a base registry with a proposed one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvolutionReport {
    /// Every refused change.
    pub findings: Vec<Finding>,
    /// What the check decided on the way (the mode it used where streams disagree...).
    pub notes: Vec<String>,
    /// New schema versions checked against their mode.
    pub versions_checked: usize,
    /// Stream files present in both that were compared.
    pub streams_checked: usize,
}

impl EvolutionReport {
    /// Whether any change is refused.
    pub fn incompatible(&self) -> bool {
        !self.findings.is_empty()
    }
}

/// The mode of each subject: the strictest of the streams naming it; with a note where they
/// disagree or none names it (then Confluent's default, BACKWARD).
pub fn subject_modes(
    registry: &SchemaRegistry,
    notes: &mut Vec<String>,
) -> BTreeMap<String, Compatibility> {
    let mut declared: BTreeMap<&str, Vec<&StreamSpec>> = BTreeMap::new();
    for stream in registry.streams() {
        declared
            .entry(stream.aggregate_type.as_str())
            .or_default()
            .push(stream);
    }
    let mut modes = BTreeMap::new();
    for subject in registry.subjects() {
        let streams = declared
            .get(subject.name.as_str())
            .map_or(&[][..], Vec::as_slice);
        let mode = match streams {
            [] => {
                notes.push(format!(
                    "no stream file names subject {}: checking it as BACKWARD (the default)",
                    subject.name
                ));
                Compatibility::Backward
            }
            [first, rest @ ..] => {
                let mode = rest.iter().fold(first.compatibility, |mode, s| {
                    mode.strictest(s.compatibility)
                });
                if rest.iter().any(|s| s.compatibility != first.compatibility) {
                    let each: Vec<String> = streams
                        .iter()
                        .map(|s| format!("{} {}", s.stream, s.compatibility))
                        .collect();
                    notes.push(format!(
                        "streams of subject {} declare different modes ({}): checking the strictest, {mode}",
                        subject.name,
                        each.join(", ")
                    ));
                }
                mode
            }
        };
        modes.insert(subject.name.clone(), mode);
    }
    modes
}

/// Compares the `base` registry with the `proposed` one.
pub fn compare(base: &SchemaRegistry, proposed: &SchemaRegistry) -> EvolutionReport {
    let mut report = EvolutionReport::default();
    let mut modes = subject_modes(proposed, &mut report.notes);
    // A change that loosens a subject's mode and adds a version the old mode refuses would
    // pass on the new mode alone: new versions answer to the stricter of the two, so the
    // mode changes first, in a change of its own.
    let base_modes = subject_modes(base, &mut Vec::new());
    for (subject, mode) in &mut modes {
        let declared_in_base = base.streams().any(|s| &s.aggregate_type == subject);
        let Some(&was) = base_modes.get(subject).filter(|_| declared_in_base) else {
            continue;
        };
        let stricter = was.strictest(*mode);
        if stricter != *mode {
            report.notes.push(format!(
                "{subject}: compatibility loosened from {was} to {mode}; this change's new versions are checked under {stricter}, so land the mode change on its own first"
            ));
            *mode = stricter;
        }
    }

    for subject in base.subjects() {
        for old in subject.versions() {
            match proposed.schema(&subject.name, old.version) {
                None => report.findings.push(Finding {
                    file: old.path.clone(),
                    in_base: true,
                    subject: subject.name.clone(),
                    pointer: String::new(),
                    rule: rule::VERSION_REMOVED.into(),
                    message: format!(
                        "v{} is in the base but not here: published versions stay, add a new one instead",
                        old.version
                    ),
                }),
                Some(new) if new.schema != old.schema => report.findings.push(Finding {
                    file: new.path.clone(),
                    in_base: false,
                    subject: subject.name.clone(),
                    pointer: first_difference(&old.schema, &new.schema),
                    rule: rule::VERSION_EDITED_IN_PLACE.into(),
                    message: format!(
                        "v{} differs from the base: events already carry it; add {}/v{}.json instead",
                        old.version,
                        subject.name,
                        subject.latest().version.max(
                            proposed
                                .subject(&subject.name)
                                .map_or(0, |s| s.latest().version)
                        ) + 1
                    ),
                }),
                Some(_) => {}
            }
        }
    }

    for subject in proposed.subjects() {
        let mode = modes
            .get(&subject.name)
            .copied()
            .unwrap_or(Compatibility::Backward);
        let known = base.subject(&subject.name);
        let mut earlier: Vec<(u32, &Value)> = Vec::new();
        let mut previous_number = 0;
        for new in subject.versions() {
            let is_new = known.and_then(|k| k.version(new.version)).is_none();
            if is_new && new.version != previous_number + 1 {
                report.findings.push(Finding {
                    file: new.path.clone(),
                    in_base: false,
                    subject: subject.name.clone(),
                    pointer: String::new(),
                    rule: rule::VERSION_SKIPPED.into(),
                    message: format!(
                        "v{} follows v{previous_number}: v{} is missing",
                        new.version,
                        previous_number + 1
                    ),
                });
            }
            if is_new && !earlier.is_empty() {
                report.versions_checked += 1;
                for found in compat::check(mode, &earlier, &new.schema) {
                    let (reader, writer) = match found.direction {
                        Direction::Backward => (new.version, found.against),
                        Direction::Forward => (found.against, new.version),
                    };
                    report.findings.push(Finding {
                        file: new.path.clone(),
                        in_base: false,
                        subject: subject.name.clone(),
                        pointer: found.difference.pointer,
                        rule: found.difference.kind.name().into(),
                        message: format!(
                            "breaks {mode}: v{reader} cannot read data written with v{writer}"
                        ),
                    });
                }
            }
            earlier.push((new.version, &new.schema));
            previous_number = new.version;
        }
    }

    for old in base.streams() {
        let Some(new) = proposed.stream(&old.stream) else {
            continue;
        };
        report.streams_checked += 1;
        let changed = [
            (
                "partition_key",
                rule::PARTITION_KEY_CHANGED,
                (old.partition_key != new.partition_key)
                    .then(|| (old.partition_key.clone(), new.partition_key.clone())),
            ),
            (
                "aggregate_type",
                rule::AGGREGATE_TYPE_CHANGED,
                (old.aggregate_type != new.aggregate_type)
                    .then(|| (old.aggregate_type.clone(), new.aggregate_type.clone())),
            ),
            (
                "partitions",
                rule::PARTITIONS_CHANGED,
                (old.partitions != new.partitions)
                    .then(|| (partitions(old.partitions), partitions(new.partitions))),
            ),
        ];
        for (key, rule, change) in changed {
            let Some((was, is)) = change else {
                continue;
            };
            report.findings.push(Finding {
                file: new.path.clone(),
                in_base: false,
                subject: new.stream.clone(),
                pointer: format!("/{key}"),
                rule: rule.into(),
                message: format!(
                    "{key} changed from {was} to {is} under the same stream name: consumers keyed by the old one would mix both; publish to a new stream ({}) instead",
                    next_stream_name(&new.stream)
                ),
            });
        }
    }
    report
}

fn partitions(count: Option<u32>) -> String {
    count.map_or_else(|| "none (not partitioned)".into(), |n| n.to_string())
}

/// The name of the next version of a stream: `x.v1` -> `x.v2`, `x` -> `x.v2`.
pub fn next_stream_name(stream: &str) -> String {
    if let Some((base, version)) = stream.rsplit_once(".v")
        && let Ok(n) = version.parse::<u32>()
    {
        return format!("{base}.v{}", n + 1);
    }
    format!("{stream}.v2")
}

/// The JSON pointer of the first place two documents differ (`""` when the roots differ in
/// kind).
fn first_difference(old: &Value, new: &Value) -> String {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) if x == y => {}
                    (Some(x), Some(y)) => {
                        return format!("/{}{}", escape(key), first_difference(x, y));
                    }
                    _ => return format!("/{}", escape(key)),
                }
            }
            String::new()
        }
        (Value::Array(a), Value::Array(b)) => {
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                if x != y {
                    return format!("/{index}{}", first_difference(x, y));
                }
            }
            if a.len() != b.len() {
                format!("/{}", a.len().min(b.len()))
            } else {
                String::new()
            }
        }
        _ => String::new(),
    }
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry(files: Vec<(&str, Value)>) -> SchemaRegistry {
        let (registry, problems) =
            SchemaRegistry::from_files(files.into_iter().map(|(p, v)| (p.to_string(), v)));
        assert_eq!(problems, vec![]);
        registry
    }

    fn athlete(extra: Value) -> Value {
        let mut properties = json!({"id": {"type": "string"}, "name": {"type": "string"}});
        for (k, v) in extra.as_object().unwrap() {
            properties[k] = v.clone();
        }
        json!({"type": "object", "properties": properties, "required": ["id"]})
    }

    fn stream(name: &str, key: &str, mode: &str) -> Value {
        json!({"stream": name, "aggregate_type": "athlete", "partition_key": key, "compatibility": mode})
    }

    fn rules(report: &EvolutionReport) -> Vec<(&str, &str, &str)> {
        report
            .findings
            .iter()
            .map(|f| (f.file.as_str(), f.rule.as_str(), f.pointer.as_str()))
            .collect()
    }

    #[test]
    fn a_compatible_new_version_passes_and_a_breaking_one_is_named() {
        let base = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "FORWARD"),
            ),
        ]);
        let added = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "athlete/v2.json",
                athlete(json!({"team": {"type": "string"}})),
            ),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "FORWARD"),
            ),
        ]);
        let report = compare(&base, &added);
        assert_eq!(rules(&report), vec![]);
        assert_eq!(report.versions_checked, 1);

        let breaking = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "athlete/v2.json",
                athlete(json!({"name": {"type": "integer"}})),
            ),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "FORWARD"),
            ),
        ]);
        let report = compare(&base, &breaking);
        assert_eq!(
            rules(&report),
            vec![("athlete/v2.json", "TYPE_CHANGED", "/properties/name")]
        );
        assert_eq!(
            report.findings[0].message,
            "breaks FORWARD: v1 cannot read data written with v2"
        );
    }

    #[test]
    fn loosening_the_mode_in_the_change_that_breaks_it_does_not_pass() {
        let base = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "FORWARD"),
            ),
        ]);
        let loosened_and_broken = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "athlete/v2.json",
                athlete(json!({"name": {"type": "integer"}})),
            ),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "NONE"),
            ),
        ]);
        let report = compare(&base, &loosened_and_broken);
        assert_eq!(
            rules(&report),
            vec![("athlete/v2.json", "TYPE_CHANGED", "/properties/name")]
        );
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("loosened from FORWARD to NONE")),
            "{:?}",
            report.notes
        );
        let loosened_alone = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "NONE"),
            ),
        ]);
        assert_eq!(rules(&compare(&base, &loosened_alone)), vec![]);
    }

    #[test]
    fn partitioning_changes_need_a_new_stream_name() {
        let base = registry(vec![
            (
                "athlete/v1.json",
                athlete(json!({"athleteId": {"type": "string"}})),
            ),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "BACKWARD"),
            ),
        ]);
        let same_name = registry(vec![
            (
                "athlete/v1.json",
                athlete(json!({"athleteId": {"type": "string"}})),
            ),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "athleteId", "BACKWARD"),
            ),
        ]);
        let report = compare(&base, &same_name);
        assert_eq!(
            rules(&report),
            vec![(
                "streams/athletes.v1.yaml",
                "STREAM_PARTITION_KEY_CHANGED",
                "/partition_key"
            )]
        );
        assert!(report.findings[0].message.contains("from id to athleteId"));
        assert!(report.findings[0].message.contains("athletes.v2"));

        let new_name = registry(vec![
            (
                "athlete/v1.json",
                athlete(json!({"athleteId": {"type": "string"}})),
            ),
            (
                "streams/athletes.v1.yaml",
                stream("athletes.v1", "id", "BACKWARD"),
            ),
            (
                "streams/athletes.v2.yaml",
                stream("athletes.v2", "athleteId", "BACKWARD"),
            ),
        ]);
        assert_eq!(rules(&compare(&base, &new_name)), vec![]);
    }

    #[test]
    fn published_versions_are_neither_edited_nor_removed_and_numbers_do_not_skip() {
        let base = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "athlete/v2.json",
                athlete(json!({"team": {"type": "string"}})),
            ),
        ]);
        let edited = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            (
                "athlete/v2.json",
                athlete(json!({"team": {"type": "string", "maxLength": 3}})),
            ),
        ]);
        let report = compare(&base, &edited);
        assert_eq!(
            rules(&report),
            vec![(
                "athlete/v2.json",
                "VERSION_EDITED_IN_PLACE",
                "/properties/team/maxLength"
            )]
        );
        assert!(
            report.findings[0]
                .message
                .contains("add athlete/v3.json instead")
        );

        let (removed, _) =
            SchemaRegistry::from_files([("athlete/v1.json".to_string(), athlete(json!({})))]);
        let report = compare(&base, &removed);
        assert_eq!(
            rules(&report),
            vec![("athlete/v2.json", "VERSION_REMOVED", "")]
        );
        assert!(report.findings[0].in_base);

        let (skipping, _) = SchemaRegistry::from_files([
            ("athlete/v1.json".to_string(), athlete(json!({}))),
            (
                "athlete/v2.json".to_string(),
                athlete(json!({"team": {"type": "string"}})),
            ),
            (
                "athlete/v4.json".to_string(),
                athlete(json!({"team": {"type": "string"}})),
            ),
        ]);
        let report = compare(&base, &skipping);
        assert_eq!(
            rules(&report),
            vec![("athlete/v4.json", "VERSION_SKIPPED", "")]
        );
    }

    #[test]
    fn streams_that_disagree_on_a_subjects_mode_get_the_strictest_and_a_note() {
        let proposed = registry(vec![
            ("athlete/v1.json", athlete(json!({}))),
            ("streams/a.v1.yaml", stream("a.v1", "id", "BACKWARD")),
            (
                "streams/b.v1.yaml",
                stream("b.v1", "id", "FORWARD_TRANSITIVE"),
            ),
        ]);
        let mut notes = Vec::new();
        let modes = subject_modes(&proposed, &mut notes);
        assert_eq!(modes["athlete"], Compatibility::FullTransitive);
        assert_eq!(
            notes,
            vec![
                "streams of subject athlete declare different modes (a.v1 BACKWARD, b.v1 FORWARD_TRANSITIVE): checking the strictest, FULL_TRANSITIVE"
            ]
        );
    }

    #[test]
    fn next_stream_names_bump_the_version_suffix() {
        assert_eq!(
            next_stream_name("athletes.athlete-updated.v1"),
            "athletes.athlete-updated.v2"
        );
        assert_eq!(next_stream_name("athletes"), "athletes.v2");
        assert_eq!(next_stream_name("a.v9"), "a.v10");
    }
}
