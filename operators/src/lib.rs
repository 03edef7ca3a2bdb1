//! ecst stages and sinks: the pieces a pipeline file wires into a DAG.
//!
//! # Layout
//!
//! - [`record`]: what flows between stages ([`Record`], [`Action`]) and what a batch reports
//!   besides its records ([`Outcomes`]).
//! - [`stage`]: the small traits every component implements ([`Stage`] for synchronous batch
//!   transforms, [`AsyncStage`] for those that wait on a service, [`Sink`] for the async leaves, [`stage::ComponentConfig`] for their configs).
//! - [`registry`]: the closed set of stage types, each named once ([`StageConfig`]).
//! - [`dead_letter`]: why an entry was dead-lettered ([`DeadLetterReason`]).
//! - [`error`]: [`SinkError`] and [`BuildError`].
//! - [`stages`]: `decode`, `version_filter`, `tombstone`, `project`, `fetch`, ..., one file each.
//! - [`sinks`]: the `redis_hash` and `postgres` sinks.
//! - [`fetch`]: a client of the snapshot contract's single-entity reads (timeout, retries,
//!   circuit breaker, concurrency limit, per-endpoint stats).
//! - [`postgres_tls`]: Postgres URLs with libpq's `sslmode` options, over rustls.
//! - [`replica`]: reading a replica back for reconciliation ([`replica::Replica`]).
//! - [`redis_pool`]: Redis connections (one server or a cluster; the redis crate's, and the
//!   stream reader's own), their URLs (TLS, credentials, `redis+cluster://`) and pool, and how
//!   a Redis failure is classified.
//! - [`claim`]: claim stores for payloads too large for the stream ([`claim::ClaimStore`],
//!   [`claim::RedisClaimStore`]).
//! - [`secret`]: connection strings that never print their passwords.
//! - [`duration`]: the `500ms` / `2s` / `7d` durations config files use.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod claim;
pub mod dead_letter;
pub mod duration;
pub mod error;
pub mod fetch;
pub mod postgres_tls;
pub mod record;
pub mod redis_pool;
pub mod registry;
pub mod replica;
pub mod secret;
pub mod sinks;
pub mod stage;
pub mod stages;

pub use dead_letter::DeadLetterReason;
pub use duration::ConfigDuration;
pub use error::{BuildError, SinkError};
pub use record::{Action, DropReason, FieldNames, Fields, Outcomes, RawEntry, Record};
pub use registry::StageConfig;
pub use secret::SecretUrl;
pub use stage::{
    AsyncStage, BuildContext, BuiltStage, PayloadPath, ReplicaFreshness, Sink, SinkReport, Stage,
};
