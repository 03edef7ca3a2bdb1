//! `ecst test`: a pipeline's test cases, in YAML (Vector's unit tests are the model), run
//! through the pipeline's real stages and sinks against its Redis and Postgres, each case in a
//! key prefix and a Postgres schema of its own that are removed afterwards.
//!
//! - this module: the file format and loading, every error positioned like a pipeline's;
//! - [`run`]: one case, isolated, through the DAG and the sinks, with the decision trace;
//! - [`expect`]: what a case expected against what happened.

pub mod expect;
pub mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{self, ConfigError, ConfigErrors, PipelineConfig};

/// A test file's cases and the pipeline they test.
#[derive(Debug, Clone)]
pub struct TestSuite {
    /// The file the cases are in.
    pub file: PathBuf,
    /// The pipeline under test.
    pub pipeline: PipelineConfig,
    /// The cases, in file order.
    pub cases: Vec<TestCase>,
}

/// One test case: input entries, then what the replicas, the dead letters and the stages
/// should show.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// What the case shows, printed by the runner.
    pub name: String,
    /// Entries per batch (default: all in one batch, as a worker catching up reads them).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// The stream entries, in stream order; entry `n` (from 1) gets the id `n-0`.
    pub input: Vec<Input>,
    /// What should be true after the run.
    #[serde(default)]
    pub expect: Expect,
}

/// One input entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// A wire envelope, written to the decode stage's body field as JSON. `schemaVersion`,
    /// `eventId` and `occurredAt` default when the map has an `aggregateId` and lacks them.
    Event(Map<String, Value>),
    /// The entry's raw fields (a foreign shape, a poison body), written as they are.
    Fields(BTreeMap<String, String>),
}

/// What a case expects.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Per sink stage, per key: the Redis hash's fields or the Postgres row's columns, or
    /// `absent`.
    #[serde(default)]
    pub replicas: BTreeMap<String, BTreeMap<String, Value>>,
    /// The entries dead-lettered, each with a pattern its reason matches; when given, no
    /// other entry may be dead-lettered.
    #[serde(default)]
    pub dead_letters: Option<Vec<ExpectedDeadLetter>>,
    /// Per stage (or sink), per entry number: what it did (`passed`, `stale`, `coalesced`,
    /// `filtered`, `deleted`, `ignored_delete`, `dead_lettered`, `applied`, `stale_at_sink`,
    /// ...; `none` when the entry never reached it).
    #[serde(default)]
    pub decisions: BTreeMap<String, BTreeMap<String, String>>,
    /// A regular expression the reason matches when a stage stops the worker (a `fail`
    /// policy); without it, a case whose worker would stop fails.
    #[serde(default)]
    pub stopped: Option<String>,
}

/// A dead letter a case expects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedDeadLetter {
    /// The input entry's number, from 1.
    pub entry: usize,
    /// A regular expression the dead letter's reason matches.
    pub reason: String,
}

/// A file of cases beside its pipeline: `<pipeline>.test.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// The pipeline file, relative to this one.
    pipeline: PathBuf,
    tests: Vec<TestCase>,
}

/// The cases inside a pipeline file (its other keys are the pipeline's).
#[derive(Debug, Deserialize)]
struct PipelineTests {
    #[serde(default)]
    tests: Vec<TestCase>,
}

fn error(file: &Path, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.to_path_buf(),
        pos: config::yaml::Pos::default(),
        key: String::new(),
        message,
    }])
}

