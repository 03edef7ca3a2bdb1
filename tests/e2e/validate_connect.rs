//! `ecst validate --connect`: the pipeline against its real servers, each failure naming the
//! stage, the server (password masked) and what is missing.

use std::time::Duration;

use crate::common::*;

/// An ACL user on the shared Redis, deleted when dropped.
struct AclUser {
    name: String,
    password: String,
}

impl AclUser {
    /// A user that may run everything except what `rule` takes away (e.g. `-evalsha`).
    fn create(rule: &str) -> AclUser {
        let name = unique("acl").replace(':', "-");
        let password = format!("pw-{}", std::process::id());
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all");
        for word in rule.split_whitespace() {
            cmd.arg(word);
        }
        let _: () = cmd.query(&mut redis()).expect("ACL SETUSER");
        AclUser { name, password }
    }

    /// The shared Redis's URL with this user's credentials.
    fn url(&self) -> String {
        redis_url().replacen(
            "redis://",
            &format!("redis://{}:{}@", self.name, self.password),
            1,
        )
    }

    /// The URL as ecst prints it.
    fn shown_url(&self) -> String {
        redis_url().replacen("redis://", &format!("redis://{}:***@", self.name), 1)
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        let _: Result<i64, _> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.name)
            .query(&mut redis());
    }
}

/// A Postgres table name unique to this test.
fn table_name(label: &str) -> String {
    unique(label)
        .replace([':', '-'], "_")
        .chars()
        .take(40)
        .collect::<String>()
}

/// A pipeline reading `stream` from `redis`, into a Redis hash and the Postgres table `table`
/// (plus `extra` at the end of the file).
fn pipeline(stream: &str, redis: &str, table: &str, extra: &str) -> String {
    format!(
        r#"name: connect
source:
  redis: "{redis}"
  stream: "{stream}"
  group: replica
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  athlete:
    type: project
    input: latest
    fields:
      display_name: payload.displayName
      status: payload.status
  cache:
    type: redis_hash
    input: athlete
    key: "{stream}:athlete:{{aggregateId}}"
  rows:
    type: postgres
    input: athlete
    url: "{pg}"
    table: {table}
    key: athlete_id
    columns: {{ display_name: text, status: text }}
{extra}"#,
        pg = database_url(),
    )
}

/// `ecst validate --connect` on `yaml`: exit status, stdout, stderr.
fn validate_connect(yaml: &str) -> (Option<i32>, String, String) {
    let file = pipeline_file("connect", yaml);
    let mut cmd = ecst();
    cmd.args(["validate", "--connect"]).arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr_of(&out),
    )
}

/// The replica table the `rows` sink writes, with `columns` besides the key and bookkeeping.
fn create_table(table: &str, columns: &str) {
    postgres().execute(&format!(
        "CREATE TABLE {table} (athlete_id text PRIMARY KEY, source_version bigint, \
         source_updated_at timestamptz, replicated_at timestamptz, deleted_at timestamptz{columns})"
    ));
}

fn drop_tables(tables: &[&str]) {
    for table in tables {
        postgres().execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
        ));
    }
}

#[test]
fn a_user_without_evalsha_and_a_table_without_a_column_fail_naming_stage_server_and_what() {
    let user = AclUser::create("-evalsha");
    let stream = unique("connect-bad");
    let table = table_name("connect_bad");
    create_table(&table, ", display_name text");
    let (code, stdout, stderr) = validate_connect(&pipeline(&stream, &user.url(), &table, ""));
    drop_tables(&[&table]);

    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let server = user.shown_url();
    let evalsha = format!(
        "error: stage cache: {server}: user {name} may not run EVALSHA on keys `{stream}:athlete:ecst-preflight`, `ecst:tombstone:{stream}:athlete:ecst-preflight` and `ecst:freshness:{stream}:athlete:{{aggregateId}}` (redis_hash sink `cache`): ",
        name = user.name
    );
    assert!(
        stderr.contains(&evalsha),
        "missing\n{evalsha}\nin\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&evalsha) && l.contains("evalsha")),
        "Redis's own words follow: {stderr}"
    );
    let column = format!(
        "error: stage rows: {}: table public.{table} has no column `status` (text expected)\n",
        database_url()
    );
    assert!(stderr.contains(&column), "missing\n{column}\nin\n{stderr}");
    assert!(
        stderr.contains("2 of ") && stderr.contains(" checks failed against its servers"),
        "{stderr}"
    );
    assert!(!stderr.contains(&user.password) && !stdout.contains(&user.password));
    // What the user may do is still listed, a line per check.
    assert!(
        stdout.contains(&format!(
            "ok: source: {server}: may run XREADGROUP on stream `{stream}` (the source)\n"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "ok: source: {server}: may run XADD on dead-letter stream `{stream}.dlq` (the source)\n"
        )),
        "{stdout}"
    );
}

