//! `upcast`: carries events published at older payload schema versions up to the latest one,
//! by declarative steps between consecutive versions, so that every stage after it sees one
//! shape. The version an event was published at is kept in the payload as `_schema_version`.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, IdedEntryExpr};
use cel::extractors::This;
use cel::objects::{Key, Map as CelMap};
use cel::{Context, IdedExpr, Program, Value as CelValue};
use ecst_schemas::{Envelope, EnvelopePath, PayloadSelection};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::dead_letter::DeadLetterReason;
use crate::record::{Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, Stage};

/// The payload member where the stage records the version an event was published at.
pub const SCHEMA_VERSION_FIELD: &str = "_schema_version";

/// Configuration of the `upcast` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpcastConfig {
    /// One step per version, oldest first, with consecutive `from`s; the latest version is the
    /// last step's `from` + 1.
    pub steps: Vec<StepConfig>,
    /// What an event newer than the latest version does.
    #[serde(default)]
    pub on_newer_version: OnNewerVersion,
}

/// The operations that carry a payload from version `from` to `from + 1`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// The version this step reads.
    pub from: i64,
    /// Applied in order.
    pub ops: Vec<OpConfig>,
}

/// One operation on the payload. Paths are dotted and relative to the payload
/// (`address.city`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OpConfig {
    /// Renames a top-level member (nothing when it is absent).
    Rename(FromTo),
    /// Moves a value to another path, nested or not (nothing when it is absent).
    Move(FromTo),
    /// Sets a value where the path is absent or null.
    Default(DefaultOp),
    /// Removes a path.
    Drop(String),
    /// Splits a string member into several by a separator, removing the source; the last
    /// member takes the rest, members without a part stay absent.
    Split(SplitOp),
    /// Joins string members into one with a separator (absent ones are skipped), removing
    /// the sources.
    Join(JoinOp),
    /// Sets a path to the value of a CEL expression over the event (`payload` as the steps
    /// so far made it, and the other envelope members).
    Compute(ComputeOp),
}

/// Source and target paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromTo {
    /// Source path.
    pub from: String,
    /// Target path.
    pub to: String,
}

/// A default value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultOp {
    /// Path to set.
    pub path: String,
    /// Value set when the path is absent or null.
    pub value: Value,
}

/// One string to several.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitOp {
    /// Source path (a string).
    pub from: String,
    /// What separates the parts.
    pub separator: String,
    /// Target paths, one per part.
    pub into: Vec<String>,
}

/// Several strings to one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinOp {
    /// Source paths (strings).
    pub from: Vec<String>,
    /// What goes between the parts.
    pub separator: String,
    /// Target path.
    pub to: String,
}

/// A computed value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeOp {
    /// Path to set.
    pub path: String,
    /// CEL expression (`payload.country.upperAscii()`).
    pub expr: String,
}

/// What an event whose `schemaVersion` is newer than the latest known one does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNewerVersion {
    /// Goes to the dead-letter stream with the reason.
    #[default]
    DeadLetter,
    /// Passes as it is (stages after it see the newer shape).
    Pass,
    /// Stops the worker, naming the entry; the entry stays pending.
    Fail,
}

impl OpConfig {
    fn name(&self) -> &'static str {
        match self {
            OpConfig::Rename(_) => "rename",
            OpConfig::Move(_) => "move",
            OpConfig::Default(_) => "default",
            OpConfig::Drop(_) => "drop",
            OpConfig::Split(_) => "split",
            OpConfig::Join(_) => "join",
            OpConfig::Compute(_) => "compute",
        }
    }

    /// The paths the op reads from an older payload.
    fn reads(&self) -> Vec<&str> {
        match self {
            OpConfig::Rename(op) | OpConfig::Move(op) => vec![op.from.as_str()],
            OpConfig::Split(op) => vec![op.from.as_str()],
            OpConfig::Join(op) => op.from.iter().map(String::as_str).collect(),
            OpConfig::Default(_) | OpConfig::Drop(_) | OpConfig::Compute(_) => Vec::new(),
        }
    }

    /// Every path the op names, with its key inside the op.
    fn paths(&self) -> Vec<(String, &str)> {
        match self {
            OpConfig::Rename(op) | OpConfig::Move(op) => {
                vec![("from".into(), op.from.as_str()), ("to".into(), &op.to)]
            }
            OpConfig::Default(op) => vec![("path".into(), op.path.as_str())],
            OpConfig::Drop(path) => vec![(String::new(), path.as_str())],
            OpConfig::Split(op) => std::iter::once(("from".into(), op.from.as_str()))
                .chain(
                    op.into
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (format!("into.{i}"), p.as_str())),
                )
                .collect(),
            OpConfig::Join(op) => op
                .from
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("from.{i}"), p.as_str()))
                .chain(std::iter::once(("to".into(), op.to.as_str())))
                .collect(),
            OpConfig::Compute(op) => vec![("path".into(), op.path.as_str())],
        }
    }
}

