//! The batch script and the layout of its arguments (`script.lua` describes it). A call of
//! several upserts of one fixed field set of at most 48 names names the fields once, in a
//! header, and each record sends a head saying its action and which values follow, then only
//! those; a smaller call, or a wider set, names the fields in its records. Each header size
//! has a script of its own, which writes a complete record naming its values one by one. The
//! records' values travel in packs (`pack.rs`); keys, header and packs are written straight
//! into the command, without a string per value.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use redis::{Cmd, RedisWrite};
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

use super::Write;
use super::pack::{Packs, RecordTooLarge};
use crate::record::{Action, FieldNames, Fields, Record};

/// The batch script, with the places for its header's names (`--{names}`,
/// `--{write_complete}`) that [`BatchScript::for_header`] fills.
const TEMPLATE: &str = include_str!("script.lua");

/// The batch script for calls whose header names a given number of fields.
pub(super) struct BatchScript {
    text: String,
    sha: String,
}

impl BatchScript {
    /// The script for a header of `names` names (at most [`HEADER_MAX_NAMES`]), made once.
    pub(super) fn for_header(names: usize) -> &'static BatchScript {
        static SCRIPTS: [OnceLock<BatchScript>; HEADER_MAX_NAMES + 1] =
            [const { OnceLock::new() }; HEADER_MAX_NAMES + 1];
        SCRIPTS[names].get_or_init(|| BatchScript::render(names))
    }

    /// The template with the header's `names` names written in: each a local `Fj`, and a
    /// complete record's write naming its values one by one.
    fn render(names: usize) -> Self {
        let mut locals = format!(
            "if nfixed ~= {names} then return redis.error_reply('ERR a header of ' .. nfixed .. ' names in the script for {names}') end"
        );
        if names > 0 {
            let (fields, values): (Vec<String>, Vec<String>) = (1..=names)
                .map(|j| (format!("F{j}"), format!("ARGV[{}]", 4 + j)))
                .unzip();
            let _ = write!(
                locals,
                "\nlocal {} = {}",
                fields.join(", "),
                values.join(", ")
            );
        }
        let mut write = String::from("call('HSET', key, vf, ver, of, R[a + 2]");
        for j in 1..=names {
            let _ = write!(write, ", F{j}, R[a + {}]", 2 + j);
        }
        write.push(')');
        let mut text = String::with_capacity(TEMPLATE.len() + locals.len() + 2 * write.len());
        for line in TEMPLATE.lines() {
            let filled = match line.trim() {
                "--{names}" => &locals,
                "--{write_complete}" => &write,
                _ => {
                    let _ = writeln!(text, "{line}");
                    continue;
                }
            };
            let indent = &line[..line.len() - line.trim_start().len()];
            for part in filled.lines() {
                let _ = writeln!(text, "{indent}{part}");
            }
        }
        let sha = redis::Script::new(&text).get_hash().to_owned();
        BatchScript { text, sha }
    }

    /// The SHA1 EVALSHA names the script by.
    pub(super) fn sha(&self) -> &str {
        &self.sha
    }
}

/// One call of the batch script, as EVALSHA.
pub(super) struct ScriptCall {
    pub cmd: Cmd,
    script: &'static BatchScript,
}

impl ScriptCall {
    /// `SCRIPT LOAD` of the call's script, for a server that lost it (the sink's access check
    /// covers `SCRIPT LOAD`).
    pub(super) fn load(&self) -> Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.script.text.as_str());
        cmd
    }

    /// The same call as EVAL of the script's text, which loads it where it was missing.
    pub(super) fn as_eval(&self) -> Cmd {
        as_eval(&self.cmd, &self.script.text)
    }
}

