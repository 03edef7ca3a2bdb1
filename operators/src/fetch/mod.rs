//! A client for the snapshot contract's single-entity reads, with the resilience an HTTP
//! dependency of a worker needs.
//!
//! # The contract
//!
//! - `GET {base}/{entity}/{id}` → 200 one row, or 404 when the entity has no such id.
//! - `POST {base}/{entity}:batch` with `{"ids": [...]}` → 200 the rows found, as NDJSON or a
//!   JSON array; an id that is absent is missing (404 each). More ids than the server takes is
//!   413 (or 400).
//! - A row is `{"aggregateId": "…", "aggregateVersion": N, "payload": {…}}`, optionally with
//!   `"occurredAt"`: the shape of the NDJSON snapshot pages.
//! - `Authorization: Bearer <token>` when the client has a token.
//!
//! # API
//!
//! ```text
//! let client = FetchClient::new(FetchOptions { url, ..FetchOptions::default() })?;
//! let states: Vec<FetchedState> = client.fetch_batch("athlete", &ids).await?;
//! ```
//!
//! [`FetchClient::fetch_batch`] splits the ids into requests of at most
//! [`FetchOptions::max_batch`] ids, runs at most [`FetchOptions::concurrency`] at once, retries
//! each (timeouts, connection errors, 5xx, 429) up to [`FetchOptions::retries`] times with
//! capped exponential backoff, and answers one [`FetchedState`] per distinct id asked. A
//! [`FetchError`] says the endpoint cannot answer now ([`FetchError::is_retryable`]: the caller
//! holds its batch and tries later) or refuses the request (a 401, a 413: a configuration to
//! fix). A circuit breaker fails requests fast while the endpoint keeps failing. What each
//! endpoint did is counted in its [`EndpointStats`], which the worker's metrics render.

mod breaker;
mod client;
mod stats;

pub use breaker::{Breaker, BreakerState};
pub use client::{FetchClient, FetchError, FetchOptions, FetchedState};
pub use stats::{EndpointStats, FetchOutcome, endpoints, unavailable_endpoints};