fn op_key(step: usize, op: usize, config: &OpConfig, inner: &str) -> String {
    let base = format!("steps.{step}.ops.{op}.{}", config.name());
    if inner.is_empty() {
        base
    } else {
        format!("{base}.{inner}")
    }
}

impl UpcastConfig {
    pub(crate) fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let Some(first) = self.steps.first() else {
            return vec![ConfigProblem::new(
                "steps",
                "an upcast stage needs at least one step (`- from: 1` with its `ops`)",
            )];
        };
        if first.from < 1 {
            problems.push(ConfigProblem::new(
                "steps.0.from",
                "schema versions start at 1",
            ));
        }
        for (i, pair) in self.steps.windows(2).enumerate() {
            if pair[1].from != pair[0].from + 1 {
                problems.push(ConfigProblem::new(
                    format!("steps.{}.from", i + 1),
                    format!(
                        "expected from: {} after the step from {}: each step goes up one version, so a gap or a repeat leaves versions no step carries",
                        pair[0].from + 1,
                        pair[0].from
                    ),
                ));
            }
        }
        for (s, step) in self.steps.iter().enumerate() {
            if step.ops.is_empty() {
                problems.push(ConfigProblem::new(
                    format!("steps.{s}.ops"),
                    "a step needs at least one op (rename, move, default, drop, split, join, compute)",
                ));
            }
            for (o, op) in step.ops.iter().enumerate() {
                problems.extend(op_problems(s, o, op));
            }
        }
        problems
    }

    /// The latest version: the last step's `from` + 1.
    pub fn latest_version(&self) -> Option<i64> {
        self.steps.last().map(|step| step.from + 1)
    }

    /// Builds the stage.
    pub fn build(&self) -> Result<Upcast, String> {
        if let Some(problem) = self.check().into_iter().next() {
            return Err(format!("{}: {}", problem.key, problem.message));
        }
        let oldest = self.steps.first().map_or(1, |step| step.from);
        let steps = self
            .steps
            .iter()
            .map(|step| {
                step.ops
                    .iter()
                    .enumerate()
                    .map(|(o, op)| Op::build(step.from, o, op))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut functions = Context::default();
        functions.add_function("upperAscii", upper_ascii);
        functions.add_function("lowerAscii", lower_ascii);
        Ok(Upcast {
            oldest,
            latest: oldest + steps.len() as i64,
            steps,
            on_newer_version: self.on_newer_version,
            functions,
        })
    }
}

fn op_problems(step: usize, index: usize, op: &OpConfig) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    for (inner, path) in op.paths() {
        if path.is_empty() || path.split('.').any(str::is_empty) {
            problems.push(ConfigProblem::new(
                op_key(step, index, op, &inner),
                format!(
                    "path {path:?} must be payload member names separated by dots (address.city)"
                ),
            ));
        }
    }
    match op {
        OpConfig::Rename(r) if r.from.contains('.') || r.to.contains('.') => {
            problems.push(ConfigProblem::new(
                op_key(step, index, op, ""),
                "rename takes top-level member names; use `move` for nested paths",
            ));
        }
        OpConfig::Split(s) if s.into.len() < 2 || s.separator.is_empty() => {
            problems.push(ConfigProblem::new(
                op_key(step, index, op, ""),
                "split needs a non-empty `separator` and at least two `into` paths",
            ));
        }
        OpConfig::Join(j) if j.from.len() < 2 => {
            problems.push(ConfigProblem::new(
                op_key(step, index, op, "from"),
                "join needs at least two `from` paths",
            ));
        }
        OpConfig::Compute(c) => {
            if let Err(e) = Program::compile(&c.expr) {
                problems.push(ConfigProblem::new(
                    op_key(step, index, op, "expr"),
                    format!("invalid CEL expression: {e}"),
                ));
            }
        }
        _ => {}
    }
    problems
}

/// A payload-relative path, split once.
type Path = Vec<String>;

fn path(text: &str) -> Path {
    text.split('.').map(str::to_string).collect()
}

/// One op, ready to run, with the label its errors carry.
struct Op {
    /// `step 1->2, op 3 (compute countryCode)`.
    label: String,
    kind: OpKind,
}

