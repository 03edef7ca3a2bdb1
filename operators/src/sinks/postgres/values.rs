//! Event values converted, before any statement runs, into the cells a batch is written with;
//! a value that does not fit its column is an error for that event alone. Cells borrow from
//! the records where they can, so a batch is converted without copying its strings.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};

use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::types::{Json, ToSql};

use super::config::PgType;

/// One converted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Cell<'a> {
    /// text (and numeric, validated, as text)
    Text(Option<Cow<'a, str>>),
    /// bigint
    Bigint(Option<i64>),
    /// integer
    Integer(Option<i32>),
    /// boolean
    Boolean(Option<bool>),
    /// timestamptz
    Timestamptz(Option<OffsetDateTime>),
    /// jsonb
    Jsonb(Option<Cow<'a, Value>>),
    /// uuid
    Uuid(Option<uuid::Uuid>),
}

/// Keys are compared by their cells when a batch is coalesced; keys are never jsonb, so a
/// jsonb cell hashes by its kind alone (equal cells still hash alike).
impl Hash for Cell<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Cell::Text(v) => v.hash(state),
            Cell::Bigint(v) => v.hash(state),
            Cell::Integer(v) => v.hash(state),
            Cell::Boolean(v) => v.hash(state),
            Cell::Timestamptz(v) => v.hash(state),
            Cell::Jsonb(_) => {}
            Cell::Uuid(v) => v.hash(state),
        }
    }
}

impl Cell<'_> {
    /// The same cell, owning its data.
    pub(super) fn into_owned(self) -> Cell<'static> {
        match self {
            Cell::Text(v) => Cell::Text(v.map(|s| Cow::Owned(s.into_owned()))),
            Cell::Bigint(v) => Cell::Bigint(v),
            Cell::Integer(v) => Cell::Integer(v),
            Cell::Boolean(v) => Cell::Boolean(v),
            Cell::Timestamptz(v) => Cell::Timestamptz(v),
            Cell::Jsonb(v) => Cell::Jsonb(v.map(|j| Cow::Owned(j.into_owned()))),
            Cell::Uuid(v) => Cell::Uuid(v),
        }
    }
}

fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 64 {
        format!("{}...", text.chars().take(61).collect::<String>())
    } else {
        text
    }
}

fn is_numeric_text(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    (!int.is_empty() || !frac.is_empty())
        && digits(int)
        && digits(frac)
        && exponent.is_none_or(|e| {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && digits(e)
        })
}

/// Converts a JSON value (or its absence) for a column of type `t`.
pub(super) fn convert(value: Option<&Value>, t: PgType) -> Result<Cell<'_>, String> {
    let value = value.filter(|v| !v.is_null());
    let bad = |v: &Value| format!("cannot write {} as {}", shown(v), t.sql());
    Ok(match t {
        PgType::Text => Cell::Text(value.map(|v| match v {
            Value::String(s) => Cow::Borrowed(s.as_str()),
            other => Cow::Owned(other.to_string()),
        })),
        PgType::Numeric => Cell::Text(match value {
            None => None,
            Some(Value::Number(n)) => Some(Cow::Owned(n.to_string())),
            Some(Value::String(s)) if is_numeric_text(s.trim()) => Some(Cow::Borrowed(s.trim())),
            Some(v) => return Err(bad(v)),
        }),
        PgType::Bigint => Cell::Bigint(match value {
            None => None,
            Some(v @ Value::Number(n)) => Some(n.as_i64().ok_or_else(|| bad(v))?),
            Some(v @ Value::String(s)) => Some(s.trim().parse::<i64>().map_err(|_| bad(v))?),
            Some(v) => return Err(bad(v)),
        }),
        PgType::Integer => Cell::Integer(match value {
            None => None,
            Some(v @ Value::Number(n)) => Some(
                n.as_i64()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| bad(v))?,
            ),
            Some(v @ Value::String(s)) => Some(s.trim().parse::<i32>().map_err(|_| bad(v))?),
            Some(v) => return Err(bad(v)),
        }),
        PgType::Boolean => Cell::Boolean(match value {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) if s == "true" => Some(true),
            Some(Value::String(s)) if s == "false" => Some(false),
            Some(v) => return Err(bad(v)),
        }),
        PgType::Timestamptz => Cell::Timestamptz(match value {
            None => None,
            Some(v) => Some(ecst_schemas::envelope::parse_timestamp(v).ok_or_else(|| bad(v))?),
        }),
        PgType::Jsonb => Cell::Jsonb(value.map(Cow::Borrowed)),
        PgType::Uuid => Cell::Uuid(match value {
            None => None,
            Some(v @ Value::String(s)) => Some(uuid::Uuid::parse_str(s).map_err(|_| bad(v))?),
            Some(v) => return Err(bad(v)),
        }),
    })
}

/// Converts a key held as text (the aggregate id) for a key column of type `t`, borrowing it
/// where the column is text.
pub(super) fn convert_key_text(text: &str, t: PgType) -> Result<Cell<'_>, String> {
    match t {
        PgType::Text => Ok(Cell::Text(Some(Cow::Borrowed(text)))),
        _ => convert(Some(&Value::String(text.to_string())), t).map(Cell::into_owned),
    }
}

