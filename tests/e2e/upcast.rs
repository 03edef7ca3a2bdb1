//! Mixed payload schema versions: the `upcast` stage carries v1 and v2 athlete events to v3,
//! so that a stream of v1, v2 and v3 events makes the same replica as one of v3 events only.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::common::*;

/// The upcast steps of `examples/athletes-upcast.yaml`, for the athlete schemas of
/// `examples/schemas/athlete`.
const STEPS: &str = r#"    steps:
      - from: 1
        ops:
          - rename: { from: name, to: displayName }
          - compute: { path: countryCode, expr: "payload.country.upperAscii()" }
          - drop: country
      - from: 2
        ops:
          - default: { path: tier, value: standard }
"#;

/// Replica entries by aggregate id: field name to value.
type Entries = HashMap<String, HashMap<String, String>>;

/// One replica pair (a Redis hash prefix and a Postgres table) fed by one stream.
struct Replica {
    stream: String,
    prefix: String,
    table: String,
}

impl Replica {
    fn new(label: &str) -> Replica {
        let stream = unique(label);
        let table: String = format!(
            "e2e_{}",
            stream.replace([':', '-'], "_").trim_start_matches("e2e_")
        )
        .chars()
        .take(50)
        .collect();
        Replica {
            prefix: format!("{stream}:"),
            table,
            stream,
        }
    }

    fn pipeline(&self, on_newer_version: &str) -> String {
        let (stream, prefix, table, url) =
            (&self.stream, &self.prefix, &self.table, database_url());
        format!(
            r#"name: athletes-upcast
source:
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_every: 200ms
stages:
  decode: {{ type: decode }}
  upcast:
    type: upcast
    input: decode
    on_newer_version: {on_newer_version}
{STEPS}  latest: {{ type: version_filter, input: upcast }}
  deletes: {{ type: tombstone, input: latest, mode: delete, keep_for: 1h }}
  athlete:
    type: project
    input: deletes
    fields:
      display_name: payload.displayName
      country_code: payload.countryCode
      status: payload.status
      points: payload.points
      tier: payload.tier
      _schema_version: payload._schema_version
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
  table:
    type: postgres
    input: athlete
    url: "{url}"
    table: {table}
    key: athlete_id
    create: true
    timeout: 5s
    columns: {{ display_name: text, country_code: text, status: text, points: bigint, tier: text, _schema_version: bigint }}
"#
        )
    }

    /// Each replica's fields by aggregate id: the Redis hash and the Postgres row (as
    /// strings, absent for NULL), with `source_version`.
    fn read(
        &self,
        conn: &mut redis::Connection,
        pg: &postgres_client::Client,
        ids: &[String],
    ) -> (Entries, Entries) {
        let mut hashes = HashMap::new();
        for id in ids {
            let fields = hash(conn, &format!("{}athlete:{id}", self.prefix));
            if !fields.is_empty() {
                hashes.insert(id.clone(), fields);
            }
        }
        let rows = pg.query(
            &format!(
                "SELECT athlete_id, source_version::text, display_name, country_code, status, \
                 points::text, tier, _schema_version::text FROM {}",
                self.table
            ),
            &[],
        );
        let names = [
            "source_version",
            "display_name",
            "country_code",
            "status",
            "points",
            "tier",
            "_schema_version",
        ];
        let rows = rows
            .iter()
            .map(|row| {
                let fields = names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, name)| {
                        row.get::<_, Option<String>>(i + 1)
                            .map(|v| (name.to_string(), v))
                    })
                    .collect();
                (row.get::<_, String>(0), fields)
            })
            .collect();
        (hashes, rows)
    }

    fn finish(&self, conn: &mut redis::Connection, pg: &postgres_client::Client) {
        pg.execute(&format!(
            "DROP TABLE IF EXISTS {t}; DROP TABLE IF EXISTS {t}_tombstones",
            t = self.table
        ));
        cleanup(conn, &self.stream);
    }
}

/// The athlete at one version as v3 holds it.
struct Athlete {
    id: String,
    version: u64,
    name: String,
    country_code: String,
    status: &'static str,
    points: u64,
    tier: Option<&'static str>,
}