enum OpKind {
    Move {
        from: Path,
        to: Path,
    },
    Default {
        path: Path,
        value: Value,
    },
    Drop(Path),
    Split {
        from: Path,
        separator: String,
        into: Vec<Path>,
    },
    Join {
        from: Vec<Path>,
        separator: String,
        to: Path,
    },
    Compute {
        path: Path,
        program: Arc<Program>,
        /// The envelope members the expression names, other than `payload`.
        envelope: Vec<(String, EnvelopePath)>,
        payload: PayloadUse,
    },
}

/// What of the payload a `compute` expression reads, so that only that is handed to CEL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PayloadUse {
    /// The expression does not name `payload`.
    Nothing,
    /// Only `payload.<member>` selections of these members.
    Members(Vec<String>),
    /// `payload` itself (passed to a function, indexed, inside a comprehension).
    Whole,
}

impl PayloadUse {
    /// Walks the expression for its uses of `payload`.
    fn of(expression: &IdedExpr) -> PayloadUse {
        let mut members = Vec::new();
        if payload_members(expression, &mut members) {
            members.sort();
            members.dedup();
            if members.is_empty() {
                PayloadUse::Nothing
            } else {
                PayloadUse::Members(members)
            }
        } else {
            PayloadUse::Whole
        }
    }
}

/// Adds to `members` the `payload.<member>` selections in `expr`; false when `payload` is used
/// any other way, or where a comprehension may rebind names.
fn payload_members(expr: &IdedExpr, members: &mut Vec<String>) -> bool {
    match &expr.expr {
        Expr::Select(select) => match &select.operand.expr {
            Expr::Ident(name) if name == PAYLOAD => {
                members.push(select.field.clone());
                true
            }
            _ => payload_members(&select.operand, members),
        },
        Expr::Ident(name) => name != PAYLOAD,
        Expr::Call(call) => {
            call.target
                .as_deref()
                .is_none_or(|target| payload_members(target, members))
                && call.args.iter().all(|arg| payload_members(arg, members))
        }
        Expr::List(list) => list.elements.iter().all(|e| payload_members(e, members)),
        Expr::Map(map) => map.entries.iter().all(|e| entry_members(e, members)),
        Expr::Struct(st) => st.entries.iter().all(|e| entry_members(e, members)),
        Expr::Comprehension(_) => false,
        Expr::Literal(_) | Expr::Unspecified => true,
    }
}

fn entry_members(entry: &IdedEntryExpr, members: &mut Vec<String>) -> bool {
    match &entry.expr {
        EntryExpr::StructField(field) => payload_members(&field.value, members),
        EntryExpr::MapEntry(pair) => {
            payload_members(&pair.key, members) && payload_members(&pair.value, members)
        }
    }
}

const PAYLOAD: &str = "payload";

impl Op {
    fn build(from: i64, index: usize, config: &OpConfig) -> Result<Op, String> {
        let target = match config {
            OpConfig::Rename(op) | OpConfig::Move(op) => &op.to,
            OpConfig::Default(op) => &op.path,
            OpConfig::Drop(path) => path,
            OpConfig::Split(op) => &op.from,
            OpConfig::Join(op) => &op.to,
            OpConfig::Compute(op) => &op.path,
        };
        let label = format!(
            "step {from}->{}, op {} ({} {target})",
            from + 1,
            index + 1,
            config.name()
        );
        let kind = match config {
            OpConfig::Rename(op) | OpConfig::Move(op) => OpKind::Move {
                from: path(&op.from),
                to: path(&op.to),
            },
            OpConfig::Default(op) => OpKind::Default {
                path: path(&op.path),
                value: op.value.clone(),
            },
            OpConfig::Drop(p) => OpKind::Drop(path(p)),
            OpConfig::Split(op) => OpKind::Split {
                from: path(&op.from),
                separator: op.separator.clone(),
                into: op.into.iter().map(|p| path(p)).collect(),
            },
            OpConfig::Join(op) => OpKind::Join {
                from: op.from.iter().map(|p| path(p)).collect(),
                separator: op.separator.clone(),
                to: path(&op.to),
            },
            OpConfig::Compute(op) => {
                let program = Program::compile(&op.expr)
                    .map_err(|e| format!("{label}: invalid CEL expression: {e}"))?;
                let variables = program.references();
                let names = variables.variables();
                let envelope = names
                    .iter()
                    .filter(|name| **name != "payload")
                    .filter_map(|name| Some((name.to_string(), EnvelopePath::parse(name)?)))
                    .collect();
                let payload = if names.contains(&PAYLOAD) {
                    PayloadUse::of(program.expression())
                } else {
                    PayloadUse::Nothing
                };
                OpKind::Compute {
                    path: path(&op.path),
                    program: Arc::new(program),
                    envelope,
                    payload,
                }
            }
        };
        Ok(Op { label, kind })
    }
}

