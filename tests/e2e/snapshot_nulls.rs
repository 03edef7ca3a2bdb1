//! `ecst snapshot serve` over a hand-made table that allows NULL ids and versions: the page
//! is answered without them breaking it, and the server keeps serving.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// Starts `snapshot serve` for `yaml` (with `{port}` in it) on a random port, trying another
/// if that one is taken; returns the server and its base URL.
fn serve_on_a_free_port(yaml: &str) -> (Worker, String) {
    for _ in 0..10 {
        let port: u16 = rand::random_range(20_000..60_000);
        let file = pipeline_file("snapshot-nulls", &yaml.replace("{port}", &port.to_string()));
        let mut cmd = ecst();
        cmd.args(["snapshot", "serve"]).arg(&file);
        let mut worker = Worker::spawn(cmd);
        let base = format!("http://127.0.0.1:{port}");
        let health = format!("{base}/healthz");
        wait_until(
            Duration::from_secs(20),
            "the server to answer or exit",
            || {
                !worker.is_running()
                    || reqwest::blocking::get(&health).is_ok_and(|r| r.status().is_success())
            },
        );
        if worker.is_running() {
            return (worker, base);
        }
        let log = worker.log();
        assert!(log.contains("in use"), "the server exited:\n{log}");
    }
    panic!("no free port in 10 tries");
}

#[test]
fn null_ids_and_versions_do_not_break_a_page() {
    let pg = postgres();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let table = format!("e2e_snapnull_{}_{nanos}", std::process::id());
    pg.execute(&format!(
        "CREATE TABLE {table} (id text, version bigint, name text);
         INSERT INTO {table} VALUES ('a1', 1, 'one'), ('a2', NULL, 'two'), (NULL, 3, 'three');"
    ));
    let yaml = format!(
        "listen: 127.0.0.1:{{port}}\npostgres: \"{url}\"\nentities:\n  athletes:\n    table: {table}\n    payload: {{ name: name }}\n",
        url = database_url()
    );
    let (mut server, base) = serve_on_a_free_port(&yaml);
    let response =
        reqwest::blocking::get(format!("{base}/snapshot/athletes?limit=10")).expect("GET");
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text().expect("body");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let shown: Vec<(Value, Value)> = lines
        .iter()
        .map(|l| (l["aggregateId"].clone(), l["aggregateVersion"].clone()))
        .collect();
    // The NULL id is left out (the page could not be continued after it); the NULL version
    // is passed on, for the consumer to dead-letter under its id.
    assert_eq!(
        shown,
        [
            (Value::from("a1"), Value::from(1)),
            (Value::from("a2"), Value::Null)
        ],
        "{body}"
    );
    let health = reqwest::blocking::get(format!("{base}/healthz")).expect("GET");
    assert!(health.status().is_success());
    assert!(server.is_running());
    let (status, log) = server.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("NULL id"), "{log}");
    pg.execute(&format!("DROP TABLE {table}"));
}
