//! End-to-end tests: the real `ecst` binary against a real Redis.

mod bootstrap;
mod common;
mod deploy;
mod fanout;
mod faults;
mod observe;
mod poison;
mod reconcile;
mod relay;
mod replicate;
mod secrets;
mod snapshot;
mod traces;
mod validate;
mod verdict;