/// The running `upcast` stage.
pub struct Upcast {
    oldest: i64,
    latest: i64,
    /// `steps[i]` carries version `oldest + i` to the next.
    steps: Vec<Vec<Op>>,
    on_newer_version: OnNewerVersion,
    /// The root CEL scope with the string functions `compute` may call; each evaluation
    /// adds the event's variables in a child scope, so the functions are registered once.
    functions: Context<'static>,
}

impl std::fmt::Debug for Upcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upcast")
            .field("oldest", &self.oldest)
            .field("latest", &self.latest)
            .field("on_newer_version", &self.on_newer_version)
            .finish_non_exhaustive()
    }
}

/// What to do with one event.
enum Verdict {
    Keep(Record),
    DeadLetter(String),
    Halt(String),
}

impl Upcast {
    fn upcast(&self, mut record: Record) -> Verdict {
        if record.event.is_tombstone() {
            return Verdict::Keep(record);
        }
        // An event without a version (a snapshot row, a producer that never versioned) is
        // taken to carry the current shape.
        let version = record.event.schema_version.unwrap_or(self.latest);
        if version > self.latest {
            let reason = format!(
                "schemaVersion {version} is newer than the latest version this upcast knows ({}); add a step `from: {}`",
                self.latest, self.latest
            );
            return match self.on_newer_version {
                OnNewerVersion::DeadLetter => Verdict::DeadLetter(reason),
                OnNewerVersion::Fail => Verdict::Halt(reason),
                OnNewerVersion::Pass => {
                    record_version(&mut record, version);
                    Verdict::Keep(record)
                }
            };
        }
        if version < self.oldest {
            return Verdict::DeadLetter(format!(
                "schemaVersion {version} is older than the oldest version this upcast knows ({}); no step carries it",
                self.oldest
            ));
        }
        // Copy on write: the envelope is shared with other branches only in a fan-out.
        let event = Arc::make_mut(&mut record.event);
        // Taken out so that `compute` can read the rest of the envelope while ops change it.
        let mut payload = match event.payload.take() {
            Some(Value::Object(payload)) => payload,
            other => {
                let kind = other
                    .as_ref()
                    .map_or("absent", ecst_schemas::envelope::json_type);
                return Verdict::DeadLetter(format!("the payload is {kind}, not an object"));
            }
        };
        let first = usize::try_from(version - self.oldest).unwrap_or(usize::MAX);
        for ops in self.steps.iter().skip(first) {
            for op in ops {
                if let Err(message) = self.apply(op, &mut payload, event) {
                    return Verdict::DeadLetter(format!("upcast {}: {message}", op.label));
                }
            }
        }
        payload.insert(SCHEMA_VERSION_FIELD.into(), Value::from(version));
        event.payload = Some(Value::Object(payload));
        event.schema_version = Some(self.latest);
        Verdict::Keep(record)
    }

    fn apply(
        &self,
        op: &Op,
        payload: &mut Map<String, Value>,
        event: &Envelope,
    ) -> Result<(), String> {
        match &op.kind {
            OpKind::Move { from, to } => {
                if let Some(value) = remove(payload, from) {
                    insert(payload, to, value)?;
                }
            }
            OpKind::Default { path, value } => {
                if get(payload, path).is_none_or(Value::is_null) {
                    insert(payload, path, value.clone())?;
                }
            }
            OpKind::Drop(path) => {
                remove(payload, path);
            }
            OpKind::Split {
                from,
                separator,
                into,
            } => match remove(payload, from) {
                None => {}
                Some(Value::String(text)) => {
                    for (target, part) in
                        into.iter().zip(text.splitn(into.len(), separator.as_str()))
                    {
                        insert(payload, target, Value::String(part.to_string()))?;
                    }
                }
                Some(other) => {
                    return Err(format!(
                        "{} is {}, not a string",
                        from.join("."),
                        ecst_schemas::envelope::json_type(&other)
                    ));
                }
            },
            OpKind::Join {
                from,
                separator,
                to,
            } => {
                let mut parts = Vec::with_capacity(from.len());
                for source in from {
                    match get(payload, source) {
                        None | Some(Value::Null) => {}
                        Some(Value::String(text)) => parts.push(text.clone()),
                        Some(other) => {
                            return Err(format!(
                                "{} is {}, not a string",
                                source.join("."),
                                ecst_schemas::envelope::json_type(other)
                            ));
                        }
                    }
                }
                if !parts.is_empty() {
                    for source in from {
                        remove(payload, source);
                    }
                    insert(payload, to, Value::String(parts.join(separator)))?;
                }
            }
            OpKind::Compute {
                path,
                program,
                envelope,
                payload: reads,
            } => {
                let mut scope = self.functions.new_inner_scope();
                match reads {
                    PayloadUse::Nothing => {}
                    PayloadUse::Members(names) => scope.add_variable_from_value(
                        PAYLOAD,
                        cel_map(names.iter().filter_map(|name| payload.get_key_value(name))),
                    ),
                    PayloadUse::Whole => {
                        scope.add_variable_from_value(PAYLOAD, cel_map(payload.iter()))
                    }
                }
                for (name, member) in envelope {
                    if let Some(value) = event.get(member) {
                        scope.add_variable_from_value(name.as_str(), cel_value(&value));
                    }
                }
                let value = program.execute(&scope).map_err(|e| e.to_string())?;
                insert(payload, path, json_value(&value)?)?;
            }
        }
        Ok(())
    }
}

