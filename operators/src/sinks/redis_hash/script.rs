//! The batch script and the layout of its arguments (`script.lua` describes it): the field
//! names once per call, then per record a head saying its action and which values follow, and
//! only those. Arguments are written straight into the command, without a string per value.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use redis::{Cmd, RedisWrite};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::Write;
use crate::record::{Action, FieldNames, Fields, Record};

/// The batch script.
pub(super) const SCRIPT: &str = include_str!("script.lua");

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

/// Appends the keys and arguments of one script call over `writes`, whose keys are rendered
/// in `keys`, to `cmd` (which already names the script).
pub(super) fn append(
    cmd: &mut Cmd,
    layout: &Layout<'_>,
    keys: &str,
    writes: &[&Write<'_>],
    freshness: Option<&Freshness<'_>>,
) {
    cmd.arg(writes.len() * 2 + usize::from(freshness.is_some()));
    for write in writes {
        let key = &keys[write.key.clone()];
        cmd.arg(key);
        arg_with(cmd, |out| {
            write.tombstone.write(out, layout.tombstone_prefix, key)
        });
    }
    if let Some(freshness) = freshness {
        cmd.arg(freshness.key);
    }
    cmd.arg(layout.deleted)
        .arg(layout.version)
        .arg(layout.occurred_at);
    match freshness {
        Some(freshness) => {
            timestamp_arg(cmd, freshness.replicated_at);
            match freshness.newest_occurred_at {
                Some(newest) => timestamp_arg(cmd, newest),
                None => {
                    cmd.arg("");
                }
            }
        }
        None => {
            cmd.arg("").arg("");
        }
    }
    let fixed = header_names(layout, writes);
    let names: &[String] = fixed.map_or(&[], |names| names);
    cmd.arg(names.len());
    for name in names {
        cmd.arg(name.as_str());
    }
    for write in writes {
        append_record(cmd, write.record, fixed);
    }
}

/// A guess of the size of a call, so that the command's buffers grow seldom.
pub(super) fn capacity(keys: &str, writes: usize, fixed_fields: usize) -> (usize, usize) {
    let args = 16 + fixed_fields + writes * (6 + fixed_fields);
    let bytes = 256 + 2 * keys.len() + writes * (64 + 16 * fixed_fields);
    (args, bytes)
}

/// The fixed field names the header of a call names: those of its first upsert of a fixed
/// set, if they differ from each other and from the sink's own fields, as the script tells
/// from the count of a hash's fields whether it holds others.
fn header_names<'r>(layout: &Layout<'_>, writes: &[&Write<'r>]) -> Option<&'r FieldNames> {
    let names =
        writes
            .iter()
            .find_map(|write| match (&write.record.action, &write.record.fields) {
                (Action::Upsert, Some(Fields::Fixed { names, .. })) => Some(names),
                _ => None,
            })?;
    let mut seen = HashSet::with_capacity(names.len() + 3);
    [layout.deleted, layout.version, layout.occurred_at]
        .into_iter()
        .chain(names.iter().map(String::as_str))
        .all(|name| seen.insert(name))
        .then_some(names)
}

/// The arguments of one record (after the header).
fn append_record(cmd: &mut Cmd, record: &Record, fixed: Option<&FieldNames>) {
    let version = record.event.aggregate_version;
    let occurred = record.event.occurred_at;
    match (&record.action, &record.fields) {
        (Action::Delete { keep_for }, _) => {
            let keep_ms = u64::try_from(keep_for.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            cmd.arg("d").arg(version).arg(keep_ms);
        }
        (Action::Mark, _) => {
            cmd.arg(if occurred.is_some() { "m1" } else { "m0" })
                .arg(version);
            if let Some(at) = occurred {
                timestamp_arg(cmd, at);
            }
        }
        (Action::Upsert, Some(Fields::Fixed { names, values }))
            if fixed.is_some_and(|fixed| Arc::ptr_eq(fixed, names)) =>
        {
            let present = |j: usize| values.get(j).is_some_and(Option::is_some);
            arg_with(cmd, |out| {
                out.write_all(&[b'u', flag(occurred.is_some())])?;
                for j in 0..names.len() {
                    out.write_all(&[flag(present(j))])?;
                }
                Ok(())
            });
            cmd.arg(version);
            if let Some(at) = occurred {
                timestamp_arg(cmd, at);
            }
            for value in values.iter().take(names.len()).flatten() {
                value_arg(cmd, value);
            }
        }
        (Action::Upsert, _) => {
            cmd.arg(if occurred.is_some() { "p1" } else { "p0" })
                .arg(version);
            if let Some(at) = occurred {
                timestamp_arg(cmd, at);
            }
            cmd.arg(record.written_fields().count());
            for (name, value) in record.written_fields() {
                cmd.arg(name);
                value_arg(cmd, value);
            }
        }
    }
}

/// A head's mark of a value that follows or not.
fn flag(present: bool) -> u8 {
    if present { b'1' } else { b'0' }
}

/// Appends one argument that `write` writes into the command's buffer.
fn arg_with(cmd: &mut Cmd, write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) {
    let mut out = cmd.writer_for_next_arg();
    // The buffer is a Vec, which takes every write.
    let _ = write(&mut out);
}

/// A value as Redis stores it: a string as is, anything else as JSON.
fn value_arg(cmd: &mut Cmd, value: &Value) {
    match value {
        Value::String(s) => {
            cmd.arg(s.as_str());
        }
        other => arg_with(cmd, |out| {
            serde_json::to_writer(out, other).map_err(io::Error::from)
        }),
    }
}

/// A timestamp in RFC 3339 UTC, as `format_timestamp` makes it (empty if it has none).
fn timestamp_arg(cmd: &mut Cmd, at: OffsetDateTime) {
    arg_with(cmd, |out| match at.checked_to_offset(UtcOffset::UTC) {
        Some(utc) => utc
            .format_into(out, &Rfc3339)
            .map(drop)
            .map_err(io::Error::other),
        None => Ok(()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::envelope::format_timestamp;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn timestamps_are_written_as_format_timestamp_makes_them() {
        for at in [
            datetime!(2026-11-24 10:00:00 UTC),
            datetime!(2026-11-24 10:00:00.000000001 UTC),
            datetime!(2026-11-24 10:00:00.12 UTC),
            datetime!(2026-11-24 01:30:00.5 +02:00),
            datetime!(0000-01-01 00:30:00 +01:00),
        ] {
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
            "null",
            r#"{"k":[1,"x"]}"#,
        ]
        .map(|s| redis::Arg::Simple(s.as_bytes()));
        assert_eq!(written, expected);
    }
}
