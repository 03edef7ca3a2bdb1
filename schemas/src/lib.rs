//! ecst wire types: the event envelope every producer writes and every pipeline reads.
//!
//! # Layout
//!
//! - [`envelope`]: the canonical [`Envelope`] and the [`EnvelopeKeys`] mapping that reads foreign
//!   shapes into it.
//! - [`partition`]: the partition of an event and the key of each partition of a stream.
//! - [`registry`]: the payload schemas of each aggregate type by version and each stream's
//!   spec, built from the files of a schema directory.
//! - [`wire`]: stream entry field names, content types and body decoding with hostile-input limits.
//!
//! This crate does no I/O.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod envelope;
pub mod partition;
pub mod registry;
pub mod selection;
pub mod wire;

pub use envelope::{Envelope, EnvelopeError, EnvelopeKeys, EnvelopePath, Members};
pub use registry::{Compatibility, SchemaProblem, SchemaRegistry, StreamSpec};
pub use selection::PayloadSelection;
pub use wire::{BodyLimits, ContentType, WireError};