fn record_version(record: &mut Record, version: i64) {
    if let Some(Value::Object(payload)) = &mut Arc::make_mut(&mut record.event).payload {
        payload.insert(SCHEMA_VERSION_FIELD.into(), Value::from(version));
    }
}

fn get<'a>(map: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut current = map;
    for name in parents {
        current = current.get(name)?.as_object()?;
    }
    current.get(last)
}

fn remove(map: &mut Map<String, Value>, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut current = map;
    for name in parents {
        current = current.get_mut(name)?.as_object_mut()?;
    }
    current.remove(last)
}

/// Sets `path`, creating the objects on the way; a non-object on the way is an error.
fn insert(map: &mut Map<String, Value>, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut current = map;
    for (depth, name) in parents.iter().enumerate() {
        let slot = current
            .entry(name.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if slot.is_null() {
            *slot = Value::Object(Map::new());
        }
        current = match slot {
            Value::Object(inner) => inner,
            other => {
                return Err(format!(
                    "cannot set {}: {} is {}, not an object",
                    path.join("."),
                    path[..=depth].join("."),
                    ecst_schemas::envelope::json_type(other)
                ));
            }
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

fn upper_ascii(This(text): This<Arc<String>>) -> Arc<String> {
    Arc::new(text.to_ascii_uppercase())
}

fn lower_ascii(This(text): This<Arc<String>>) -> Arc<String> {
    Arc::new(text.to_ascii_lowercase())
}

fn cel_map<'a>(members: impl Iterator<Item = (&'a String, &'a Value)>) -> CelValue {
    let entries: HashMap<Key, CelValue> = members
        .map(|(k, v)| (Key::String(Arc::new(k.clone())), cel_value(v)))
        .collect();
    CelValue::Map(CelMap {
        map: Arc::new(entries),
    })
}

fn cel_value(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => CelValue::Int(i),
            (None, Some(u)) => CelValue::UInt(u),
            _ => CelValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(cel_value).collect())),
        Value::Object(map) => cel_map(map.iter()),
    }
}

