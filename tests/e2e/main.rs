//! End-to-end tests: the real `ecst` binary against a real Redis.

mod auth;
mod bootstrap;
mod chaos;
mod cluster;
mod cluster_reconcile;
mod common;
mod deploy;
mod fanout;
mod faults;
mod observe;
mod orphans;
mod partition_leases;
mod partition_routing;
mod poison;
mod reconcile;
mod relay;
mod replicate;
mod secrets;
mod servers;
mod snapshot;
mod snapshot_nulls;
mod tls;
mod traces;
mod upcast;
mod validate;
mod verdict;
