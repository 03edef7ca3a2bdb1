//! End-to-end tests: the real `ecst` binary against a real Redis.

mod common;
mod fanout;
mod faults;
mod replicate;
mod validate;
