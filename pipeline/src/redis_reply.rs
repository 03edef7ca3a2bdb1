//! Reading Redis replies: text and map values, stream ids, and stream entry lists. Stream
//! entries are parsed here rather than through the redis crate's typed replies because ecst
//! keeps the fields in their stream order and tolerates the nil entries of trimmed ids.

use std::collections::HashMap;

use ecst_operators::RawEntry;
use ecst_operators::redis_pool::resp::{self, Header, ReplyScan};
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

/// The entries of an `XREADGROUP` reply as the redis crate parsed it (RESP2 or RESP3).
pub fn parse_read(reply: Value) -> Result<Vec<RawEntry>, String> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items,
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        other => return Err(format!("{other:?}")),
    };
    let mut entries = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            return Err("stream item is not an array".into());
        };
        if parts.len() != 2 {
            return Err("stream item is not [name, entries]".into());
        }
        let list = parts.pop().unwrap_or(Value::Nil);
        entries.extend(parse_entries(list)?);
    }
    Ok(entries)
}

/// Reads an `XREADGROUP` reply straight from its RESP2 bytes into entries, giving what
/// [`parse_read`] gives for the reply as the redis crate parses it, without
/// building that tree: about a quarter of a worker's instructions per event went to the redis
/// crate's parser and the values it builds and drops.
pub fn parse_read_resp(reply: &[u8]) -> Result<Vec<RawEntry>, String> {
    let mut resp = RespCursor { reply, at: 0 };
    let Some(streams) = resp.array()? else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    for _ in 0..streams {
        if resp.array()? != Some(2) {
            return Err("stream item is not [name, entries]".into());
        }
        resp.skip()?;
        match resp.array()? {
            None => {}
            Some(count) => {
                // Bounded by the reply: a count is only as trustworthy as the bytes behind it.
                entries.reserve(count.min(reply.len() / 8));
                for _ in 0..count {
                    if let Some(entry) = resp.entry()? {
                        entries.push(entry);
                    }
                }
            }
        }
    }
    Ok(entries)
}

/// A position in one whole RESP2 reply.
struct RespCursor<'a> {
    reply: &'a [u8],
    at: usize,
}

