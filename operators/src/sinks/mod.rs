//! The sinks: DAG leaves that apply batches to a replica store.

pub mod postgres;
pub mod redis_hash;
