//! Schemas: the `validate` stage dead-letters invalid payloads with their pointer and rule,
//! unknown versions follow `on_unknown_version`, `ecst validate` checks a pipeline against
//! the latest schema, and producers (`ecst publish --schemas`, the relay with `validate:
//! true`) refuse invalid events where they are made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::relay::{drop_outbox, outbox, outbox_count, relay_file, start_relay};

/// The example athlete schemas (v1..v3) in `<dir>/schemas`, with a stream file for `stream`.
fn schema_dir(dir: &Path, stream: &str) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/schemas/athlete");
    let schemas = dir.join("schemas");
    std::fs::create_dir_all(schemas.join("athlete")).expect("mkdir");
    std::fs::create_dir_all(schemas.join("streams")).expect("mkdir");
    for v in 1..=3 {
        std::fs::copy(
            examples.join(format!("v{v}.json")),
            schemas.join(format!("athlete/v{v}.json")),
        )
        .expect("copy schema");
    }
    std::fs::write(
        schemas.join(format!("streams/{stream}.yaml")),
        format!(
            "stream: \"{stream}\"\naggregate_type: athlete\npartition_key: id\ncompatibility: NONE\n"
        ),
    )
    .expect("write stream file");
    schemas
}

fn pipeline(stream: &str, prefix: &str, policy: &str) -> PathBuf {
    let file = pipeline_file(
        "schemas",
        &format!(
            r#"name: athletes
schemas: ./schemas
source:
  stream: "{stream}"
  group: replica
  block: 100ms
stages:
  decode: {{ type: decode }}
  checked: {{ type: validate, input: decode, on_unknown_version: {policy} }}
  latest: {{ type: version_filter, input: checked }}
  athlete:
    type: project
    input: latest
    fields:
      display_name: payload.displayName
      country_code: payload.countryCode
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
"#
        ),
    );
    schema_dir(file.parent().expect("temp dir"), stream);
    file
}

fn v2(id: &str, version: u64, country_code: &str) -> Value {
    json!({
        "schemaVersion": 2, "eventId": format!("{id}-{version}"), "eventType": "athlete.updated",
        "occurredAt": "2026-11-25T10:00:00Z", "aggregateType": "athlete", "aggregateId": id,
        "aggregateVersion": version,
        "payload": {"id": id, "displayName": format!("name {id}"), "countryCode": country_code,
                    "status": "active", "points": 10}
    })
}

fn with_version(mut event: Value, schema_version: i64) -> Value {
    event["schemaVersion"] = json!(schema_version);
    event
}

