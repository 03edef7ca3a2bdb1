//! `ecst snapshot serve` against the real Postgres, over real HTTP.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

struct Server {
    worker: Worker,
    base: String,
    table: String,
    empty: String,
}

fn table_name(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("e2e_snap_{label}_{}_{nanos}", std::process::id())
}

/// A table of `rows` athletes, an empty one, and a server for both (and a query entity).
fn serve(label: &str, rows: i64, token: Option<&str>) -> Server {
    let pg = postgres();
    let table = table_name(label);
    let empty = format!("{table}_empty");
    pg.execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL, display_name text,
                               status text, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE {empty} (id text PRIMARY KEY, version bigint NOT NULL);"
    ));
    pg.query(
        &format!(
            "INSERT INTO {table} (id, version, display_name, status)
             SELECT g, g % 7 + 1, 'athlete ' || g, CASE WHEN g % 3 = 0 THEN 'retired' ELSE 'active' END
             FROM generate_series(1, $1::bigint) g"
        ),
        &[&rows],
    );
    let auth = token.map_or(String::new(), |_| {
        "bearer_token_env: E2E_SNAPSHOT_TOKEN\n".into()
    });
    let file = pipeline_file(
        "snapshot",
        &format!(
            r#"listen: 127.0.0.1:0
postgres: "{url}"
{auth}max_limit: 5000
entities:
  athletes:
    table: {table}
    payload: {{ athleteId: id, displayName: display_name, status: status }}
  nobody:
    table: {empty}
  active:
    query: >-
      SELECT id::text AS aggregate_id, version, jsonb_build_object('status', status) FROM {table}
      WHERE status = 'active' AND ($1::text IS NULL OR id > $1::text::bigint) ORDER BY id LIMIT $2
"#,
            url = database_url()
        ),
    );
    let mut cmd = ecst();
    cmd.args(["snapshot", "serve"]).arg(&file);
    if let Some(token) = token {
        cmd.env("E2E_SNAPSHOT_TOKEN", token);
    }
    let worker = Worker::spawn(cmd);
    let port = worker.listen_port("Snapshot server listening.");
    let base = format!("http://127.0.0.1:{port}");
    let health = format!("{base}/healthz");
    wait_until(
        Duration::from_secs(20),
        "the snapshot server to answer",
        || reqwest::blocking::get(&health).is_ok_and(|r| r.status().is_success()),
    );
    Server {
        worker,
        base,
        table,
        empty,
    }
}

impl Server {
    fn get(&self, path: &str, token: Option<&str>) -> (u16, String, String) {
        let client = reqwest::blocking::Client::new();
        let mut request = client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().expect("GET");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        (status, content_type, response.text().expect("body"))
    }

    fn stop(self) -> String {
        let pg = postgres();
        pg.execute(&format!("DROP TABLE {}, {}", self.table, self.empty));
        let (status, log) = self.worker.terminate();
        assert!(status.success(), "{log}");
        log
    }
}

fn lines(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Pages through an entity the way bootstrap does; returns every line.
fn page_through(server: &Server, entity: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => format!("/snapshot/{entity}?limit={limit}"),
            Some(a) => format!("/snapshot/{entity}?after={a}&limit={limit}"),
        };
        let (status, content_type, body) = server.get(&path, None);
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(content_type, "application/x-ndjson");
        let page = lines(&body);
        assert!(page.len() <= limit);
        let Some(last) = page.last() else { break };
        after = Some(last["aggregateId"].as_str().expect("id").to_string());
        all.extend(page);
    }
    all
}

#[test]
fn pages_cover_every_row_once_in_id_order() {
    let server = serve("paging", 10_000, None);
    let all = page_through(&server, "athletes", 3333);
    assert_eq!(all.len(), 10_000);
    for (i, line) in all.iter().enumerate() {
        let id = i as i64 + 1;
        assert_eq!(
            *line,
            json!({"aggregateId": id.to_string(), "aggregateVersion": id % 7 + 1,
                   "payload": {"athleteId": id, "displayName": format!("athlete {id}"),
                               "status": if id % 3 == 0 { "retired" } else { "active" }}}),
        );
    }
    let active = page_through(&server, "active", 1000);
    assert_eq!(active.len(), 10_000 - 10_000 / 3);
    let (status, _, body) = server.get("/snapshot/athletes/count", None);
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).expect("JSON")),
        (200, json!({"count": 10_000}))
    );
    server.stop();
}

#[test]
fn empty_unknown_and_bad_requests_answer_clearly() {
    let server = serve("errors", 10, None);
    let (status, _, body) = server.get("/snapshot/nobody", None);
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, content_type, body) = server.get("/snapshot/nope", None);
    assert_eq!(status, 404);
    assert_eq!(content_type, "application/json");
    assert!(body.contains("no entity `nope`"), "{body}");
    for (path, says) in [
        ("/snapshot/athletes?after=abc", "not a valid bigint id"),
        ("/snapshot/athletes?limit=0", "limit must be"),
        ("/snapshot/athletes?limit=5001", "limit must be"),
        ("/snapshot/athletes?limit=ten", "limit must be"),
        ("/snapshot/active?after=abc", "invalid after"),
    ] {
        let (status, _, body) = server.get(path, None);
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }
    let (status, _, body) = server.get("/snapshot/athletes?after=8", None);
    assert_eq!(status, 200);
    let ids: Vec<Value> = lines(&body)
        .iter()
        .map(|l| l["aggregateId"].clone())
        .collect();
    assert_eq!(ids, [json!("9"), json!("10")]);
    server.stop();
}

#[test]
fn a_bearer_token_is_required_when_configured() {
    let server = serve("auth", 5, Some("s3cret-token"));
    let (status, _, _) = server.get("/snapshot/athletes", None);
    assert_eq!(status, 401);
    let (status, _, _) = server.get("/snapshot/athletes", Some("wrong-token!"));
    assert_eq!(status, 401);
    let (status, _, body) = server.get("/snapshot/athletes", Some("s3cret-token"));
    assert_eq!(status, 200);
    assert_eq!(lines(&body).len(), 5);
    let log = server.stop();
    assert!(!log.contains("s3cret-token"), "the token was logged");
}

#[test]
fn a_missing_table_or_column_refuses_to_start() {
    let file: PathBuf = pipeline_file(
        "snapshot",
        &format!(
            "listen: 127.0.0.1:0\npostgres: \"{}\"\nentities:\n  athletes:\n    table: no_such_table_here\n",
            database_url()
        ),
    );
    let mut cmd = ecst();
    cmd.args(["snapshot", "serve"]).arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("entities.athletes.table: table public.no_such_table_here does not exist"),
        "{err}"
    );
}
