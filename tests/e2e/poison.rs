//! Bodies that are well-formed JSON but not an entity's state: dead-lettered with their reason,
//! never written over the replica; content types read as media types.

use std::collections::HashMap;

use serde_json::json;

use crate::common::*;

fn xadd(conn: &mut redis::Connection, stream: &str, body: &str, ct: Option<&str>) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*").arg("v").arg(body);
    if let Some(ct) = ct {
        cmd.arg("ct").arg(ct);
    }
    cmd.query(conn).expect("XADD")
}

#[test]
fn non_object_payloads_are_dead_lettered_and_the_replica_keeps_its_state() {
    let mut conn = redis();
    let stream = unique("poison");
    let prefix = format!("{stream}:");
    let file = pipeline_file("poison", &athletes_pipeline(&stream, &prefix, ""));

    let good = event("a", 1, "Ada").to_string();
    xadd(&mut conn, &stream, &good, None);
    let mut array = event("a", 2, "unused");
    array["payload"] = json!(["Ada", "active"]);
    let array_id = xadd(&mut conn, &stream, &array.to_string(), None);
    let mut string = event("a", 3, "unused");
    string["payload"] = json!("blank");
    let string_id = xadd(&mut conn, &stream, &string.to_string(), None);
    let with_charset = event("b", 1, "Bea").to_string();
    xadd(
        &mut conn,
        &stream,
        &with_charset,
        Some("application/json; charset=utf-8"),
    );
    // 200 levels in a member nobody reads: over the depth limit of 64 all the same.
    let body = event("c", 1, "Cy").to_string();
    let deep = format!(
        "{},\"unused\":{}1{}}}",
        &body[..body.len() - 1],
        "[".repeat(200),
        "]".repeat(200)
    );
    let deep_id = xadd(&mut conn, &stream, &deep, None);

    let out = drain(&file);
    let log = stderr_of(&out);

    let a = hash(&mut conn, &format!("{prefix}athlete:a"));
    assert_eq!(
        (
            a.get("display_name").map(String::as_str),
            a.get("_version").map(String::as_str)
        ),
        (Some("Ada"), Some("1")),
        "the replica was overwritten: {a:?}\n{log}"
    );
    let b = hash(&mut conn, &format!("{prefix}athlete:b"));
    assert_eq!(
        b.get("display_name").map(String::as_str),
        Some("Bea"),
        "{log}"
    );
    assert!(hash(&mut conn, &format!("{prefix}athlete:c")).is_empty());

    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    let reasons: HashMap<&str, &str> = dead
        .iter()
        .map(|d| (d["source_id"].as_str(), d["error"].as_str()))
        .collect();
    assert_eq!(
        reasons,
        HashMap::from([
            (
                array_id.as_str(),
                "payload (key `payload`) must be an object or null, got an array"
            ),
            (
                string_id.as_str(),
                "payload (key `payload`) must be an object or null, got a string"
            ),
            (deep_id.as_str(), "body nests deeper than 64 levels"),
        ]),
        "{log}"
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}