/// The aggregateIds of the events in `stream`, in stream order.
fn aggregate_ids(conn: &mut redis::Connection, stream: &str) -> Vec<String> {
    // An entry is a field map like a dead letter's: its body is in `v`.
    dead_letters(conn, stream)
        .into_iter()
        .map(|entry| {
            let body: Value = serde_json::from_str(&entry["v"]).expect("a JSON body");
            body["aggregateId"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

/// The dead letters of `stream` by source entry id: their `error`.
fn dead_by_id(conn: &mut redis::Connection, stream: &str) -> Vec<(String, String)> {
    dead_letters(conn, &format!("{stream}.dlq"))
        .into_iter()
        .map(|d| (d["source_id"].clone(), d["error"].clone()))
        .collect()
}

#[test]
fn invalid_payloads_and_unknown_versions_are_dead_lettered_with_their_reason() {
    let mut conn = redis();
    let stream = unique("schemas-dl");
    let prefix = format!("{stream}:");
    let file = pipeline(&stream, &prefix, "dead_letter");
    let mut missing = v2("c", 1, "FR");
    missing["payload"]
        .as_object_mut()
        .expect("payload")
        .remove("displayName");
    missing["payload"]["points"] = json!("many");
    let ids = publish(
        &mut conn,
        &stream,
        &[
            v2("a", 1, "GB"),
            v2("b", 1, "gbr"),
            missing,
            with_version(v2("d", 1, "DE"), 9),
            json!({"aggregateId": "e", "aggregateVersion": 2, "payload": null, "deleted": true}),
        ],
    );
    drain(&file);
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:a")).get("country_code"),
        Some(&"GB".to_string())
    );
    for id in ["b", "c", "d"] {
        assert!(hash(&mut conn, &format!("{prefix}athlete:{id}")).is_empty());
    }
    assert_eq!(
        dead_by_id(&mut conn, &stream),
        [
            (
                ids[1].clone(),
                r#"schema athlete/v2.json: /countryCode: "gbr" does not match "^[A-Z]{2}$""#
                    .to_string()
            ),
            (
                ids[2].clone(),
                r#"schema athlete/v2.json: /: "displayName" is a required property; /points: "many" is not of type "integer""#
                    .to_string()
            ),
            (
                ids[3].clone(),
                r#"no schema for aggregateType "athlete" schemaVersion 9"#.to_string()
            ),
        ]
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn unknown_versions_pass_under_pass() {
    let mut conn = redis();
    let stream = unique("schemas-pass");
    let prefix = format!("{stream}:");
    let file = pipeline(&stream, &prefix, "pass");
    publish(
        &mut conn,
        &stream,
        &[with_version(v2("d", 1, "whatever"), 9), v2("b", 1, "gbr")],
    );
    drain(&file);
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:d")).get("country_code"),
        Some(&"whatever".to_string())
    );
    assert!(hash(&mut conn, &format!("{prefix}athlete:b")).is_empty());
    assert_eq!(dead_by_id(&mut conn, &stream).len(), 1);
    cleanup(&mut conn, &stream);
}

#[test]
fn an_unknown_version_under_fail_stops_the_worker_with_nothing_acked() {
    let mut conn = redis();
    let stream = unique("schemas-fail");
    let prefix = format!("{stream}:");
    let file = pipeline(&stream, &prefix, "fail");
    let ids = publish(
        &mut conn,
        &stream,
        &[v2("a", 1, "GB"), with_version(v2("d", 1, "DE"), 9)],
    );
    let mut cmd = ecst();
    cmd.arg("run").arg(&file).arg("--drain");
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    let log = stderr_of(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            r#"stopped: entry {}: no schema for aggregateType "athlete" schemaVersion 9 (validate on_unknown_version: fail)"#,
            ids[1]
        )),
        "{log}"
    );
    // The batch was neither applied nor acked: both entries wait for a fixed pipeline.
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 2);
    assert!(hash(&mut conn, &format!("{prefix}athlete:a")).is_empty());
    assert!(dead_by_id(&mut conn, &stream).is_empty());
    cleanup(&mut conn, &stream);
}

fn validate_output(file: &Path) -> (bool, String) {
    let mut cmd = ecst();
    cmd.arg("validate").arg(file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let dir = file.parent().expect("temp dir").display().to_string();
    (out.status.success(), stderr_of(&out).replace(&dir, "DIR"))
}

#[test]
fn validate_names_payload_paths_missing_from_the_latest_schema() {
    let stream = unique("schemas-validate");
    let file = pipeline_file(
        "schemas-validate",
        &format!(
            r#"name: athletes
schemas: ./schemas
source:
  stream: "{stream}"
  group: replica
stages:
  decode: {{ type: decode }}
  checked: {{ type: validate, input: decode }}
  athlete:
    type: project
    input: checked
    where: "payload.status == 'active' && payload.weightClass != ''"
    fields:
      display_name: payload.displayName
      name: payload.name
  cache:
    type: redis_hash
    input: athlete
    key: "athlete:{{payload.country}}:{{aggregateId}}"
"#
        ),
    );
    schema_dir(file.parent().expect("temp dir"), &stream);
    let (ok, stderr) = validate_output(&file);
    assert!(!ok, "{stderr}");
    let expected = [
        "DIR/pipeline.yaml:12:5: stages.athlete.where: payload.weightClass is not in the latest schema of athlete (DIR/schemas/athlete/v3.json)",
        "DIR/pipeline.yaml:15:7: stages.athlete.fields.name: payload.name is not in the latest schema of athlete (DIR/schemas/athlete/v3.json)",
        "DIR/pipeline.yaml:19:5: stages.cache.key: payload.country is not in the latest schema of athlete (DIR/schemas/athlete/v3.json)",
        "3 errors",
    ];
    assert_eq!(stderr.trim_end().lines().collect::<Vec<_>>(), expected);
}

#[test]
fn validate_positions_broken_schema_files_and_missing_stream_files() {
    let stream = unique("schemas-broken");
    let file = pipeline_file(
        "schemas-broken",
        &format!(
            "name: athletes\nschemas: ./schemas\nsource:\n  stream: \"{stream}.v2\"\n  group: replica\nstages:\n  decode: {{ type: decode }}\n  checked: {{ type: validate, input: decode }}\n  cache: {{ type: redis_hash, input: checked, key: \"a:{{aggregateId}}\" }}\n"
        ),
    );
    let schemas = schema_dir(file.parent().expect("temp dir"), &stream);
    std::fs::write(
        schemas.join("athlete/v4.json"),
        "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"tier\": { \"enum\": \"elite\" }\n  }\n}\n",
    )
    .expect("write v4");
    std::fs::write(
        schemas.join("athlete/v5.json"),
        "{\n  \"type\": \"object\",\n}\n",
    )
    .expect("write v5");
    let (ok, stderr) = validate_output(&file);
    assert!(!ok, "{stderr}");
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert_eq!(
        lines[0],
        format!(
            "DIR/pipeline.yaml:4:3: source.stream: the schema directory has no stream file DIR/schemas/streams/{stream}.v2.yaml"
        )
    );
    assert!(
        lines[1].starts_with(
            "DIR/schemas/athlete/v4.json:4:15: /properties/tier/enum: not a valid JSON Schema 2020-12: \"elite\""
        ),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with("DIR/schemas/athlete/v5.json:3:1: invalid JSON: trailing comma"),
        "{stderr}"
    );
    assert_eq!(lines[3], "3 errors");
}

#[test]
fn publish_refuses_invalid_events_naming_their_lines() {
    let mut conn = redis();
    let stream = unique("schemas-publish");
    let dir = std::env::temp_dir().join(unique("schemas-publish").replace(':', "_"));
    let schemas = schema_dir(&dir, &stream);
    let mut wrong_id = v2("a", 2, "GB");
    wrong_id["aggregateId"] = json!("someone-else");
    let lines = [
        v2("a", 1, "GB"),
        v2("b", 1, "gbr"),
        wrong_id,
        with_version(v2("c", 1, "FR"), 4),
        v2("d", 1, "DE"),
    ];
    let ndjson = dir.join("events.ndjson");
    std::fs::write(
        &ndjson,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .expect("write events");
    let mut cmd = ecst();
    cmd.args(["publish", "--stream", &stream, "--schemas"])
        .arg(&schemas)
        .arg("--file")
        .arg(&ndjson);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let log = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let label = ndjson.display().to_string();
    for expected in [
        format!(
            r#"{label}:2: schema athlete/v2.json: /countryCode: "gbr" does not match "^[A-Z]{{2}}$""#
        ),
        format!(
            r#"{label}:3: aggregateId "someone-else" is not the partition key payload.id ("a")"#
        ),
        format!(r#"{label}:4: no schema for aggregateType "athlete" schemaVersion 4"#),
        format!("published 2 events to {stream}; 3 bad lines skipped"),
    ] {
        assert!(log.contains(&expected), "missing {expected}\nin\n{log}");
    }
    let published = aggregate_ids(&mut conn, &stream);
    assert_eq!(published, ["a", "d"]);
    cleanup(&mut conn, &stream);
}

#[test]
fn the_relay_moves_invalid_rows_to_its_dead_letters() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("schemas");
    let stream = unique("schemas-relay");
    let file = relay_file(
        &table,
        &database_url(),
        &redis_url(),
        "validate: true\nschemas: ./schemas\n",
    );
    schema_dir(file.parent().expect("temp dir"), &stream);
    pg.query(
        &format!(
            r#"INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version, payload) VALUES
             ($1, 'athlete', 'good', 1, 'athlete.updated', 2, '{{"id": "good", "displayName": "G", "countryCode": "GB", "status": "active", "points": 1}}'),
             ($1, 'athlete', 'bad', 1, 'athlete.updated', 2, '{{"id": "bad", "displayName": "B", "countryCode": "gbr", "status": "active", "points": 1}}'),
             ($1, 'athlete', 'other', 1, 'athlete.updated', 2, '{{"id": "x", "displayName": "O", "countryCode": "FR", "status": "active", "points": 1}}')"#
        ),
        &[&stream],
    );
    let relay = start_relay(&file);
    wait_until(Duration::from_secs(20), "the outbox to empty", || {
        outbox_count(&pg, &table) == 0
    });
    let published = aggregate_ids(&mut conn, &stream);
    assert_eq!(published, ["good"]);
    let dead: Vec<(String, String)> = pg
        .query(
            &format!("SELECT aggregate_id, error FROM {table}_dead_letters ORDER BY id"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        dead,
        [
            (
                "bad".to_string(),
                r#"schema athlete/v2.json: /countryCode: "gbr" does not match "^[A-Z]{2}$""#
                    .to_string()
            ),
            (
                "other".to_string(),
                r#"aggregateId "other" is not the partition key payload.id ("x")"#.to_string()
            ),
        ]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}