/// `evalsha` (EVALSHA, a SHA, then the call's keys and arguments) as EVAL of `text`, the
/// script the SHA names: it runs the same and loads the script where it was missing.
pub(super) fn as_eval(evalsha: &Cmd, text: &str) -> Cmd {
    let (args, bytes) = evalsha.args_iter().fold((0, 0), |(n, len), arg| match arg {
        redis::Arg::Simple(arg) => (n + 1, len + arg.len()),
        _ => (n + 1, len),
    });
    let mut cmd = Cmd::with_capacity(args, bytes + text.len());
    cmd.arg("EVAL").arg(text);
    for arg in evalsha.args_iter().skip(2) {
        if let redis::Arg::Simple(arg) = arg {
            cmd.arg(arg);
        }
    }
    cmd
}

/// The hash fields the sink writes besides a record's own, and the tombstones' prefix.
pub(super) struct Layout<'a> {
    pub deleted: &'a str,
    pub version: &'a str,
    pub occurred_at: &'a str,
    pub tombstone_prefix: &'a str,
}

/// The freshness hash a call writes too (on one server, where it can share the call).
pub(super) struct Freshness<'a> {
    pub key: &'a str,
    pub replicated_at: OffsetDateTime,
    pub newest_occurred_at: Option<OffsetDateTime>,
}

/// Where a script's arguments go: the command itself, or a pack of them.
pub(super) trait Args {
    /// Appends one argument.
    fn push(&mut self, value: &[u8]);
    /// Appends `value` as JSON, as one argument.
    fn push_json(&mut self, value: &Value);
}

impl Args for Cmd {
    fn push(&mut self, value: &[u8]) {
        self.arg(value);
    }

    fn push_json(&mut self, value: &Value) {
        // A JSON value always serializes, and the command's buffer takes every write.
        let _ = serde_json::to_writer(self.writer_for_next_arg(), value);
    }
}

impl Args for Packs {
    fn push(&mut self, value: &[u8]) {
        Packs::push(self, value);
    }

    fn push_json(&mut self, value: &Value) {
        // A JSON value always serializes, and a Vec takes every write.
        self.push_with(|buf| {
            let _ = serde_json::to_writer(buf, value);
        });
    }
}

/// Appends `n` in decimal.
fn push_u64(args: &mut impl Args, n: u64) {
    push_integer(args, false, n);
}

