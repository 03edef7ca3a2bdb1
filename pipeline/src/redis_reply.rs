//! Reading Redis replies: text and map values, stream ids, and stream entry lists. Stream
//! entries are parsed here rather than through the redis crate's typed replies because ecst
//! keeps the fields in their stream order and tolerates the nil entries of trimmed ids.

use std::collections::HashMap;

use ecst_operators::RawEntry;
use redis::Value;

/// A Redis reply value as text (bulk or simple string, or an integer).
pub fn bulk(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A Redis map reply (RESP3 map or RESP2 flat pairs) by key.
pub fn as_map(value: Value) -> HashMap<String, Value> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut pairs = Vec::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| bulk(Some(&k)).map(|k| (k, v)))
        .collect()
}

/// Takes a string out of a reply value without copying it.
pub(crate) fn into_string(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Orders stream ids numerically (`ms-seq`).
pub fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    parse_id(a).cmp(&parse_id(b))
}

/// A stream entry id as its two numbers, `(ms, seq)`.
pub type StreamId = (u64, u64);

/// Splits `ms-seq` into numbers; malformed ids sort first.
pub fn parse_id(id: &str) -> StreamId {
    // Every entry's id is parsed on the hot path, twice (about 860 instructions per entry
    // through `split_once` and `str::parse`): ids of plain digits are read in one pass.
    digits_id(id.as_bytes()).unwrap_or_else(|| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    })
}

/// `ms-seq` or `ms` of 1 to 19 digits each (so no overflow); `None` for anything else.
fn digits_id(id: &[u8]) -> Option<StreamId> {
    let (mut ms, mut seq, mut digits, mut in_seq) = (0u64, 0u64, 0usize, false);
    for &byte in id {
        match byte {
            b'0'..=b'9' if digits < 19 => {
                let n = if in_seq { &mut seq } else { &mut ms };
                *n = *n * 10 + u64::from(byte - b'0');
                digits += 1;
            }
            b'-' if !in_seq && digits > 0 => {
                in_seq = true;
                digits = 0;
            }
            _ => return None,
        }
    }
    (digits > 0).then_some((ms, seq))
}

/// Parses `[[id, [field, value, ...] | nil], ...]`; an entry with nil fields (deleted while
/// pending) comes back with no fields rather than failing the whole read.
pub fn parse_entries(list: Value) -> Result<Vec<RawEntry>, String> {
    let items = match list {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(format!("entry list is {other:?}")),
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            // Redis 6 XAUTOCLAIM may return nil for a deleted entry.
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let fields_value = if parts.len() >= 2 { parts.pop() } else { None };
        let id = parts
            .pop()
            .and_then(into_string)
            .ok_or("entry without an id")?;
        let mut fields = match &fields_value {
            Some(Value::Array(flat)) => Vec::with_capacity(flat.len() / 2),
            Some(Value::Map(pairs)) => Vec::with_capacity(pairs.len()),
            _ => Vec::new(),
        };
        match fields_value {
            Some(Value::Array(flat)) => {
                let mut iter = flat.into_iter();
                while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                    let key = into_string(k).unwrap_or_default();
                    let value = match v {
                        Value::BulkString(bytes) => bytes,
                        Value::SimpleString(s) => s.into_bytes(),
                        _ => Vec::new(),
                    };
                    fields.push((key, value));
                }
            }
            Some(Value::Map(pairs)) => {
                for (k, v) in pairs {
                    let value = match v {
                        Value::BulkString(bytes) => bytes,
                        _ => Vec::new(),
                    };
                    fields.push((into_string(k).unwrap_or_default(), value));
                }
            }
            _ => {}
        }
        entries.push(RawEntry { id, fields });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_with_and_without_fields() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"v".to_vec()),
                    Value::BulkString(b"{}".to_vec()),
                ]),
            ]),
            Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]),
            Value::Nil,
        ]);
        let entries = parse_entries(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].field("v"), Some(&b"{}"[..]));
        assert!(entries[1].fields.is_empty());
    }

    #[test]
    fn maps_read_from_resp2_pairs_and_resp3_maps() {
        let flat = Value::Array(vec![
            Value::SimpleString("name".into()),
            Value::BulkString(b"g".to_vec()),
            Value::SimpleString("pending".into()),
            Value::Int(3),
        ]);
        let map = as_map(flat);
        assert_eq!(bulk(map.get("name")).as_deref(), Some("g"));
        assert_eq!(bulk(map.get("pending")).as_deref(), Some("3"));
        let resp3 = Value::Map(vec![(Value::BulkString(b"lag".to_vec()), Value::Int(7))]);
        assert_eq!(bulk(as_map(resp3).get("lag")).as_deref(), Some("7"));
    }

    proptest::proptest! {
        /// The one-pass reading gives what `split_once` and `str::parse` gave, malformed and
        /// overflowing ids included.
        #[test]
        fn ids_read_as_str_parse_reads_them(
            id in "[0-9]{1,20}(-[0-9]{1,20})?|[+0-9-]{0,24}|[0-9a-z+ -]{0,8}",
        ) {
            let (ms, seq) = id.split_once('-').unwrap_or((&id, "0"));
            let before = (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0));
            proptest::prop_assert_eq!(parse_id(&id), before);
        }
    }

    #[test]
    fn ids_compare_numerically() {
        assert!(parse_id("1700000000000-10") > parse_id("1700000000000-9"));
        assert_eq!(compare_ids("10-0", "9-5"), std::cmp::Ordering::Greater);
        assert_eq!(compare_ids("9-10", "9-9"), std::cmp::Ordering::Greater);
    }
}
