//! A case's expectations against what happened: each difference named with what was expected
//! and what was there.

use serde::Serialize;
use serde_json::{Map, Value};

use super::TestCase;
use super::run::CaseRun;
use crate::config::PipelineConfig;
use ecst_operators::StageConfig;

/// One expected replica entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected<'a> {
    /// No hash or row under the key.
    Absent,
    /// These fields (or columns), with these values.
    Present(&'a Map<String, Value>),
}

impl<'a> Expected<'a> {
    /// The expectation a YAML value writes: `absent` (or null), or a map.
    pub fn of(value: &'a Value) -> Option<Self> {
        match value {
            Value::Null => Some(Expected::Absent),
            Value::String(s) if s == "absent" => Some(Expected::Absent),
            Value::Object(map) => Some(Expected::Present(map)),
            _ => None,
        }
    }
}

/// Something a case expected that did not happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Where: `replica cache athlete:1 field status`, `decision latest entry 2`, ...
    pub at: String,
    /// What the case expected.
    pub expected: String,
    /// What happened.
    pub actual: String,
}

/// A value as a person reads it: strings bare, everything else as JSON.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn quoted(value: &Value) -> String {
    format!("{:?}", text(value))
}

/// The fields of a map, `{a: "1", b: "2"}`, sorted by name.
fn fields(map: &Map<String, Value>) -> String {
    let mut pairs: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{k}: {}", quoted(v)))
        .collect();
    pairs.sort();
    format!("{{{}}}", pairs.join(", "))
}

/// Compares what `case` expected with what `run` found; `pipeline` says which fields are a
/// sink's own bookkeeping (a Redis hash's version and timestamps), compared only when named.
pub fn compare(pipeline: &PipelineConfig, case: &TestCase, run: &CaseRun) -> Vec<Mismatch> {
    let mut mismatches = Vec::new();
    for (sink, keys) in &case.expect.replicas {
        let config = pipeline.stages.iter().find(|s| &s.name == sink);
        // Redis hashes compare exactly (but for the bookkeeping fields), Postgres rows by the
        // columns named: a row always has every column, most of them not worth naming.
        let (exact, bookkeeping): (bool, Vec<&str>) = match config.map(|s| &s.config) {
            Some(StageConfig::RedisHash(c)) => (
                true,
                vec![&c.version_field, &c.occurred_at_field, &c.deleted_field],
            ),
            _ => (false, Vec::new()),
        };
        for (key, expected) in keys {
            let actual = run.replicas.get(sink).and_then(|r| r.get(key)).cloned();
            let actual = actual.flatten();
            let at = format!("replica {sink} {key}");
            match (Expected::of(expected), &actual) {
                (Some(Expected::Absent), None) | (None, _) => {}
                (Some(Expected::Absent), Some(found)) => mismatches.push(Mismatch {
                    at,
                    expected: "absent".into(),
                    actual: fields(found),
                }),
                (Some(Expected::Present(want)), None) => mismatches.push(Mismatch {
                    at,
                    expected: fields(want),
                    actual: "absent".into(),
                }),
                (Some(Expected::Present(want)), Some(found)) => {
                    for (name, value) in want {
                        let got = found.get(name).filter(|v| !v.is_null());
                        let same = match got {
                            Some(got) => text(got) == text(value),
                            None => value.is_null(),
                        };
                        if !same {
                            mismatches.push(Mismatch {
                                at: format!("{at} field {name}"),
                                expected: if value.is_null() {
                                    "absent".into()
                                } else {
                                    quoted(value)
                                },
                                actual: got.map_or("absent".into(), quoted),
                            });
                        }
                    }
                    if exact {
                        let mut extra: Vec<(&String, &Value)> = found
                            .iter()
                            .filter(|(name, _)| {
                                !want.contains_key(*name) && !bookkeeping.contains(&name.as_str())
                            })
                            .collect();
                        extra.sort_by_key(|(name, _)| *name);
                        for (name, value) in extra {
                            mismatches.push(Mismatch {
                                at: format!("{at} field {name}"),
                                expected: "absent".into(),
                                actual: quoted(value),
                            });
                        }
                    }
                }
            }
        }
    }
    if let Some(expected) = &case.expect.dead_letters {
        for want in expected {
            let pattern = regex::Regex::new(&want.reason).ok();
            let found: Vec<&String> = run
                .dead_letters
                .iter()
                .filter(|(entry, _)| *entry == want.entry)
                .map(|(_, reason)| reason)
                .collect();
            let matched = found
                .iter()
                .any(|reason| pattern.as_ref().is_some_and(|p| p.is_match(reason)));
            if !matched {
                mismatches.push(Mismatch {
                    at: format!("dead letter of entry {}", want.entry),
                    expected: format!("a reason matching /{}/", want.reason),
                    actual: match found.as_slice() {
                        [] => "not dead-lettered".into(),
                        reasons => reasons
                            .iter()
                            .map(|r| format!("{r:?}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                });
            }
        }
        for (entry, reason) in &run.dead_letters {
            if !expected.iter().any(|want| want.entry == *entry) {
                mismatches.push(Mismatch {
                    at: format!("dead letter of entry {entry}"),
                    expected: "not dead-lettered".into(),
                    actual: format!("{reason:?}"),
                });
            }
        }
    }
    match (&case.expect.stopped, &run.stopped) {
        (None, None) => {}
        (Some(want), got) => {
            let matched = regex::Regex::new(want)
                .ok()
                .zip(got.as_ref())
                .is_some_and(|(pattern, reason)| pattern.is_match(reason));
            if !matched {
                mismatches.push(Mismatch {
                    at: "stop".into(),
                    expected: format!("the worker stops with a reason matching /{want}/"),
                    actual: got
                        .as_ref()
                        .map_or("it did not stop".into(), |reason| format!("{reason:?}")),
                });
            }
        }
        (None, Some(reason)) => mismatches.push(Mismatch {
            at: "stop".into(),
            expected: "the worker does not stop".into(),
            actual: format!("stopped: {reason:?}"),
        }),
    }
    for (stage, decisions) in &case.expect.decisions {
        for (entry, want) in decisions {
            let Ok(entry) = entry.parse::<usize>() else {
                continue;
            };
            let got: Vec<&str> = run
                .decisions
                .iter()
                .filter(|d| d.entry == entry && &d.stage == stage)
                .map(|d| d.outcome.as_str())
                .collect();
            let got = match got.as_slice() {
                [] => "none".to_string(),
                outcomes => outcomes.join(", "),
            };
            if &got != want {
                mismatches.push(Mismatch {
                    at: format!("decision {stage} entry {entry}"),
                    expected: want.clone(),
                    actual: got,
                });
            }
        }
    }
    mismatches
}