/// Appends the integer of sign `negative` and `magnitude` in decimal.
fn push_integer(args: &mut impl Args, negative: bool, magnitude: u64) {
    let mut text = [0u8; 21];
    let mut at = text.len();
    let mut rest = magnitude;
    loop {
        at -= 1;
        text[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        text[at] = b'-';
    }
    args.push(&text[at..]);
}

/// The keys and arguments of one script call over `writes`, whose keys are rendered in
/// `keys`; an error for a record no call can carry.
pub(super) fn call(
    layout: &Layout<'_>,
    keys: &str,
    writes: &[&Write<'_>],
    freshness: Option<&Freshness<'_>>,
) -> Result<ScriptCall, RecordTooLarge> {
    let mut sets = FixedSets::of(layout, writes);
    let names: &[String] = sets.header.map_or(&[], |names| names);
    let script = BatchScript::for_header(names.len());
    let fixed_fields = writes
        .iter()
        .find_map(|w| w.record.fields.as_ref()?.fixed_names())
        .map_or(0, |names| names.len());
    let (args, bytes, record_bytes) = capacity(script.sha(), keys, writes.len(), fixed_fields);
    let mut cmd = Cmd::with_capacity(args, bytes);
    cmd.arg("EVALSHA").arg(script.sha());
    // Scratch space for the arguments made of parts: tombstone keys, heads.
    let mut scratch = Vec::new();
    cmd.arg(writes.len() * 2 + usize::from(freshness.is_some()));
    for write in writes {
        let key = &keys[write.key.clone()];
        cmd.arg(key);
        scratch.clear();
        write
            .tombstone
            .push_key(&mut scratch, layout.tombstone_prefix, key);
        cmd.arg(scratch.as_slice());
    }
    if let Some(freshness) = freshness {
        cmd.arg(freshness.key);
    }
    cmd.arg(layout.deleted)
        .arg(layout.version)
        .arg(layout.occurred_at);
    cmd.arg(names.len());
    for name in names {
        cmd.arg(name.as_str());
    }
    if let Some(freshness) = freshness {
        timestamp_arg(&mut cmd, freshness.replicated_at);
        match freshness.newest_occurred_at {
            Some(newest) => timestamp_arg(&mut cmd, newest),
            None => {
                cmd.arg("");
            }
        }
    }
    let mut packs = Packs::with_capacity(record_bytes);
    for write in writes {
        packs.next_record(&mut cmd);
        append_record(&mut packs, &mut scratch, layout, &mut sets, write.record);
    }
    packs.finish(&mut cmd)?;
    Ok(ScriptCall { cmd, script })
}

/// A guess of the size of a call (arguments, bytes) and of its packs (bytes), so that the
/// buffers grow seldom.
fn capacity(sha: &str, keys: &str, writes: usize, fixed_fields: usize) -> (usize, usize, usize) {
    let args = 16 + fixed_fields + writes * 2 + 1;
    let bytes = 256 + sha.len() + 2 * keys.len() + writes * 16;
    let record_bytes = 16 + writes * (40 + 16 * fixed_fields);
    (args, bytes + record_bytes, record_bytes)
}

/// Upserts of one fixed set a call needs before its header names the set; a smaller call
/// names the fields in its records.
const HEADER_FROM: usize = 3;

/// Most names a header holds: each is a local of the script and a register of a complete
/// record's `HSET`, and Lua allows a function 200 locals and 250 registers. A wider set is
/// named in every record.
pub(super) const HEADER_MAX_NAMES: usize = 48;

/// The fixed field sets of a call's upserts: whether the script may write each over a hash
/// (its names differ from each other and from the sink's own fields, as the script tells from
/// a hash's field count whether it holds others), and the one the header names.
struct FixedSets<'r> {
    checked: Vec<(&'r FieldNames, bool)>,
    header: Option<&'r FieldNames>,
}

impl<'r> FixedSets<'r> {
    fn of(layout: &Layout<'_>, writes: &[&Write<'r>]) -> Self {
        let mut sets = FixedSets {
            checked: Vec::new(),
            header: None,
        };
        let mut first: Option<(&'r FieldNames, usize)> = None;
        for write in writes {
            if let (Action::Upsert, Some(Fields::Fixed { names, .. })) =
                (&write.record.action, &write.record.fields)
                && sets.distinct(layout, names)
            {
                match &mut first {
                    None => first = Some((names, 1)),
                    Some((set, count)) if Arc::ptr_eq(set, names) => *count += 1,
                    Some(_) => {}
                }
            }
        }
        sets.header = first
            .filter(|&(names, count)| count >= HEADER_FROM && names.len() <= HEADER_MAX_NAMES)
            .map(|(names, _)| names);
        sets
    }

    /// Whether `names` differ from each other and from the sink's own fields.
    fn distinct(&mut self, layout: &Layout<'_>, names: &'r FieldNames) -> bool {
        if let Some(&(_, distinct)) = self.checked.iter().find(|(n, _)| Arc::ptr_eq(n, names)) {
            return distinct;
        }
        let mut seen = HashSet::with_capacity(names.len() + 3);
        let distinct = [layout.deleted, layout.version, layout.occurred_at]
            .into_iter()
            .chain(names.iter().map(String::as_str))
            .all(|name| seen.insert(name));
        self.checked.push((names, distinct));
        distinct
    }
}

/// The arguments of one record (after the header).
fn append_record<'r>(
    packs: &mut Packs,
    scratch: &mut Vec<u8>,
    layout: &Layout<'_>,
    sets: &mut FixedSets<'r>,
    record: &'r Record,
) {
    let version = record.event.aggregate_version;
    let occurred = record.event.occurred_at;
    match (&record.action, &record.fields) {
        (Action::Delete { keep_for }, _) => {
            let keep_ms = u64::try_from(keep_for.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            packs.push(b"d");
            push_u64(packs, version);
            push_u64(packs, keep_ms);
        }
        (Action::Mark, _) => {
            packs.push(if occurred.is_some() { b"M" } else { b"m" });
            push_u64(packs, version);
            if let Some(at) = occurred {
                timestamp_arg(packs, at);
            }
        }
        (Action::Upsert, Some(Fields::Fixed { names, values }))
            if sets.header.is_some_and(|header| Arc::ptr_eq(header, names)) =>
        {
            // A null value is absent, as everywhere `Fields` is read.
            let present = |j: usize| {
                values
                    .get(j)
                    .is_some_and(|v| v.as_ref().is_some_and(|v| !v.is_null()))
            };
            if occurred.is_some() && (0..names.len()).all(present) {
                packs.push(b"U");
            } else {
                scratch.clear();
                scratch.extend([b'u', flag(occurred.is_some())]);
                scratch.extend((0..names.len()).map(|j| flag(present(j))));
                packs.push(scratch);
            }
            push_u64(packs, version);
            if let Some(at) = occurred {
                timestamp_arg(packs, at);
            }
            for value in values.iter().take(names.len()).flatten() {
                if !value.is_null() {
                    value_arg(packs, value);
                }
            }
        }
        (Action::Upsert, Some(Fields::Fixed { names, values })) if sets.distinct(layout, names) => {
            let fields = || {
                names
                    .iter()
                    .zip(values)
                    .filter_map(|(name, value)| Some((name.as_str(), value.as_ref()?)))
                    .filter(|(_, value)| !value.is_null())
            };
            by_name(packs, b"F", layout, record, fields);
        }
        // Patches go to delta.lua (see delta.rs), never in this script's calls.
        (Action::Upsert | Action::Patch { .. }, _) => {
            by_name(packs, b"P", layout, record, || record.written_fields())
        }
    }
}

/// An upsert that names its fields: `head`, the pair count, the version and occurredAt pairs,
/// then those of `fields`.
fn by_name<'v, I: Iterator<Item = (&'v str, &'v Value)>>(
    packs: &mut Packs,
    head: &[u8],
    layout: &Layout<'_>,
    record: &Record,
    fields: impl Fn() -> I,
) {
    let occurred = record.event.occurred_at;
    let pairs = 1 + usize::from(occurred.is_some()) + fields().count();
    packs.push(head);
    push_u64(packs, pairs as u64);
    packs.push(layout.version.as_bytes());
    push_u64(packs, record.event.aggregate_version);
    if let Some(at) = occurred {
        packs.push(layout.occurred_at.as_bytes());
        timestamp_arg(packs, at);
    }
    for (name, value) in fields() {
        packs.push(name.as_bytes());
        value_arg(packs, value);
    }
}

/// A head's mark of a value that follows or not.
fn flag(present: bool) -> u8 {
    if present { b'1' } else { b'0' }
}

/// A value as Redis stores it: a string as is, anything else as JSON.
pub(super) fn value_arg(args: &mut impl Args, value: &Value) {
    match value {
        Value::String(s) => args.push(s.as_bytes()),
        Value::Bool(b) => args.push(if *b { b"true" } else { b"false" }),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => push_u64(args, u),
            (None, Some(i)) => push_integer(args, i < 0, i.unsigned_abs()),
            (None, None) => args.push_json(value),
        },
        other => args.push_json(other),
    }
}

