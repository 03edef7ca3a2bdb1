//! The traits every component implements: a stage transforms batches, a sink applies them,
//! and a component's config checks itself and builds the running thing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::record::{Outcomes, RawEntry, Record};
use crate::secret::SecretUrl;
use ecst_schemas::{EnvelopePath, PayloadSelection, SchemaRegistry};

pub use crate::error::{BuildError, SinkError};

/// A synchronous batch transform: records in, records out.
///
/// A root stage (`decode`) receives an empty `input` and reads the batch's raw `entries`.
pub trait Stage: Send {
    /// Processes one batch; records not returned must be reported in `out`.
    fn process(
        &mut self,
        input: Vec<Record>,
        entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record>;

    /// Forgets what earlier batches taught the stage (before a bootstrap re-applies state
    /// the stage may have seen newer versions of).
    fn reset(&mut self) {}

    /// Whether snapshot rows (full states, by definition) go through the stage too; a stage
    /// that reads events as changes says no, and they pass it untouched.
    fn reads_snapshots(&self) -> bool {
        true
    }
}

/// Future returned by [`AsyncStage::process`]: the stage's output records.
pub type ProcessFuture<'a> = Pin<Box<dyn Future<Output = Vec<Record>> + Send + 'a>>;

/// A batch transform that waits on a service (an HTTP endpoint, a claim store).
///
/// While the service is down the stage retries in place with backoff: the batch is held, so
/// nothing is acked. A worker shutting down drops the future; the batch stays pending and is
/// redelivered. Records not returned must be reported in `out`, as for [`Stage`].
pub trait AsyncStage: Send {
    /// Processes one batch.
    fn process<'a>(
        &'a mut self,
        input: Vec<Record>,
        entries: &'a [RawEntry],
        out: &'a mut Outcomes,
    ) -> ProcessFuture<'a>;

    /// Forgets what earlier batches taught the stage, as [`Stage::reset`].
    fn reset(&mut self) {}
}

/// What a sink did with one batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SinkReport {
    /// Records written.
    pub applied: usize,
    /// Records the store's version guard rejected as not newer.
    pub stale: usize,
    /// The entry indexes of the stale records the sink can name: the Redis script names each,
    /// Postgres the older versions of a key within the batch (the rest it only counts).
    pub stale_entries: Vec<usize>,
    /// Records that cannot be written (a data error the sink found itself), by entry index,
    /// with the reason.
    pub rejected: Vec<(usize, String)>,
    /// Records the store refused (a CHECK or foreign-key violation), by entry index, with
    /// what the store said.
    pub refused: Vec<(usize, String)>,
    /// Patches not applied because the replica is older than their base (a version is
    /// missing in between), by entry index: never applied over the gap, never acked as done.
    pub gaps: Vec<usize>,
}

/// Future returned by [`Sink::apply_batch`].
pub type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<SinkReport, SinkError>> + Send + 'a>>;

/// A replica's freshness as its store recorded it, Unix ms (`None`: not recorded).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaFreshness {
    /// The newest `occurredAt` applied.
    pub newest_occurred_ms: Option<i64>,
    /// The last successful apply.
    pub replicated_ms: Option<i64>,
}

/// Future returned by [`Sink::freshness`].
pub type FreshnessFuture<'a> = Pin<Box<dyn Future<Output = Option<ReplicaFreshness>> + Send + 'a>>;

/// A leaf that durably applies whole batches to a store.
pub trait Sink: Send + Sync {
    /// Applies a batch in one round trip; `Ok` means durably committed.
    fn apply_batch<'a>(&'a self, batch: &'a [Record]) -> ApplyFuture<'a>;

    /// Checks, without the store, that the record can be written: its key renders, its values
    /// convert to the replica's types, it fits the store's limits. The pipeline asks every
    /// sink of a fan-out before any of them applies, so that a record refused for its data is
    /// refused by all and the replicas never disagree over it.
    fn check_record(&self, record: &Record) -> Result<(), String> {
        let _ = record;
        Ok(())
    }

    /// The replica read back, for reconciliation; `None` if this sink cannot be read.
    fn replica(&self) -> Option<&dyn crate::replica::Replica> {
        None
    }

    /// The replica's freshness as the store recorded it, so that a restarted worker reports
    /// it before its first apply; `None` when the store cannot say (best effort, bounded by
    /// the sink's timeout).
    fn freshness(&self) -> FreshnessFuture<'_> {
        Box::pin(async { None })
    }
}