/// Reads a file given to `ecst test`: a test file naming its pipeline, a pipeline with
/// `tests:`, or a pipeline whose `<name>.test.yaml` lies beside it (then read instead).
/// `None` for a file with no cases (a pipeline without tests, a relay file). `env` resolves
/// `${VAR}`.
pub fn load(
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<TestSuite>, ConfigErrors> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| error(file, format!("cannot read the file: {e}")))?;
    let root = config::yaml::parse(&text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            pos: e.pos,
            key: String::new(),
            message: e.message,
        }])
    })?;
    let has = |key: &str| root.get(key).is_some();
    if has("pipeline") || (has("tests") && !has("stages")) {
        let dir = file.parent().unwrap_or(Path::new("."));
        let load_pipeline = |path: &Path| {
            let pipeline_file = dir.join(path);
            let pipeline_text = std::fs::read_to_string(&pipeline_file).map_err(|e| {
                let shown = pipeline_file.display();
                error(file, format!("pipeline: cannot read {shown}: {e}"))
            })?;
            config::load_str(&pipeline_file, &pipeline_text, env)
        };
        // Read first when it is written plainly, so that the cases are checked against it.
        let pipeline = match root.get("pipeline").and_then(|(_, node)| node.as_str()) {
            Some(path) => Some(load_pipeline(Path::new(path))?),
            None => None,
        };
        let tests: TestFile = config::load_document_str(file, &text, env, |f: &TestFile| {
            check_cases(&f.tests, pipeline.as_ref())
        })?;
        let pipeline = match pipeline {
            Some(pipeline) => pipeline,
            None => load_pipeline(&tests.pipeline)?,
        };
        return Ok(Some(TestSuite {
            file: file.to_path_buf(),
            pipeline,
            cases: tests.tests,
        }));
    }
    if !has("stages") {
        return Ok(None);
    }
    if !has("tests") {
        let beside = file.with_extension("test.yaml");
        return match beside.exists() {
            true => load(&beside, env),
            false => Ok(None),
        };
    }
    let pipeline = config::load_str(file, &text, env)?;
    let tests: PipelineTests = config::load_document_str(file, &text, env, |f: &PipelineTests| {
        check_cases(&f.tests, Some(&pipeline))
    })?;
    Ok(Some(TestSuite {
        file: file.to_path_buf(),
        pipeline,
        cases: tests.tests,
    }))
}

/// Problems serde cannot see: entry numbers out of range, patterns that do not compile.
fn check_cases(
    cases: &[TestCase],
    pipeline: Option<&PipelineConfig>,
) -> Vec<(Vec<String>, String)> {
    let stage = |name: &str| pipeline.and_then(|p| p.stages.iter().find(|s| s.name == name));
    let mut problems = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let at = |rest: &[&str]| {
            let mut path = vec!["tests".to_string(), i.to_string()];
            path.extend(rest.iter().map(|s| s.to_string()));
            path
        };
        if case.batch_size == Some(0) {
            problems.push((at(&["batch_size"]), "must be at least 1".into()));
        }
        let entries = case.input.len();
        let in_range = |n: usize| (1..=entries).contains(&n);
        let inputs = match entries {
            0 => "the case has no input".to_string(),
            n => format!("1 to {n}"),
        };
        for (j, dead) in case.expect.dead_letters.iter().flatten().enumerate() {
            let j = j.to_string();
            if !in_range(dead.entry) {
                let message = format!("entry {} is not an input ({inputs})", dead.entry);
                problems.push((at(&["expect", "dead_letters", &j, "entry"]), message));
            }
            if let Err(e) = regex::Regex::new(&dead.reason) {
                let message = format!("not a regular expression: {e}");
                problems.push((at(&["expect", "dead_letters", &j, "reason"]), message));
            }
        }
        if let Some(Err(e)) = case.expect.stopped.as_deref().map(regex::Regex::new) {
            let message = format!("not a regular expression: {e}");
            problems.push((at(&["expect", "stopped"]), message));
        }
        for (name, decisions) in &case.expect.decisions {
            if pipeline.is_some() && stage(name).is_none() {
                let message = format!("the pipeline has no stage `{name}`");
                problems.push((at(&["expect", "decisions", name]), message));
            }
            for entry in decisions.keys() {
                if !entry.parse().is_ok_and(in_range) {
                    let message = format!("`{entry}` is not an input number ({inputs})");
                    problems.push((at(&["expect", "decisions", name, entry]), message));
                }
            }
        }
        for (sink, keys) in &case.expect.replicas {
            if pipeline.is_some() && !stage(sink).is_some_and(|s| s.config.is_sink()) {
                let message = format!("the pipeline has no sink `{sink}`");
                problems.push((at(&["expect", "replicas", sink]), message));
            }
            for (key, expected) in keys {
                if expect::Expected::of(expected).is_none() {
                    let message = "a map of fields (or columns), or `absent`".to_string();
                    problems.push((at(&["expect", "replicas", sink, key]), message));
                }
            }
        }
    }
    problems
}