/// A timestamp in RFC 3339 UTC as `format_timestamp` makes it (`2026-11-24T10:00:00.5Z`;
/// empty for a year outside 0..=9999).
pub(super) fn timestamp_arg(args: &mut impl Args, at: OffsetDateTime) {
    let mut text = [0u8; 30];
    let len = rfc3339(at, &mut text);
    args.push(&text[..len]);
}

/// Writes `at` as [`timestamp_arg`] sends it into `out` and returns its length: 19 bytes of
/// date and time, up to 10 of fraction, the `Z`.
fn rfc3339(at: OffsetDateTime, out: &mut [u8; 30]) -> usize {
    let Some(utc) = at.checked_to_offset(UtcOffset::UTC) else {
        return 0;
    };
    let year = match u32::try_from(utc.year()) {
        Ok(year) if year < 10_000 => year,
        _ => return 0,
    };
    let parts = [
        (year, 4, b'-'),
        (u32::from(u8::from(utc.month())), 2, b'-'),
        (u32::from(utc.day()), 2, b'T'),
        (u32::from(utc.hour()), 2, b':'),
        (u32::from(utc.minute()), 2, b':'),
        (u32::from(utc.second()), 2, b'.'),
    ];
    let mut len = 0;
    for (value, width, then) in parts {
        put_digits(&mut out[len..len + width], value);
        out[len + width] = then;
        len += width + 1;
    }
    let nanos = utc.nanosecond();
    if nanos == 0 {
        len -= 1;
    } else {
        put_digits(&mut out[len..len + 9], nanos);
        len += 9;
        while out[len - 1] == b'0' {
            len -= 1;
        }
    }
    out[len] = b'Z';
    len + 1
}