#[test]
fn a_user_without_the_stream_key_and_a_wrong_password_fail_naming_the_key_and_the_cause() {
    // May touch the replica's keys and ecst's own, not the stream.
    let user = AclUser::create("resetkeys ~e2e:connect-keys*:athlete:* ~ecst:*");
    let stream = unique("connect-keys");
    let table = table_name("connect_keys");
    create_table(&table, ", display_name text, status text");
    let (code, _, stderr) = validate_connect(&pipeline(&stream, &user.url(), &table, ""));
    let wrong = redis_url().replacen(
        "redis://",
        &format!("redis://{}:not-the-password@", user.name),
        1,
    );
    let (wrong_code, _, wrong_stderr) = validate_connect(&pipeline(&stream, &wrong, &table, ""));
    drop_tables(&[&table]);

    assert_eq!(code, Some(1), "{stderr}");
    let server = user.shown_url();
    for command in [
        "XREADGROUP",
        "XAUTOCLAIM",
        "XACK",
        "XGROUP CREATE",
        "XINFO GROUPS",
    ] {
        let line = format!(
            "error: source: {server}: user {} may not run {command} on stream `{stream}` (the source): ",
            user.name
        );
        assert!(stderr.contains(&line), "missing\n{line}\nin\n{stderr}");
    }
    assert!(
        !stderr.contains("stage cache"),
        "the replica's keys are allowed: {stderr}"
    );
    assert_eq!(wrong_code, Some(1), "{wrong_stderr}");
    assert!(
        wrong_stderr.contains(&format!(
            "error: source: {server}: XREADGROUP on stream `{stream}` (the source): authentication failed at {server} as user `{}`",
            user.name
        )),
        "{wrong_stderr}"
    );
    assert!(!wrong_stderr.contains("not-the-password"), "{wrong_stderr}");
}

#[test]
fn a_pipeline_its_servers_accept_passes_with_a_line_per_check_and_changes_nothing() {
    let stream = unique("connect-good");
    let table = table_name("connect_good");
    let created = table_name("connect_new");
    create_table(&table, ", display_name text, status text");
    // A second sink whose table does not exist yet but may be created, and a bootstrap query.
    let extra = format!(
        r#"  fresh:
    type: postgres
    input: athlete
    url: "{pg}"
    table: {created}
    create: true
    columns: {{ display_name: text }}
bootstrap:
  postgres: "{pg}"
  query: "SELECT 'a'::text, 1::bigint, '{{}}'::jsonb WHERE $1::text IS NULL LIMIT $2"
"#,
        pg = database_url()
    );
    let (code, stdout, stderr) = validate_connect(&pipeline(&stream, &redis_url(), &table, &extra));
    let left_behind = postgres().query(
        "SELECT count(*) FROM pg_tables WHERE tablename = $1 OR tablename = $2",
        &[&created, &format!("{table}_tombstones")],
    )[0]
    .get::<_, i64>(0);
    let mut conn = redis();
    let stream_exists: bool = redis::cmd("EXISTS")
        .arg(&stream)
        .query(&mut conn)
        .expect("EXISTS");
    drop_tables(&[&table, &created]);

    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(stderr.trim(), "", "no failures");
    let pg = database_url();
    for line in [
        format!(
            "ok: stage rows: {pg}: table public.{table} has the columns, unique key and privileges the sink needs"
        ),
        format!("ok: stage fresh: {pg}: table public.{created} is ready or can be created"),
        format!("ok: bootstrap: {pg}: the bootstrap query answered (1 line for a page of 1)"),
        format!(
            "ok: source: {}: may run SCRIPT LOAD (the source)",
            redis_url()
        ),
    ] {
        assert!(stdout.contains(&line), "missing\n{line}\nin\n{stdout}");
    }
    let checks = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
    assert!(
        stdout.contains(&format!("ok against its servers ({checks} checks)")),
        "{stdout}"
    );
    assert_eq!(left_behind, 0, "the check creates no table");
    assert!(!stream_exists, "the check creates no stream");
}

