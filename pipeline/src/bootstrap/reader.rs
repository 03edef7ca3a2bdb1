//! Snapshot pages: from the NDJSON snapshot endpoint or a query against the source database,
//! turned into the records the pipeline's root stages would have produced.

use std::time::Duration;

use ecst_operators::postgres_tls::parse_postgres_url;
use ecst_operators::{DeadLetterReason, Outcomes, RawEntry, Record, SecretUrl};
use ecst_schemas::EnvelopeKeys;
use ecst_schemas::wire::FIELD_BODY;
use serde_json::{Value, json};

use crate::config::BootstrapConfig;

/// One page source: the HTTP endpoint or a query.
pub(crate) enum SnapshotReader {
    Http {
        client: reqwest::Client,
        url: SecretUrl,
        token: Option<String>,
    },
    Postgres {
        target: Box<ecst_operators::postgres_tls::PgTarget>,
        query: String,
        client: Option<tokio_postgres::Client>,
    },
}

impl SnapshotReader {
    pub(crate) fn new(config: &BootstrapConfig) -> Result<Self, String> {
        if let Some(url) = &config.url {
            let token = match &config.bearer_token_env {
                None => None,
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    format!("bootstrap.bearer_token_env: the environment variable {var} is not set")
                })?),
            };
            let client = reqwest::Client::builder()
                .timeout(config.timeout.0)
                .connect_timeout(config.timeout.0)
                .build()
                .map_err(|e| format!("bootstrap: cannot build the HTTP client: {e}"))?;
            return Ok(SnapshotReader::Http {
                client,
                url: SecretUrl::new(url.expose().trim_end_matches('/')),
                token,
            });
        }
        let (Some(pg), Some(query)) = (&config.postgres, &config.query) else {
            return Err("bootstrap: give `url`, or `postgres` and `query`".into());
        };
        let mut target =
            parse_postgres_url(pg.expose()).map_err(|e| format!("bootstrap.postgres {pg}: {e}"))?;
        target.config.connect_timeout(config.timeout.0);
        if target.config.get_application_name().is_none() {
            target.config.application_name("ecst-bootstrap");
        }
        Ok(SnapshotReader::Postgres {
            target: Box::new(target),
            query: query.clone(),
            client: None,
        })
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            SnapshotReader::Http { url, .. } => url.to_string(),
            SnapshotReader::Postgres { .. } => "the bootstrap query".into(),
        }
    }

    /// The source's row count, when it tells.
    pub(crate) async fn count(&self) -> Option<u64> {
        let SnapshotReader::Http { client, url, token } = self else {
            return None;
        };
        let mut request = client.get(format!("{}/count", url.expose()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let body = request.send().await.ok()?.bytes().await.ok()?;
        serde_json::from_slice::<Value>(&body)
            .ok()?
            .get("count")?
            .as_u64()
    }

    /// One page of NDJSON lines after `after`.
    pub(crate) async fn page(
        &mut self,
        after: Option<&str>,
        limit: u32,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, String> {
        match self {
            SnapshotReader::Http { client, url, token } => {
                let mut request = client
                    .get(url.expose())
                    .query(&[("limit", limit.to_string())]);
                if let Some(after) = after {
                    request = request.query(&[("after", after)]);
                }
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {}", e.without_url()))?;
                let status = response.status();
                // A body cut short (the server died mid-page) is an error here, not a page.
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("GET {url}: reading the page: {}", e.without_url()))?;
                if !status.is_success() {
                    return Err(format!(
                        "GET {url}: {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(500)]).trim()
                    ));
                }
                Ok(body
                    .split(|b| *b == b'\n')
                    .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                    .map(<[u8]>::to_vec)
                    .collect())
            }
            SnapshotReader::Postgres {
                target,
                query,
                client,
            } => {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    let (c, connection) =
                        tokio::time::timeout(timeout, target.config.connect(target.tls.clone()))
                            .await
                            .map_err(|_| "connecting to the source timed out".to_string())?
                            .map_err(|e| format!("connecting to the source: {e}"))?;
                    tokio::spawn(connection);
                    *client = Some(c);
                }
                let Some(c) = client.as_ref() else {
                    return Err("no source connection".into());
                };
                let after = after.map(str::to_string);
                let limit = i64::from(limit);
                let rows =
                    tokio::time::timeout(timeout, c.query(query.as_str(), &[&after, &limit]))
                        .await
                        .map_err(|_| "the bootstrap query timed out".to_string())?
                        .map_err(|e| format!("the bootstrap query failed: {e}"))?;
                rows.iter()
                    .map(|row| {
                        let id: Option<String> = row.try_get(0).map_err(|e| e.to_string())?;
                        let version: Option<i64> = row.try_get(1).map_err(|e| e.to_string())?;
                        let payload: Option<Value> = row.try_get(2).map_err(|e| e.to_string())?;
                        let mut line = json!({
                            "aggregateId": id, "aggregateVersion": version, "payload": payload
                        });
                        if row.len() > 3 {
                            let at: Option<time::OffsetDateTime> =
                                row.try_get(3).map_err(|e| e.to_string())?;
                            if let Some(at) = at {
                                line["occurredAt"] = Value::String(
                                    ecst_schemas::envelope::format_timestamp(at),
                                );
                            }
                        }
                        serde_json::to_vec(&line).map_err(|e| e.to_string())
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| {
                        format!("the bootstrap query must return (text id, bigint version, jsonb payload): {e}")
                    })
            }
        }
    }
}

/// Snapshot lines as the records the root stages would have produced, with stand-in entries
/// for dead-letters. Returns the cursor for the next page (the last line's `aggregateId`).
pub(crate) fn page_records(
    lines: Vec<Vec<u8>>,
    outcomes: &mut Outcomes,
) -> Result<(Vec<RawEntry>, Vec<Record>, String), String> {
    let keys = EnvelopeKeys::default();
    let mut entries = Vec::with_capacity(lines.len());
    let mut records = Vec::with_capacity(lines.len());
    let mut cursor = None;
    for (index, line) in lines.into_iter().enumerate() {
        let parsed: Result<Value, String> =
            serde_json::from_slice(&line).map_err(|e| format!("snapshot line is not JSON: {e}"));
        let id = parsed
            .as_ref()
            .ok()
            .and_then(|v| match v.get("aggregateId") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            });
        cursor = id.clone();
        entries.push(RawEntry {
            id: format!("snapshot:{}", id.as_deref().unwrap_or("?")),
            fields: vec![(FIELD_BODY.to_string(), line)],
        });
        match parsed.and_then(|v| {
            keys.read_owned(v)
                .map_err(|e| format!("snapshot line: {e}"))
        }) {
            Ok(envelope) => records.push(Record::new(index, envelope)),
            Err(reason) => {
                outcomes.dead_letter(index, DeadLetterReason::InvalidSnapshotRow(reason))
            }
        }
    }
    let cursor = cursor.ok_or_else(|| {
        "the last line of the page has no aggregateId; the next page cannot be asked for"
            .to_string()
    })?;
    Ok((entries, records, cursor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lines_become_records_and_bad_lines_dead_letters() {
        let mut outcomes = Outcomes::default();
        let lines = vec![
            br#"{"aggregateId":"a1","aggregateVersion":3,"payload":{"status":"active"}}"#.to_vec(),
            b"not json".to_vec(),
            br#"{"aggregateId":"a3","aggregateVersion":1,"payload":null}"#.to_vec(),
        ];
        let (entries, records, cursor) = page_records(lines, &mut outcomes).unwrap();
        assert_eq!(cursor, "a3");
        assert_eq!(entries.len(), 3);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].event.aggregate_version, 3);
        assert!(records[1].event.is_tombstone());
        assert_eq!(outcomes.dead_letters.len(), 1);
        assert_eq!(outcomes.dead_letters[0].0, 1);
    }

    #[test]
    fn a_page_whose_last_line_has_no_id_stops_paging() {
        let mut outcomes = Outcomes::default();
        let err = page_records(vec![b"{}".to_vec()], &mut outcomes).unwrap_err();
        assert!(err.contains("no aggregateId"), "{err}");
    }
}