/// `value`'s last decimal digits, as many as `out` holds, zero-padded.
fn put_digits(out: &mut [u8], mut value: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::envelope::format_timestamp;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn every_header_size_fills_the_template_in_full() {
        for names in 0..=HEADER_MAX_NAMES {
            let script = BatchScript::for_header(names);
            assert!(
                !script
                    .text
                    .lines()
                    .any(|line| line.trim().starts_with("--{")),
                "{names}"
            );
            let mut write = String::from("call('HSET', key, vf, ver, of, R[a + 2]");
            for j in 1..=names {
                write += &format!(", F{j}, R[a + {}]", 2 + j);
            }
            write.push(')');
            assert_eq!(script.text.matches(&write).count(), 2, "{names}");
            assert_eq!(script.sha, redis::Script::new(&script.text).get_hash());
        }
    }

    #[test]
    fn timestamps_are_written_as_format_timestamp_makes_them() {
        for at in [
            datetime!(2026-11-24 10:00:00 UTC),
            datetime!(2026-11-24 10:00:00.000000001 UTC),
            datetime!(2026-11-24 10:00:00.12 UTC),
            datetime!(2026-11-24 01:30:00.5 +02:00),
            datetime!(0000-01-01 00:30:00 +01:00),
            datetime!(9999-12-31 23:59:59.999999999 UTC),
            datetime!(9999-12-31 23:30:00 -01:00),
        ]
        .into_iter()
        .chain((0..2000i64).map(|i| {
            OffsetDateTime::from_unix_timestamp(i * 7_919_993 - 3_000_000_000).unwrap()
                + time::Duration::nanoseconds(i * i * 7_777_777 % 1_000_000_000)
        })) {
            let mut cmd = Cmd::new();
            timestamp_arg(&mut cmd, at);
            let written: Vec<_> = cmd.args_iter().collect();
            assert_eq!(
                written,
                [redis::Arg::Simple(format_timestamp(at).as_bytes())],
                "{at}"
            );
        }
    }

    #[test]
    fn values_are_written_as_strings_or_json() {
        let mut cmd = Cmd::new();
        for value in [
            json!("text"),
            json!(true),
            json!(-12),
            json!(1.5),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(null),
            json!({"k": [1, "x"]}),
        ] {
            value_arg(&mut cmd, &value);
        }
        let written: Vec<_> = cmd.args_iter().collect();
        let expected = [
            "text",
            "true",
            "-12",
            "1.5",
            "18446744073709551615",
            "-9223372036854775808",
            "null",
            r#"{"k":[1,"x"]}"#,
        ]
        .map(|s| redis::Arg::Simple(s.as_bytes()));
        assert_eq!(written, expected);
    }
}
