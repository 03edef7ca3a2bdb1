//! End-to-end tests: the real `ecst` binary against a real Redis.

mod bootstrap;
mod chaos;
mod common;
mod deploy;
mod fanout;
mod faults;
mod observe;
mod reconcile;
mod relay;
mod replicate;
mod servers;
mod snapshot;
mod traces;
mod validate;
