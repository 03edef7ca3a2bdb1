//! The `bootstrap:` section of a pipeline: where the snapshot comes from and when to use it.

use std::time::Duration;

use ecst_operators::postgres_tls::parse_postgres_url;
use ecst_operators::{ConfigDuration, SecretUrl};
use serde::Deserialize;

/// What to do when the group has missed entries that are no longer in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnGap {
    /// Bootstrap again from the snapshot (the default).
    Bootstrap,
    /// Stop the worker with an error.
    Fail,
}

/// The `bootstrap:` section of a pipeline: where the snapshot comes from and when to use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// The NDJSON snapshot endpoint of the entity (`http://athletes:8081/snapshot/athletes`).
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// Environment variable with the endpoint's bearer token.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Or: the source database...
    #[serde(default)]
    pub postgres: Option<SecretUrl>,
    /// ...and a query returning (id as text, version, payload jsonb[, occurred_at
    /// timestamptz]) ordered by id, with `$1` = after (text, NULL on the first page) and `$2`
    /// = limit.
    #[serde(default)]
    pub query: Option<String>,
    /// Rows per page (default 1000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Bootstrap when the group does not exist yet (default true).
    #[serde(default = "default_true")]
    pub on_new_group: bool,
    /// `bootstrap` (default) or `fail` when the group missed trimmed entries.
    #[serde(default = "default_on_gap")]
    pub on_gap: OnGap,
    /// How long a bootstrapping worker's lease lasts without renewal (default 30s).
    #[serde(default = "default_lease")]
    pub lease: ConfigDuration,
    /// Bound on each page request (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
}

fn default_page_size() -> u32 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_on_gap() -> OnGap {
    OnGap::Bootstrap
}
fn default_lease() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}

impl BootstrapConfig {
    /// Problems as (key, message).
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match (&self.url, &self.postgres, &self.query) {
            (Some(url), None, None) => {
                if !(url.expose().starts_with("http://") || url.expose().starts_with("https://")) {
                    problems.push(("url", format!("`{url}` is not an http(s) URL")));
                }
            }
            (None, Some(pg), Some(query)) => {
                if let Err(e) = parse_postgres_url(pg.expose()) {
                    problems.push(("postgres", format!("{pg}: {e}")));
                }
                if !(query.contains("$1") && query.contains("$2")) {
                    problems.push((
                        "query",
                        "the query must use $1 (after, text or NULL) and $2 (limit)".into(),
                    ));
                }
            }
            (None, Some(_), None) => problems.push(("query", "`postgres` needs a `query`".into())),
            (None, None, Some(_)) => problems.push(("postgres", "`query` needs `postgres`".into())),
            _ => problems.push((
                "url",
                "give the snapshot endpoint's `url`, or `postgres` and `query`".into(),
            )),
        }
        if self.bearer_token_env.is_some() && self.url.is_none() {
            problems.push(("bearer_token_env", "only applies to `url`".into()));
        }
        if !(1..=10_000).contains(&self.page_size) {
            problems.push(("page_size", "must be between 1 and 10000".into()));
        }
        if self.lease.0 < Duration::from_secs(1) {
            problems.push(("lease", "must be at least 1s".into()));
        }
        problems
    }
}