impl Athlete {
    /// The event at payload schema version `schema`.
    fn event(&self, schema: i64) -> Value {
        let payload = match schema {
            1 => json!({"id": self.id, "name": self.name,
                        "country": self.country_code.to_lowercase(),
                        "status": self.status, "points": self.points}),
            2 => json!({"id": self.id, "displayName": self.name, "countryCode": self.country_code,
                        "status": self.status, "points": self.points}),
            _ => {
                let mut p = json!({"id": self.id, "displayName": self.name,
                                   "countryCode": self.country_code, "status": self.status,
                                   "points": self.points});
                if let Some(tier) = self.tier {
                    p["tier"] = json!(tier);
                }
                p
            }
        };
        json!({"schemaVersion": schema, "eventId": format!("{}-{}", self.id, self.version),
               "eventType": "athlete.updated", "occurredAt": "2026-11-25T10:00:00Z",
               "aggregateType": "athlete", "aggregateId": self.id,
               "aggregateVersion": self.version, "payload": payload})
    }
}

/// The mixed stream, the same events as v3 only, the ids, and the schema version of each
/// surviving aggregate's newest event in the mixed stream.
fn workload(
    aggregates: usize,
    versions: u64,
) -> (Vec<Value>, Vec<Value>, Vec<String>, HashMap<String, i64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let (mut mixed, mut latest_only, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    let mut newest_schema = HashMap::new();
    let countries = ["GB", "FR", "NO", "KE"];
    for a in 0..aggregates {
        let id = format!("ath{a}");
        ids.push(id.clone());
        for version in 1..=versions {
            let (m, v3) = if version == versions && a.is_multiple_of(7) {
                (delete(&id, version), delete(&id, version))
            } else {
                let schema: i64 = rng.random_range(1..=3);
                // v1 and v2 cannot say a tier: the upcast's default is what v3 would carry.
                let tier = if schema < 3 {
                    Some("standard")
                } else {
                    [None, Some("standard"), Some("elite")][rng.random_range(0..3)]
                };
                let athlete = Athlete {
                    id: id.clone(),
                    version,
                    name: format!("Athlete {a} v{version}"),
                    country_code: countries[(a + version as usize) % countries.len()].into(),
                    status: if version.is_multiple_of(3) {
                        "retired"
                    } else {
                        "active"
                    },
                    points: version * 10 + a as u64,
                    tier,
                };
                if version == versions {
                    newest_schema.insert(id.clone(), schema);
                }
                (athlete.event(schema), athlete.event(3))
            };
            for _ in 0..if rng.random_bool(0.1) { 2 } else { 1 } {
                mixed.push(m.clone());
                latest_only.push(v3.clone());
            }
        }
    }
    mixed.shuffle(&mut rng);
    latest_only.shuffle(&mut rng);
    (mixed, latest_only, ids, newest_schema)
}

#[test]
fn a_stream_of_v1_v2_and_v3_events_converges_to_the_replica_of_its_v3_equivalents() {
    let mut conn = redis();
    let pg = postgres();
    let (mixed_events, v3_events, ids, newest_schema) = workload(40, 6);
    let mixed = Replica::new("upcast-mixed");
    let v3 = Replica::new("upcast-v3");
    publish(&mut conn, &mixed.stream, &mixed_events);
    publish(&mut conn, &v3.stream, &v3_events);
    drain(&pipeline_file("upcast-mixed", &mixed.pipeline("fail")));
    drain(&pipeline_file("upcast-v3", &v3.pipeline("fail")));

    let (mixed_hashes, mixed_rows) = mixed.read(&mut conn, &pg, &ids);
    let (v3_hashes, v3_rows) = v3.read(&mut conn, &pg, &ids);
    let deleted = ids.iter().step_by(7).count();
    assert_eq!(mixed_hashes.len(), ids.len() - deleted);
    assert_eq!(mixed_rows.len(), ids.len() - deleted);
    for (replica, mixed, v3) in [
        ("redis", &mixed_hashes, &v3_hashes),
        ("postgres", &mixed_rows, &v3_rows),
    ] {
        for id in &ids {
            let (Some(m), Some(v)) = (mixed.get(id), v3.get(id)) else {
                assert_eq!(
                    mixed.get(id),
                    v3.get(id),
                    "{replica} {id}: present in one only"
                );
                continue;
            };
            let without_version = |fields: &HashMap<String, String>| {
                let mut fields = fields.clone();
                fields.remove("_schema_version");
                fields
            };
            assert_eq!(without_version(m), without_version(v), "{replica} {id}");
            // The replica records the version its newest event was published at.
            assert_eq!(
                m.get("_schema_version"),
                Some(&newest_schema[id].to_string()),
                "{replica} {id}"
            );
            assert_eq!(v.get("_schema_version").map(String::as_str), Some("3"));
        }
    }
    // What the v3 equivalents say, spelled out for one athlete.
    let a1 = &mixed_rows["ath1"];
    assert_eq!(a1["display_name"], "Athlete 1 v6");
    assert_eq!(a1["country_code"], ["GB", "FR", "NO", "KE"][(1 + 6) % 4]);
    assert_eq!(a1["source_version"], "6");
    assert_eq!(a1["points"], "61");
    assert!(dead_letters(&mut conn, &format!("{}.dlq", mixed.stream)).is_empty());
    assert_eq!(group_pending(&mut conn, &mixed.stream, "replica"), 0);
    mixed.finish(&mut conn, &pg);
    v3.finish(&mut conn, &pg);
}

#[test]
fn an_event_newer_than_the_latest_version_is_dead_lettered_or_stops_the_worker() {
    let mut conn = redis();
    let pg = postgres();
    let newer = json!({"schemaVersion": 4, "aggregateType": "athlete", "aggregateId": "n",
                       "aggregateVersion": 1, "payload": {"id": "n", "fullName": "New Shape"}});
    let bad_country = json!({"schemaVersion": 1, "aggregateType": "athlete", "aggregateId": "c",
                             "aggregateVersion": 1, "payload": {"id": "c", "name": "C", "country": 44,
                                                                 "status": "active", "points": 1}});

    let dead = Replica::new("upcast-newer-dlq");
    let ids = publish(&mut conn, &dead.stream, &[newer.clone(), bad_country]);
    drain(&pipeline_file(
        "upcast-newer-dlq",
        &dead.pipeline("dead_letter"),
    ));
    let letters: HashMap<String, String> = dead_letters(&mut conn, &format!("{}.dlq", dead.stream))
        .into_iter()
        .map(|d| (d["source_id"].clone(), d["error"].clone()))
        .collect();
    assert_eq!(
        letters[&ids[0]],
        "schemaVersion 4 is newer than the latest version this upcast knows (3); add a step `from: 3`"
    );
    assert!(
        letters[&ids[1]].starts_with("upcast step 1->2, op 2 (compute countryCode): "),
        "{}",
        letters[&ids[1]]
    );
    assert_eq!(group_pending(&mut conn, &dead.stream, "replica"), 0);
    dead.finish(&mut conn, &pg);

    let failing = Replica::new("upcast-newer-fail");
    let ids = publish(&mut conn, &failing.stream, &[newer]);
    let mut cmd = ecst();
    cmd.arg("run")
        .arg(pipeline_file(
            "upcast-newer-fail",
            &failing.pipeline("fail"),
        ))
        .arg("--drain");
    let out = run_with_deadline(cmd, std::time::Duration::from_secs(60));
    assert!(!out.status.success());
    let log = stderr_of(&out);
    assert!(
        log.contains(&format!(
            "stopped: entry {}: schemaVersion 4 is newer",
            ids[0]
        )),
        "{log}"
    );
    assert_eq!(
        group_pending(&mut conn, &failing.stream, "replica"),
        1,
        "the entry stays pending"
    );
    assert!(hash(&mut conn, &format!("{}athlete:n", failing.prefix)).is_empty());
    failing.finish(&mut conn, &pg);
}

#[test]
fn validate_points_at_a_version_gap_an_unknown_op_and_cel_that_does_not_compile() {
    let file = pipeline_file(
        "upcast-validate",
        r#"name: bad
source: { stream: s, group: g }
stages:
  decode: { type: decode }
  upcast:
    type: upcast
    input: decode
    steps:
      - from: 1
        ops:
          - compute: { path: countryCode, expr: "payload.country.upperAscii(" }
      - from: 3
        ops:
          - drop: x
  cache: { type: redis_hash, input: upcast, key: "a:{aggregateId}" }
"#,
    );
    let mut cmd = ecst();
    cmd.arg("validate").arg(&file);
    let out = run_with_deadline(cmd, std::time::Duration::from_secs(30));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &stderr_of(&out);
    let at = file.display();
    assert!(
        text.contains(&format!(
            "{at}:11:43: stages.upcast.steps.0.ops.0.compute.expr: invalid CEL expression"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{at}:12:9: stages.upcast.steps.1.from: expected from: 2 after the step from 1"
        )),
        "{text}"
    );

    let unknown = std::fs::read_to_string(&file)
        .unwrap()
        .replace("- drop: x", "- uppercase: x");
    std::fs::write(&file, unknown).unwrap();
    let mut cmd = ecst();
    cmd.arg("validate").arg(&file);
    let out = run_with_deadline(cmd, std::time::Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &stderr_of(&out);
    assert!(
        text.contains(&format!(
            "{at}:14:13: stages.upcast.steps.1.ops.0: unknown variant `uppercase`, expected one of `rename`, `move`, `default`, `drop`, `split`, `join`, `compute`"
        )),
        "{text}"
    );
}
