//! ecst wire types: the event envelope every producer writes and every pipeline reads.
//!
//! # Layout
//!
//! - [`claim`]: claim-check references (`payloadRef`) to payloads stored outside the stream.
//! - [`compat`]: schema compatibility rules (Confluent's, for JSON Schema) between versions.
//! - [`envelope`]: the canonical [`Envelope`] and the [`EnvelopeKeys`] mapping that reads foreign
//!   shapes into it.
//! - [`evolution`]: what changed between two schema registries and which changes are refused.
//! - [`partition`]: the partition of an event and the key of each partition of a stream.
//! - [`registry`]: the payload schemas of each aggregate type by version and each stream's
//!   spec, built from the files of a schema directory.
//! - [`wire`]: stream entry field names, content types and body decoding with hostile-input limits.
//!
//! This crate does no I/O.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod claim;
pub mod compat;
pub mod envelope;
pub mod evolution;
pub mod partition;
pub mod registry;
pub mod selection;
pub mod wire;

pub use claim::{ClaimMismatch, ClaimRef, ClaimRefError};
pub use envelope::{Envelope, EnvelopeError, EnvelopeKeys, EnvelopePath, Members};
pub use registry::{Compatibility, SchemaProblem, SchemaRegistry, StreamSpec};
pub use selection::PayloadSelection;
pub use wire::{BodyLimits, ContentType, WireError};
