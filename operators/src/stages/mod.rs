//! The transform stages, one file each.

pub mod claim_check;
pub mod decode;
pub mod delta;
pub mod fetch;
pub mod project;
pub mod tombstone;
pub mod upcast;
pub mod validate;
pub mod version_filter;
