//! ecst pipelines: YAML loading, the stage DAG, the Redis Streams source, the run loop and
//! the benchmark behind the `ecst` binary.
//!
//! # Layout
//!
//! - [`config`]: pipeline files, with every error positioned.
//! - [`graph`]: DAG checks, order and rendering.
//! - [`source`]: the consumer-group reader (pending first, then new, then claims).
//! - [`preflight`]: the start-time check of Redis credentials, certificates and ACLs.
//! - [`lease`]: partition leases: which worker of a group reads which partition.
//! - [`runner`]: the worker: the read loop, batches through the [`dag`] to [`commit`].
//! - [`dag`]: the built stages and sinks, run over one batch.
//! - [`commit`]: a batch applied by every sink, dead-lettered, then acked.
//! - [`bootstrap`]: snapshots for new, reset or gapped groups; the retention-gap check.
//! - [`reconcile`]: `ecst reconcile`, replicas against the source, drift counted and repaired.
//! - [`orphans`]: replica rows no snapshot row produced, found in bounded memory.
//! - [`stats`]: a worker's counters and histograms; [`metrics`] exposes them to Prometheus,
//!   with `/healthz` and `/readyz`.
//! - [`telemetry`]: logs, and spans over OTLP with W3C trace context across the stream.
//! - [`outbox`]: the outbox table's DDL and the Rust producer API.
//! - [`relay`]: `ecst relay`, outbox rows to streams.
//! - [`partitioning`]: a stream's partitioning, recorded in Redis and checked by producers
//!   and workers.
//! - [`schema_dir`]: a schema directory read into the registry, every problem positioned.
//! - [`tap`]: `ecst tap`, workers' decisions shown live while a tap is attached.
//! - [`snapshot`]: `ecst snapshot serve`, entity state as NDJSON pages for bootstrap.
//! - [`mod@test_case`]: `ecst test`, a pipeline's cases run through its real stages and sinks.
//! - Infrastructure every part uses: [`retry`] (the one backoff policy), [`shutdown`],
//!   [`redis_reply`] (reply values and stream ids), [`error`].
//!
//! Dependencies point one way: `runner` -> `bootstrap` -> `commit` -> `dag` -> `stats`;
//! `reconcile` -> `bootstrap`'s snapshot reader; no two modules import each other.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod bootstrap;
pub mod commit;
pub mod config;
pub mod dag;
pub mod error;
mod gap_repair;
pub mod graph;
pub mod lease;
pub mod metrics;
pub mod orphans;
pub mod outbox;
pub mod partitioning;
pub mod preflight;
pub mod reconcile;
pub mod redis_reply;
pub mod relay;
pub mod retry;
pub mod runner;
pub mod schema_dir;
pub mod shutdown;
pub mod snapshot;
pub mod source;
pub mod stats;
pub mod tap;
pub mod telemetry;
pub mod test_case;