fn json_value(value: &CelValue) -> Result<Value, String> {
    Ok(match value {
        CelValue::Null => Value::Null,
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::Int(i) => Value::from(*i),
        CelValue::UInt(u) => Value::from(*u),
        CelValue::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("the expression returned {f}, which JSON cannot hold"))?,
        CelValue::String(s) => Value::String(s.to_string()),
        CelValue::List(items) => {
            Value::Array(items.iter().map(json_value).collect::<Result<_, _>>()?)
        }
        CelValue::Map(map) => {
            let mut out = Map::new();
            for (key, value) in map.map.iter() {
                let key = match key {
                    Key::String(s) => s.to_string(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                out.insert(key, json_value(value)?);
            }
            Value::Object(out)
        }
        other => {
            return Err(format!(
                "the expression returned a {}, which a payload cannot hold",
                other.type_of()
            ));
        }
    })
}

impl Stage for Upcast {
    fn process(
        &mut self,
        input: Vec<Record>,
        entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut kept = Vec::with_capacity(input.len());
        for record in input {
            let entry = record.entry;
            match self.upcast(record) {
                Verdict::Keep(record) => kept.push(record),
                Verdict::DeadLetter(message) => {
                    out.dead_letter(entry, DeadLetterReason::StageRejected { message })
                }
                Verdict::Halt(reason) => {
                    let id = entries.get(entry).map_or("", |e| e.id.as_str());
                    out.halt(format!("entry {id}: {reason}"));
                }
            }
        }
        kept
    }
}

impl ComponentConfig for UpcastConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required(
            "steps",
            "list of { from, ops }",
            "one step per version: `ops` (rename, move, default, drop, split, join, compute) carry version `from` to `from` + 1",
        ),
        KeyDoc::optional(
            "on_newer_version",
            "dead_letter | pass | fail",
            "dead_letter",
            "what an event newer than the last step's version does",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        self.check()
    }

    fn payload_reads(&self, _projected: bool) -> PayloadSelection {
        // The older names the ops read must survive decoding; `compute` may read anything.
        let ops = || self.steps.iter().flat_map(|step| &step.ops);
        if ops().any(|op| matches!(op, OpConfig::Compute(_))) {
            return PayloadSelection::All;
        }
        PayloadSelection::only(
            ops()
                .flat_map(OpConfig::reads)
                .filter_map(|p| p.split('.').next())
                .map(str::to_string),
        )
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

    #[test]
    fn compute_hands_cel_only_the_payload_members_it_selects() {
        let uses = |expr: &str| PayloadUse::of(Program::compile(expr).unwrap().expression());
        assert_eq!(
            uses("payload.country.upperAscii() + payload.name + payload.country"),
            PayloadUse::Members(vec!["country".into(), "name".into()])
        );
        assert_eq!(
            uses("has(payload.tier) ? payload.tier : 'standard'"),
            PayloadUse::Members(vec!["tier".into()])
        );
        assert_eq!(uses("size(payload)"), PayloadUse::Whole);
        assert_eq!(uses("payload['country']"), PayloadUse::Whole);
        assert_eq!(uses("[1, 2].map(x, x + payload.points)"), PayloadUse::Whole);
        assert_eq!(uses("aggregateId + '!'"), PayloadUse::Nothing);
    }

    fn config(yaml_like: Value) -> UpcastConfig {
        serde_json::from_value(yaml_like).unwrap()
    }

    fn event(entry: usize, version: Option<i64>, payload: Value) -> Record {
        let mut body = json!({"aggregateId": "a", "aggregateVersion": 1, "payload": payload});
        if let Some(v) = version {
            body["schemaVersion"] = json!(v);
        }
        Record::new(entry, EnvelopeKeys::default().read(&body).unwrap())
    }

    fn entries(n: usize) -> Vec<RawEntry> {
        (0..n)
            .map(|i| RawEntry {
                id: format!("1-{i}"),
                fields: Vec::new(),
            })
            .collect()
    }

    /// Runs one op as the only step from v1 over `payload`: the upcast payload (without
    /// `_schema_version`) or the dead-letter reason.
    fn run_op(op: Value, payload: Value) -> Result<Value, String> {
        let mut stage = config(json!({"steps": [{"from": 1, "ops": [op]}]}))
            .build()
            .unwrap();
        let mut out = Outcomes::default();
        let kept = stage.process(vec![event(0, Some(1), payload)], &entries(1), &mut out);
        match (kept.first(), out.dead_letters.first()) {
            (Some(record), None) => {
                assert_eq!(record.event.schema_version, Some(2));
                let mut payload = record.event.payload.clone().unwrap();
                assert_eq!(payload[SCHEMA_VERSION_FIELD], json!(1));
                payload
                    .as_object_mut()
                    .unwrap()
                    .remove(SCHEMA_VERSION_FIELD);
                Ok(payload)
            }
            (None, Some((0, DeadLetterReason::StageRejected { message }))) => Err(message.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rename_and_move_carry_a_value_and_leave_an_absent_one_absent() {
        let rename = json!({"rename": {"from": "name", "to": "displayName"}});
        assert_eq!(
            run_op(rename.clone(), json!({"name": "Ada", "x": 1})),
            Ok(json!({"displayName": "Ada", "x": 1}))
        );
        assert_eq!(run_op(rename, json!({"x": 1})), Ok(json!({"x": 1})));
        let nested = json!({"move": {"from": "address.city", "to": "location.city"}});
        assert_eq!(
            run_op(
                nested.clone(),
                json!({"address": {"city": "Oslo", "zip": "1"}})
            ),
            Ok(json!({"address": {"zip": "1"}, "location": {"city": "Oslo"}}))
        );
        let error =
            run_op(nested, json!({"address": {"city": "Oslo"}, "location": 3})).unwrap_err();
        assert_eq!(
            error,
            "upcast step 1->2, op 1 (move location.city): cannot set location.city: location is a number, not an object"
        );
    }

    #[test]
    fn default_sets_only_an_absent_or_null_value_and_drop_removes() {
        let default = json!({"default": {"path": "tier", "value": "standard"}});
        assert_eq!(
            run_op(default.clone(), json!({})),
            Ok(json!({"tier": "standard"}))
        );
        assert_eq!(
            run_op(default.clone(), json!({"tier": null})),
            Ok(json!({"tier": "standard"}))
        );
        assert_eq!(
            run_op(default, json!({"tier": "gold"})),
            Ok(json!({"tier": "gold"}))
        );
        assert_eq!(
            run_op(json!({"drop": "a.b"}), json!({"a": {"b": 1, "c": 2}})),
            Ok(json!({"a": {"c": 2}}))
        );
        assert_eq!(
            run_op(json!({"drop": "gone"}), json!({"a": 1})),
            Ok(json!({"a": 1}))
        );
    }

    #[test]
    fn split_and_join_turn_strings_into_members_and_back() {
        let split = json!({"split": {"from": "name", "separator": " ", "into": ["first", "last"]}});
        assert_eq!(
            run_op(split.clone(), json!({"name": "Ada King Lovelace"})),
            Ok(json!({"first": "Ada", "last": "King Lovelace"}))
        );
        assert_eq!(
            run_op(split.clone(), json!({"name": "Ada"})),
            Ok(json!({"first": "Ada"}))
        );
        assert_eq!(
            run_op(split, json!({"name": 7})).unwrap_err(),
            "upcast step 1->2, op 1 (split name): name is a number, not a string"
        );
        let join = json!({"join": {"from": ["first", "last"], "separator": " ", "to": "name"}});
        assert_eq!(
            run_op(join.clone(), json!({"first": "Ada", "last": "Lovelace"})),
            Ok(json!({"name": "Ada Lovelace"}))
        );
        assert_eq!(
            run_op(join.clone(), json!({"last": "Lovelace"})),
            Ok(json!({"name": "Lovelace"}))
        );
        assert_eq!(run_op(join.clone(), json!({"x": 1})), Ok(json!({"x": 1})));
        assert_eq!(
            run_op(join, json!({"first": "Ada", "last": ["L"]})).unwrap_err(),
            "upcast step 1->2, op 1 (join name): last is an array, not a string"
        );
    }

    #[test]
    fn compute_evaluates_cel_over_the_payload_so_far_and_the_envelope() {
        let compute =
            json!({"compute": {"path": "countryCode", "expr": "payload.country.upperAscii()"}});
        assert_eq!(
            run_op(compute.clone(), json!({"country": "gb"})),
            Ok(json!({"country": "gb", "countryCode": "GB"}))
        );
        assert!(
            run_op(compute, json!({"other": 1}))
                .unwrap_err()
                .starts_with("upcast step 1->2, op 1 (compute countryCode): "),
        );
        let envelope = json!({"compute": {"path": "key", "expr": "aggregateId + ':' + string(payload.n * 2)"}});
        assert_eq!(
            run_op(envelope, json!({"n": 21})),
            Ok(json!({"key": "a:42", "n": 21}))
        );
        let structured = json!({"compute": {"path": "meta", "expr": "{'tags': [payload.a.lowerAscii()], 'ok': true}"}});
        assert_eq!(
            run_op(structured, json!({"a": "X"})),
            Ok(json!({"a": "X", "meta": {"tags": ["x"], "ok": true}}))
        );
    }

    fn athletes() -> Upcast {
        config(json!({"steps": [
            {"from": 1, "ops": [
                {"rename": {"from": "name", "to": "displayName"}},
                {"compute": {"path": "countryCode", "expr": "payload.country.upperAscii()"}},
                {"drop": "country"}
            ]},
            {"from": 2, "ops": [{"default": {"path": "tier", "value": "standard"}}]}
        ]}))
        .build()
        .unwrap()
    }

    #[test]
    fn events_walk_the_steps_from_their_version_and_latest_ones_pass_unchanged() {
        let mut stage = athletes();
        let mut out = Outcomes::default();
        let v3 = event(
            2,
            Some(3),
            json!({"displayName": "Ada", "countryCode": "GB", "tier": "gold"}),
        );
        let v3_shared = v3.event.clone();
        let kept = stage.process(
            vec![
                event(0, Some(1), json!({"name": "Ada", "country": "gb"})),
                event(
                    1,
                    Some(2),
                    json!({"displayName": "Ada", "countryCode": "GB"}),
                ),
                v3,
                event(
                    3,
                    None,
                    json!({"displayName": "Ada", "countryCode": "GB", "tier": "gold"}),
                ),
                event(4, Some(1), Value::Null),
            ],
            &entries(5),
            &mut out,
        );
        assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
        let payloads: Vec<_> = kept
            .iter()
            .map(|r| r.event.payload.clone().unwrap_or(Value::Null))
            .collect();
        assert_eq!(
            payloads[0],
            json!({"displayName": "Ada", "countryCode": "GB", "tier": "standard", "_schema_version": 1})
        );
        assert_eq!(
            payloads[1],
            json!({"displayName": "Ada", "countryCode": "GB", "tier": "standard", "_schema_version": 2})
        );
        assert_eq!(
            payloads[2],
            json!({"displayName": "Ada", "countryCode": "GB", "tier": "gold", "_schema_version": 3})
        );
        assert_eq!(
            payloads[3]["_schema_version"],
            json!(3),
            "no schemaVersion = latest"
        );
        assert_eq!(payloads[4], Value::Null, "tombstones pass untouched");
        assert!(kept[..4].iter().all(|r| r.event.schema_version == Some(3)));
        // Copy on write: the shared envelope another branch holds is not changed.
        assert_eq!(
            v3_shared
                .payload
                .as_ref()
                .unwrap()
                .get(SCHEMA_VERSION_FIELD),
            None
        );
    }

    #[test]
    fn a_newer_version_dead_letters_passes_or_halts_as_configured() {
        let newer = || event(0, Some(4), json!({"displayName": "Ada"}));
        let mut out = Outcomes::default();
        assert!(
            athletes()
                .process(vec![newer()], &entries(1), &mut out)
                .is_empty()
        );
        assert_eq!(
            out.dead_letters,
            vec![(0, DeadLetterReason::StageRejected {
                message: "schemaVersion 4 is newer than the latest version this upcast knows (3); add a step `from: 3`".into()
            })]
        );
        let older = event(1, Some(0), json!({}));
        let mut out = Outcomes::default();
        athletes().process(vec![older], &entries(2), &mut out);
        assert_eq!(out.dead_letters[0].0, 1);

        let with = |mode: &str| {
            let mut c = config(
                json!({"steps": [{"from": 1, "ops": [{"drop": "x"}]}, {"from": 2, "ops": [{"drop": "y"}]}]}),
            );
            c.on_newer_version = serde_json::from_value(json!(mode)).unwrap();
            c.build().unwrap()
        };
        let mut out = Outcomes::default();
        let kept = with("pass").process(vec![newer()], &entries(1), &mut out);
        assert_eq!(kept[0].event.schema_version, Some(4));
        assert_eq!(
            kept[0].event.payload.as_ref().unwrap()[SCHEMA_VERSION_FIELD],
            json!(4)
        );
        let mut out = Outcomes::default();
        assert!(
            with("fail")
                .process(vec![newer()], &entries(1), &mut out)
                .is_empty()
        );
        assert_eq!(
            out.halt,
            Some("entry 1-0: schemaVersion 4 is newer than the latest version this upcast knows (3); add a step `from: 3`".into())
        );
        assert!(out.dead_letters.is_empty());
    }

    #[test]
    fn check_reports_gaps_bad_paths_and_cel_that_does_not_compile() {
        let problems = config(json!({"steps": [
            {"from": 1, "ops": [{"rename": {"from": "a.b", "to": "c"}}]},
            {"from": 3, "ops": [{"compute": {"path": "x", "expr": "payload.a +"}}, {"drop": "a..b"}]},
            {"from": 4, "ops": [{"split": {"from": "a", "separator": " ", "into": ["b"]}}]}
        ]}))
        .check();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "steps.1.from",
                "steps.0.ops.0.rename",
                "steps.1.ops.0.compute.expr",
                "steps.1.ops.1.drop",
                "steps.2.ops.0.split"
            ]
        );
        assert!(
            problems[0]
                .message
                .starts_with("expected from: 2 after the step from 1")
        );
        assert!(problems[2].message.starts_with("invalid CEL expression"));
        assert_eq!(config(json!({"steps": []})).check()[0].key, "steps");
        let unknown = serde_json::from_value::<UpcastConfig>(
            json!({"steps": [{"from": 1, "ops": [{"uppercase": "a"}]}]}),
        )
        .unwrap_err();
        assert!(
            unknown.to_string().contains("unknown variant `uppercase`"),
            "{unknown}"
        );
    }

    #[test]
    fn decode_keeps_the_older_members_the_ops_read() {
        let precise = config(json!({"steps": [{"from": 1, "ops": [
            {"rename": {"from": "name", "to": "displayName"}},
            {"move": {"from": "address.city", "to": "city"}},
            {"join": {"from": ["first", "last"], "separator": " ", "to": "full"}},
            {"default": {"path": "tier", "value": 1}}, {"drop": "legacy"}
        ]}]}));
        assert_eq!(
            precise.payload_reads(false),
            PayloadSelection::only(["name", "address", "first", "last"])
        );
        assert_eq!(
            athletes_config().payload_reads(false),
            PayloadSelection::All
        );
    }

    fn athletes_config() -> UpcastConfig {
        config(
            json!({"steps": [{"from": 1, "ops": [{"compute": {"path": "c", "expr": "payload.a"}}]}]}),
        )
    }
}