impl<'a> RespCursor<'a> {
    fn header(&mut self) -> Result<Header<'a>, String> {
        let header = resp::header(self.reply, self.at)?.ok_or("the reply ends early")?;
        self.at = header.next;
        Ok(header)
    }

    /// An array's length (`None` for a nil array); any other value is an error.
    fn array(&mut self) -> Result<Option<usize>, String> {
        let header = self.header()?;
        match header.kind {
            b'*' => resp::length(header.line),
            b'$' if header.line == b"-1" => Ok(None),
            other => Err(format!(
                "expected an array, got type {:?}",
                char::from(other)
            )),
        }
    }

    /// Skips one whole value.
    fn skip(&mut self) -> Result<(), String> {
        let rest = self.reply.get(self.at..).unwrap_or_default();
        let len = ReplyScan::default()
            .advance(rest)?
            .ok_or("the reply ends early")?;
        self.at += len;
        Ok(())
    }

    /// The rest of a value whose header was read: the bytes of a bulk or simple string,
    /// `None` for anything else (skipped).
    fn string_body(&mut self, header: Header<'a>) -> Result<Option<&'a [u8]>, String> {
        match header.kind {
            // The redis crate reads `+OK` as no string at all.
            b'+' if header.line == b"OK" => Ok(None),
            b'+' => Ok(Some(header.line)),
            b'$' => match resp::length(header.line)? {
                None => Ok(None),
                Some(len) => {
                    let end = self.at + len;
                    let bytes = self.reply.get(self.at..end).ok_or("the reply ends early")?;
                    if self.reply.get(end..end + 2) != Some(b"\r\n") {
                        return Err("a bulk string not ended by CRLF".into());
                    }
                    self.at = end + 2;
                    Ok(Some(bytes))
                }
            },
            b'*' => {
                if let Some(count) = resp::length(header.line)? {
                    for _ in 0..count {
                        self.skip()?;
                    }
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn string(&mut self) -> Result<Option<&'a [u8]>, String> {
        let header = self.header()?;
        self.string_body(header)
    }

    /// One `[id, [field, value, ...] | nil]`; `None` for an item that is no entry.
    fn entry(&mut self) -> Result<Option<RawEntry>, String> {
        let header = self.header()?;
        let parts = match header.kind {
            b'*' => resp::length(header.line)?,
            _ => {
                self.string_body(header)?;
                return Ok(None);
            }
        };
        let parts = match parts {
            None | Some(0) => return Ok(None),
            Some(parts) => parts,
        };
        // As `parse_entries`: the last part is the fields and the one before it the id.
        for _ in 2..parts.max(2) {
            self.skip()?;
        }
        let id = self
            .string()?
            .and_then(|id| std::str::from_utf8(id).ok())
            .ok_or("entry without an id")?
            .to_owned();
        let mut fields = Vec::new();
        if parts >= 2 {
            let header = self.header()?;
            match header.kind {
                b'*' => {
                    if let Some(flat) = resp::length(header.line)? {
                        fields.reserve((flat / 2).min(self.reply.len() / 8));
                        for _ in 0..flat / 2 {
                            let name = self
                                .string()?
                                .and_then(|name| std::str::from_utf8(name).ok())
                                .unwrap_or_default()
                                .to_owned();
                            let value = self.string()?.unwrap_or_default().to_vec();
                            fields.push((name, value));
                        }
                        if flat % 2 == 1 {
                            self.skip()?;
                        }
                    }
                }
                _ => {
                    self.string_body(header)?;
                }
            }
        }
        Ok(Some(RawEntry { id, fields }))
    }
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

    /// An `XREADGROUP` reply: streams of entries, some with nil fields, some with non-UTF-8
    /// names or values, some fields given as simple strings or integers.
    fn read_reply() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let text = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::BulkString),
            "[a-z]{0,6}|OK".prop_map(|s| if s == "OK" {
                Value::Okay
            } else {
                Value::SimpleString(s)
            }),
            any::<i64>().prop_map(Value::Int),
            Just(Value::Nil),
        ];
        let fields = prop_oneof![
            8 => proptest::collection::vec(text.clone(), 0..7).prop_map(Value::Array),
            1 => Just(Value::Nil),
        ];
        let id = prop_oneof![
            8 => "[0-9]{1,13}-[0-9]{1,3}".prop_map(|id| Value::BulkString(id.into_bytes())),
            1 => text.clone(),
        ];
        let entry = prop_oneof![
            8 => (id.clone(), fields.clone()).prop_map(|(id, fields)| Value::Array(vec![id, fields])),
            1 => (text.clone(), id.clone(), fields).prop_map(|(extra, id, fields)| {
                Value::Array(vec![extra, id, fields])
            }),
            1 => id.prop_map(|id| Value::Array(vec![id])),
            1 => Just(Value::Array(Vec::new())),
            1 => Just(Value::Nil),
        ];
        let entries = prop_oneof![
            8 => proptest::collection::vec(entry, 0..6).prop_map(Value::Array),
            1 => Just(Value::Nil),
        ];
        let stream = ("[a-z:]{1,12}", entries).prop_map(|(name, entries)| {
            Value::Array(vec![Value::BulkString(name.into_bytes()), entries])
        });
        prop_oneof![
            8 => proptest::collection::vec(stream, 0..3).prop_map(Value::Array),
            1 => Just(Value::Nil),
        ]
    }

    /// `value` as Redis writes it in RESP2.
    fn encode(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Nil => out.extend_from_slice(b"*-1\r\n"),
            Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Value::Okay => out.extend_from_slice(b"+OK\r\n"),
            Value::BulkString(bytes) => {
                out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            Value::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
            }
            other => unreachable!("not generated: {other:?}"),
        }
    }

    proptest::proptest! {
        /// Reading the bytes gives the entries that parsing them as values gave.
        #[test]
        fn read_replies_parse_as_through_the_redis_crate(reply in read_reply()) {
            let ids_are_text = |entries: &Value| match entries {
                Value::Array(items) => items.iter().all(|item| match item {
                    Value::Array(parts) => parts
                        .get(parts.len().saturating_sub(2))
                        .is_none_or(|id| into_string(id.clone()).is_some()),
                    _ => true,
                }),
                _ => true,
            };
            let mut bytes = Vec::new();
            encode(&reply, &mut bytes);
            let valid = match &reply {
                Value::Array(streams) => streams.iter().all(|stream| match stream {
                    Value::Array(parts) => ids_are_text(&parts[1]),
                    _ => true,
                }),
                _ => true,
            };
            if valid {
                proptest::prop_assert_eq!(
                    parse_read_resp(&bytes).unwrap(),
                    parse_read(redis::parse_redis_value(&bytes).unwrap()).unwrap()
                );
            } else {
                proptest::prop_assert_eq!(
                    parse_read_resp(&bytes).unwrap_err(),
                    "entry without an id"
                );
                proptest::prop_assert!(parse_read(redis::parse_redis_value(&bytes).unwrap()).is_err());
            }
        }
    }

    #[test]
    fn a_cut_or_garbled_read_reply_is_an_error() {
        let mut bytes = Vec::new();
        encode(
            &Value::Array(vec![Value::Array(vec![
                Value::BulkString(b"s".to_vec()),
                Value::Array(vec![Value::Array(vec![
                    Value::BulkString(b"1-0".to_vec()),
                    Value::Array(vec![
                        Value::BulkString(b"v".to_vec()),
                        Value::BulkString(b"{}".to_vec()),
                    ]),
                ])]),
            ])]),
            &mut bytes,
        );
        assert_eq!(parse_read_resp(&bytes).unwrap().len(), 1);
        for cut in 0..bytes.len() {
            assert!(parse_read_resp(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse_read_resp(b":1\r\n").is_err());
    }

    #[test]
    fn ids_compare_numerically() {
        assert!(parse_id("1700000000000-10") > parse_id("1700000000000-9"));
        assert_eq!(compare_ids("10-0", "9-5"), std::cmp::Ordering::Greater);
        assert_eq!(compare_ids("9-10", "9-9"), std::cmp::Ordering::Greater);
    }
}
