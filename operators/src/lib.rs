//! ecst stages and sinks: the pieces a pipeline file wires into a DAG.
//!
//! # Layout
//!
//! - [`record`]: what flows between stages ([`Record`], [`Action`]) and what a batch reports
//!   besides its records ([`Outcomes`]).
//! - [`stage`]: the two small traits every component implements ([`Stage`] for synchronous
//!   batch transforms, [`Sink`] for the async leaves) and the closed registry [`StageConfig`].
//! - [`stages`]: `decode`, `version_filter`, `tombstone`, `project`, one file each.
//! - [`sinks`]: the `redis_hash` and `postgres` sinks.
//! - [`postgres_tls`]: Postgres URLs with libpq's `sslmode` options, over rustls.
//! - [`replica`]: reading a replica back for reconciliation ([`replica::Replica`]).
//! - [`duration`]: the `500ms` / `2s` / `7d` durations config files use.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod dead_letter;
pub mod duration;
pub mod postgres_tls;
pub mod record;
pub mod redis_pool;
pub mod replica;
pub mod secret;
pub mod sinks;
pub mod stage;
pub mod stages;

pub use dead_letter::DeadLetterReason;
pub use duration::ConfigDuration;
pub use record::{Action, DropReason, Outcomes, RawEntry, Record};
pub use secret::SecretUrl;
pub use stage::{
    BuildContext, BuildError, BuiltStage, Sink, SinkError, SinkReport, Stage, StageConfig,
};
