//! End-to-end tests: the real `ecst` binary against a real Redis.

mod auth;
mod bootstrap;
mod common;
mod deploy;
mod fanout;
mod faults;
mod observe;
mod orphans;
mod private_redis;
mod reconcile;
mod relay;
mod replicate;
mod snapshot;
mod snapshot_nulls;
mod tls;
mod traces;
mod validate;
mod verdict;