/// A column of values, bound as one array parameter.
#[derive(Debug)]
pub(super) enum Column<'a> {
    /// text[]
    Text(Vec<Option<Cow<'a, str>>>),
    /// int8[]
    Bigint(Vec<Option<i64>>),
    /// int4[]
    Integer(Vec<Option<i32>>),
    /// bool[]
    Boolean(Vec<Option<bool>>),
    /// timestamptz[]
    Timestamptz(Vec<Option<OffsetDateTime>>),
    /// jsonb[]
    Jsonb(Vec<Option<Json<Cow<'a, Value>>>>),
    /// uuid[]
    Uuid(Vec<Option<uuid::Uuid>>),
}

impl<'a> Column<'a> {
    /// An empty column for type `t`.
    pub(super) fn new(t: PgType) -> Self {
        match t {
            PgType::Text | PgType::Numeric => Column::Text(Vec::new()),
            PgType::Bigint => Column::Bigint(Vec::new()),
            PgType::Integer => Column::Integer(Vec::new()),
            PgType::Boolean => Column::Boolean(Vec::new()),
            PgType::Timestamptz => Column::Timestamptz(Vec::new()),
            PgType::Jsonb => Column::Jsonb(Vec::new()),
            PgType::Uuid => Column::Uuid(Vec::new()),
        }
    }

    /// Appends a cell converted for this column's type.
    pub(super) fn push(&mut self, cell: Cell<'a>) {
        match (self, cell) {
            (Column::Text(v), Cell::Text(c)) => v.push(c),
            (Column::Bigint(v), Cell::Bigint(c)) => v.push(c),
            (Column::Integer(v), Cell::Integer(c)) => v.push(c),
            (Column::Boolean(v), Cell::Boolean(c)) => v.push(c),
            (Column::Timestamptz(v), Cell::Timestamptz(c)) => v.push(c),
            (Column::Jsonb(v), Cell::Jsonb(c)) => v.push(c.map(Json)),
            (Column::Uuid(v), Cell::Uuid(c)) => v.push(c),
            // Cells are always converted for their column's type; nothing else reaches here.
            _ => {}
        }
    }

    /// The parameter to bind.
    pub(super) fn as_param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::Text(v) => v,
            Column::Bigint(v) => v,
            Column::Integer(v) => v,
            Column::Boolean(v) => v,
            Column::Timestamptz(v) => v,
            Column::Jsonb(v) => v,
            Column::Uuid(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(s: &str) -> Cell<'static> {
        Cell::Text(Some(Cow::Owned(s.into())))
    }

    #[test]
    fn values_that_fit_convert() {
        assert_eq!(
            convert(Some(&json!("12")), PgType::Bigint).unwrap(),
            Cell::Bigint(Some(12))
        );
        assert_eq!(
            convert(Some(&json!(7)), PgType::Integer).unwrap(),
            Cell::Integer(Some(7))
        );
        assert_eq!(
            convert(Some(&json!("-1.5e3")), PgType::Numeric).unwrap(),
            text("-1.5e3")
        );
        assert_eq!(convert(Some(&json!(42)), PgType::Text).unwrap(), text("42"));
        assert_eq!(convert(None, PgType::Uuid).unwrap(), Cell::Uuid(None));
        assert_eq!(
            convert(Some(&Value::Null), PgType::Boolean).unwrap(),
            Cell::Boolean(None)
        );
        assert!(matches!(
            convert(Some(&json!("2026-11-24T10:00:00Z")), PgType::Timestamptz).unwrap(),
            Cell::Timestamptz(Some(_))
        ));
        assert_eq!(
            convert_key_text("42", PgType::Bigint).unwrap(),
            Cell::Bigint(Some(42))
        );
    }

    #[test]
    fn strings_are_borrowed_not_copied() {
        let value = json!("Athlete 1");
        assert!(matches!(
            convert(Some(&value), PgType::Text).unwrap(),
            Cell::Text(Some(Cow::Borrowed("Athlete 1")))
        ));
        assert!(matches!(
            convert_key_text("ath-1", PgType::Text).unwrap(),
            Cell::Text(Some(Cow::Borrowed("ath-1")))
        ));
    }

    #[test]
    fn values_that_do_not_fit_name_the_value_and_type() {
        assert_eq!(
            convert(Some(&json!("abc")), PgType::Bigint).unwrap_err(),
            "cannot write \"abc\" as bigint"
        );
        assert_eq!(
            convert(Some(&json!(3_000_000_000i64)), PgType::Integer).unwrap_err(),
            "cannot write 3000000000 as integer"
        );
        assert_eq!(
            convert(Some(&json!("yesterday")), PgType::Timestamptz).unwrap_err(),
            "cannot write \"yesterday\" as timestamptz"
        );
        assert!(convert(Some(&json!("1.2.3")), PgType::Numeric).is_err());
        assert!(convert(Some(&json!("nope")), PgType::Uuid).is_err());
        assert!(convert(Some(&json!(1)), PgType::Boolean).is_err());
        assert_eq!(
            convert_key_text("x1", PgType::Integer).unwrap_err(),
            "cannot write \"x1\" as integer"
        );
    }
}
