//! ecst pipelines: YAML loading, the stage DAG, the Redis Streams source, the run loop and
//! the benchmark behind the `ecst` binary.
//!
//! # Layout
//!
//! - [`config`]: pipeline files, with every error positioned.
//! - [`graph`]: DAG checks, order and rendering.
//! - [`source`]: the consumer-group reader (pending first, then new, then claims).
//! - [`preflight`]: the start-time check of Redis credentials and ACLs.
//! - [`runner`]: batches through the DAG to the sinks, acked only after commit.
//! - [`bootstrap`]: snapshots for new, reset or gapped groups; the retention-gap check.
//! - [`reconcile`]: `ecst reconcile`, replicas against the source, drift counted and repaired.
//! - [`metrics`]: Prometheus metrics, `/healthz`, `/readyz`.
//! - [`telemetry`]: logs, and spans over OTLP with W3C trace context across the stream.
//! - [`outbox`]: the outbox table's DDL and the Rust producer API.
//! - [`relay`]: `ecst relay`, outbox rows to streams.
//! - [`snapshot`]: `ecst snapshot serve`, entity state as NDJSON pages for bootstrap.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod bootstrap;
pub mod config;
pub mod graph;
pub mod metrics;
pub mod outbox;
pub mod preflight;
pub mod reconcile;
pub mod relay;
pub mod runner;
pub mod snapshot;
pub mod source;
pub mod telemetry;