/// What a stage may need to know about its pipeline when it is built.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Pipeline name.
    pub pipeline: String,
    /// Stage name in the pipeline file.
    pub stage: String,
    /// The source's Redis URL, the default for Redis sinks.
    pub source_redis: SecretUrl,
    /// The payload members some stage of the pipeline reads: what `decode` keeps.
    pub payload_reads: PayloadSelection,
    /// The pipeline's schema directory (`schemas:`), if it names one.
    pub schemas: Option<Arc<SchemaRegistry>>,
}

/// The payload members envelope `paths` read: `All` when one is the whole payload.
pub fn payload_reads_of<'a>(paths: impl IntoIterator<Item = &'a str>) -> PayloadSelection {
    let mut members = Vec::new();
    for path in paths {
        let Some(path) = EnvelopePath::parse(path) else {
            continue;
        };
        if path.is_whole_payload() {
            return PayloadSelection::All;
        }
        members.extend(path.payload_member().map(str::to_string));
    }
    PayloadSelection::only(members)
}

/// A payload path a stage reads, and where the stage's config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadPath {
    /// Key inside the stage (dotted: `fields.display_name`, `where`, `key`).
    pub key: String,
    /// The payload members, outermost first (`payload.address.city` is `[address, city]`).
    pub members: Vec<String>,
}

impl PayloadPath {
    /// The path at `key` if the envelope path `path` reads inside the payload.
    pub fn of(key: impl Into<String>, path: &str) -> Option<Self> {
        let rest = path.strip_prefix("payload.")?;
        Some(PayloadPath {
            key: key.into(),
            members: rest.split('.').map(str::to_string).collect(),
        })
    }
}

/// A built component: a transform or a sink.
pub enum BuiltStage {
    /// A synchronous transform.
    Stage(Box<dyn Stage>),
    /// A transform that waits on a service.
    AsyncStage(Box<dyn AsyncStage>),
    /// A sink (a DAG leaf).
    Sink(Arc<dyn Sink>),
}

/// A problem in one stage's configuration, found without any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Key inside the stage (dotted), where the problem is.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigProblem {
    /// A problem at `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// One key a stage type accepts, as `ecst stages` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// The key as written in the pipeline file.
    pub name: &'static str,
    /// What it takes (`string`, `duration`, `map of column to type`, ...).
    pub value: &'static str,
    /// Its default, or `None` when the key is required.
    pub default: Option<&'static str>,
    /// What it means, in one line.
    pub meaning: &'static str,
}

impl KeyDoc {
    /// A required key.
    pub const fn required(name: &'static str, value: &'static str, meaning: &'static str) -> Self {
        KeyDoc {
            name,
            value,
            default: None,
            meaning,
        }
    }

    /// An optional key and its default.
    pub const fn optional(
        name: &'static str,
        value: &'static str,
        default: &'static str,
        meaning: &'static str,
    ) -> Self {
        KeyDoc {
            name,
            value,
            default: Some(default),
            meaning,
        }
    }
}

/// What a stage's config does: find its problems without I/O, and build the running component.
/// Each stage type implements it in its own file; the `registry` module names the type once.
pub trait ComponentConfig {
    /// Every key of the stage besides `type`, `input` and `inputs`, for `ecst stages`; the
    /// registry's tests check the list against the config struct's fields.
    const KEYS: &'static [KeyDoc];

    /// Problems found without I/O (expressions that do not compile, bad templates).
    fn problems(&self) -> Vec<ConfigProblem> {
        Vec::new()
    }

    /// The payload members the component reads from an event, given whether every record
    /// reaching it went through a `project` stage (a sink then writes the projected fields,
    /// not the payload). `All` unless the component knows better: what it leaves out is not
    /// decoded.
    fn payload_reads(&self, projected: bool) -> PayloadSelection {
        let _ = projected;
        PayloadSelection::All
    }

    /// Whether the component needs the pipeline's schema directory (`schemas:`) to build.
    fn needs_schemas(&self) -> bool {
        false
    }

    /// The payload paths the component reads, each with the key (dotted, inside the stage)
    /// that names it, so that `ecst validate` can look for them in the stream's latest schema.
    /// `projected` as for [`ComponentConfig::payload_reads`].
    fn payload_paths(&self, projected: bool) -> Vec<PayloadPath> {
        let _ = projected;
        Vec::new()
    }

    /// Builds the running component; the error says what is wrong, without the stage name.
    fn build_component(
        &self,
        ctx: &BuildContext,
    ) -> impl Future<Output = Result<BuiltStage, String>> + Send;
}
