//! `ecst schema check OLD NEW`: the CI gate for schema directories, against real directories
//! and a real git repository.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{ecst, unique};

const ATHLETE_V1: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "id": {"type": "string"},
    "athleteId": {"type": "string"},
    "name": {"type": "string"}
  },
  "required": ["id"]
}"#;

/// v1 with `name` turned into an integer: neither BACKWARD nor FORWARD.
const ATHLETE_V2_BREAKING: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "id": {"type": "string"},
    "athleteId": {"type": "string"},
    "name": {"type": "integer"}
  },
  "required": ["id"]
}"#;

/// v1 without `athleteId`: BACKWARD (removing a property of an open object).
const ATHLETE_V2_COMPATIBLE: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "id": {"type": "string"},
    "name": {"type": "string"}
  },
  "required": ["id"]
}"#;

fn stream_file(stream: &str, partition_key: &str) -> String {
    format!(
        "stream: {stream}\naggregate_type: athlete\npartition_key: {partition_key}\npartitions: 8\ncompatibility: BACKWARD\n"
    )
}

/// A fresh temporary directory.
fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(label).replace(':', "_"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes `files` (relative path, content) under `dir`.
fn write(dir: &Path, files: &[(&str, &str)]) {
    for (relative, content) in files {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }
}

/// A schema directory holding `files`.
fn schema_dir(label: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = temp_dir(label).join("schemas");
    write(&dir, files);
    dir
}

/// Runs `ecst schema check` in `cwd`: exit code, stdout, stderr.
fn check(cwd: &Path, old: &str, new: &str, json: bool) -> (i32, String, String) {
    let mut cmd = ecst();
    cmd.current_dir(cwd).args(["schema", "check", old, new]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run ecst");
    (
        out.status.code().expect("an exit code, not a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(dir: &Path) -> &str {
    dir.to_str().expect("UTF-8 temp path")
}

#[test]
fn a_partition_key_refactor_is_refused_and_the_same_change_as_a_new_stream_passes() {
    // The seed's incident: a refactor keyed the stream by another member and replicas keyed
    // by the old one went back in time. The check refuses the change under the same name.
    let stream = "athletes.athlete-updated.v1";
    let stream_path = format!("streams/{stream}.yaml");
    let base = schema_dir(
        "schema-check-incident-base",
        &[
            ("athlete/v1.json", ATHLETE_V1),
            (&stream_path, &stream_file(stream, "id")),
        ],
    );
    let refactor = schema_dir(
        "schema-check-incident-refactor",
        &[
            ("athlete/v1.json", ATHLETE_V1),
            (&stream_path, &stream_file(stream, "athleteId")),
        ],
    );
    let (code, stdout, stderr) = check(&base, path(&base), path(&refactor), false);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let expected = format!(
        "{}/{stream_path}: {stream}: /partition_key: STREAM_PARTITION_KEY_CHANGED: partition_key changed from id to athleteId under the same stream name: consumers keyed by the old one would mix both; publish to a new stream (athletes.athlete-updated.v2) instead",
        path(&refactor)
    );
    assert!(
        stdout.lines().any(|l| l == expected),
        "missing line:\n{expected}\nin:\n{stdout}"
    );
    assert!(
        stdout.contains("INCOMPATIBLE: 1 refused change"),
        "{stdout}"
    );

    // The fix the incident asked for: a new stream version; the old stream stays as it was.
    let new_stream = "athletes.athlete-updated.v2";
    let versioned = schema_dir(
        "schema-check-incident-versioned",
        &[
            ("athlete/v1.json", ATHLETE_V1),
            (&stream_path, &stream_file(stream, "id")),
            (
                &format!("streams/{new_stream}.yaml"),
                &stream_file(new_stream, "athleteId"),
            ),
        ],
    );
    let (code, stdout, stderr) = check(&base, path(&base), path(&versioned), false);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("compatible: 0 new versions and 1 stream checked"),
        "{stdout}"
    );

    // The partition count is part of the contract too.
    let repartitioned = schema_dir(
        "schema-check-incident-partitions",
        &[
            ("athlete/v1.json", ATHLETE_V1),
            (
                &stream_path,
                &stream_file(stream, "id").replace("partitions: 8", "partitions: 16"),
            ),
        ],
    );
    let (code, stdout, _) = check(&base, path(&base), path(&repartitioned), true);
    assert_eq!(code, 1, "{stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("one JSON report");
    assert_eq!(report["compatible"], false);
    assert_eq!(report["findings"][0]["rule"], "STREAM_PARTITIONS_CHANGED");
    assert_eq!(report["findings"][0]["pointer"], "/partitions");
    assert_eq!(report["findings"][0]["subject"], stream);
}

#[test]
fn a_version_edited_in_place_or_removed_is_refused_and_a_new_version_is_checked() {
    let stream_path = "streams/athletes.v1.yaml";
    let stream = stream_file("athletes.v1", "id");
    let base = schema_dir(
        "schema-check-edit-base",
        &[("athlete/v1.json", ATHLETE_V1), (stream_path, &stream)],
    );
    let edited = schema_dir(
        "schema-check-edit-edited",
        &[
            ("athlete/v1.json", ATHLETE_V2_COMPATIBLE),
            (stream_path, &stream),
        ],
    );
    let (code, stdout, stderr) = check(&base, path(&base), path(&edited), true);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("one JSON report");
    assert_eq!(
        report["findings"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let finding = &report["findings"][0];
    assert_eq!(finding["rule"], "VERSION_EDITED_IN_PLACE");
    assert_eq!(
        finding["file"],
        format!("{}/athlete/v1.json", path(&edited))
    );
    assert_eq!(finding["subject"], "athlete");
    assert_eq!(finding["pointer"], "/properties/athleteId");
    assert_eq!(
        finding["message"],
        "v1 differs from the base: events already carry it; add athlete/v2.json instead"
    );

    // The same schema as v2 keeps BACKWARD: accepted.
    let added = schema_dir(
        "schema-check-edit-added",
        &[
            ("athlete/v1.json", ATHLETE_V1),
            ("athlete/v2.json", ATHLETE_V2_COMPATIBLE),
            (stream_path, &stream),
        ],
    );
    let (code, stdout, stderr) = check(&base, path(&base), path(&added), false);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("compatible: 1 new version and 1 stream checked"),
        "{stdout}"
    );

    // Removing v2 again, once published, is refused with the base's file named.
    let (code, stdout, _) = check(&base, path(&added), path(&base), false);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{}/athlete/v2.json: athlete: (whole file): VERSION_REMOVED",
            path(&added)
        )),
        "{stdout}"
    );
}

fn git(repo: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(repo)
        .args(["-c", "user.name=ecst", "-c", "user.email=ecst@example.com"])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn git_refs_are_read_from_the_current_repository() {
    let repo = temp_dir("schema-check-git");
    git(&repo, &["init", "-q", "-b", "main"]);
    let stream = stream_file("athletes.v1", "id");
    write(
        &repo,
        &[
            ("schemas/athlete/v1.json", ATHLETE_V1),
            ("schemas/streams/athletes.v1.yaml", &stream),
            ("README.md", "not a schema\n"),
        ],
    );
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "v1"]);
    write(&repo, &[("schemas/athlete/v2.json", ATHLETE_V2_BREAKING)]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "v2 breaks BACKWARD"]);

    let (code, stdout, stderr) = check(&repo, "git:HEAD~1:schemas", "git:HEAD:schemas", false);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.lines().any(|l| l
            == "git:HEAD:schemas/athlete/v2.json: athlete: /properties/name: TYPE_CHANGED: breaks BACKWARD: v2 cannot read data written with v1"),
        "{stdout}"
    );

    // Fixed in the working tree (not committed): the base commit against the directory.
    write(&repo, &[("schemas/athlete/v2.json", ATHLETE_V2_COMPATIBLE)]);
    let (code, stdout, stderr) = check(&repo, "git:HEAD~1:schemas", "schemas", false);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("compatible: 1 new version and 1 stream checked"),
        "{stdout}"
    );

    // What a pre-commit hook checks: the index, as a tree.
    git(&repo, &["add", "schemas"]);
    let tree = Command::new("git")
        .current_dir(&repo)
        .arg("write-tree")
        .output()
        .expect("git write-tree");
    let tree = String::from_utf8_lossy(&tree.stdout).trim().to_string();
    let (code, stdout, stderr) = check(
        &repo,
        "git:HEAD~1:schemas",
        &format!("git:{tree}:schemas"),
        false,
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let (code, stdout, _) = check(
        &repo,
        "git:HEAD:schemas",
        &format!("git:{tree}:schemas"),
        false,
    );
    assert_eq!(code, 1, "v2 edited in the index: {stdout}");
    assert!(stdout.contains(": VERSION_EDITED_IN_PLACE: "), "{stdout}");

    // From a subdirectory, paths are relative to it, as with any git command.
    let (code, stdout, stderr) = check(&repo.join("schemas"), "git:HEAD~1:.", ".", false);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");

    // A ref that does not exist is an error, not a verdict.
    let (code, stdout, stderr) = check(&repo, "git:no-such-branch:schemas", "schemas", false);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: git:no-such-branch:schemas: no-such-branch is not a commit or tree in this repository"
    );
}

#[test]
fn a_missing_directory_is_an_error() {
    let base = schema_dir("schema-check-missing", &[("athlete/v1.json", ATHLETE_V1)]);
    let missing = base.join("nope");
    let (code, stdout, stderr) = check(&base, path(&base), path(&missing), false);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("error: {}: not a directory", path(&missing))
    );
}