#[test]
fn a_user_without_hset_fails_on_the_command_the_sink_script_runs_inside_redis() {
    // EVALSHA is allowed, so only the script's own commands show what the worker would meet.
    let user = AclUser::create("-hset");
    let stream = unique("connect-hset");
    let table = table_name("connect_hset");
    create_table(&table, ", display_name text, status text");
    let (code, _, stderr) = validate_connect(&pipeline(&stream, &user.url(), &table, ""));
    drop_tables(&[&table]);

    assert_eq!(code, Some(1), "{stderr}");
    let line = format!(
        "error: stage cache: {}: user {} may not run HSET on key `{stream}:athlete:ecst-preflight` (redis_hash sink `cache`, in its batch script): ",
        user.shown_url(),
        user.name
    );
    assert!(stderr.contains(&line), "missing\n{line}\nin\n{stderr}");
    assert!(
        !stderr.contains("EVALSHA"),
        "EVALSHA itself is allowed: {stderr}"
    );
    let probed: bool = redis::cmd("EXISTS")
        .arg(format!("{stream}:athlete:ecst-preflight"))
        .query(&mut redis())
        .expect("EXISTS");
    assert!(!probed, "the probes write nothing");
}

#[test]
fn a_pipeline_on_a_redis_cluster_passes_with_the_cluster_forms_of_its_checks() {
    let stream = unique("connect-cluster");
    let yaml = format!(
        r#"name: connect
source:
  redis: "{url}"
  stream: "{stream}"
  group: replica
stages:
  decode: {{ type: decode }}
  cache: {{ type: redis_hash, input: decode, key: "{stream}:athlete:{{aggregateId}}" }}
"#,
        url = cluster_url()
    );
    let (code, stdout, stderr) = validate_connect(&yaml);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let url = cluster_url();
    for line in [
        format!("ok: source: {url}: may run XREADGROUP on stream `{stream}` (the source)\n"),
        // On a cluster the dead-letter script is checked on the stream's key alone.
        format!("ok: source: {url}: may run EVAL on key `{stream}` (the source)\n"),
        format!(
            "ok: stage cache: {url}: may run HSET on key `ecst:freshness:{stream}:athlete:{{aggregateId}}` (redis_hash sink `cache`)\n"
        ),
    ] {
        assert!(stdout.contains(&line), "missing\n{line}\nin\n{stdout}");
    }
}

#[test]
fn a_postgres_user_without_write_or_create_privileges_is_told_which_are_missing() {
    let role = table_name("connect_role");
    let table = table_name("connect_priv");
    let schema = table_name("connect_schema");
    create_table(&table, ", display_name text, status text");
    let db = postgres();
    db.execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT ON {table} TO {role}; \
         CREATE TABLE {table}_tombstones (athlete_id text PRIMARY KEY); \
         CREATE SCHEMA {schema}; GRANT USAGE ON SCHEMA {schema} TO {role}"
    ));
    let as_role = database_url().replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(
        as_role,
        database_url(),
        "DATABASE_URL names the user postgres"
    );
    let yaml = format!(
        r#"name: connect
source:
  redis: "{redis}"
  stream: "{stream}"
  group: replica
stages:
  decode: {{ type: decode }}
  rows:
    type: postgres
    input: decode
    url: "{as_role}"
    table: {table}
    key: athlete_id
    columns: {{ display_name: text, status: text }}
  fresh:
    type: postgres
    input: decode
    url: "{as_role}"
    schema: {schema}
    table: athletes
    create: true
    columns: {{ display_name: text }}
"#,
        redis = redis_url(),
        stream = unique("connect-priv"),
    );
    let (code, _, stderr) = validate_connect(&yaml);
    drop_tables(&[&table]);
    db.execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DROP OWNED BY {role}; DROP ROLE {role}"
    ));

    assert_eq!(code, Some(1), "{stderr}");
    for line in [
        format!(
            "error: stage rows: {as_role}: user `{role}` lacks INSERT, UPDATE, DELETE on table public.{table}; user `{role}` lacks SELECT, INSERT, UPDATE, DELETE on tombstone table public.{table}_tombstones\n"
        ),
        format!(
            "error: stage fresh: {as_role}: table {schema}.athletes does not exist and user `{role}` may not create it (`create: true` needs CREATE on schema {schema}); tombstone table {schema}.athletes_tombstones does not exist and user `{role}` may not create it (needs CREATE on schema {schema})\n"
        ),
    ] {
        assert!(stderr.contains(&line), "missing\n{line}\nin\n{stderr}");
    }
}
