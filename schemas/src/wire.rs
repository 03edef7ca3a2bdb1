//! Stream entry fields, content types and body decoding.

use serde_json::Value;

use crate::envelope::Members;
use crate::selection::{MembersSeed, PayloadSelection};

/// Stream entry field holding the event body.
pub const FIELD_BODY: &str = "v";
/// Stream entry field holding the optional content type.
pub const FIELD_CONTENT_TYPE: &str = "ct";
/// Stream entry field holding the producer's W3C trace context.
pub const FIELD_TRACEPARENT: &str = "traceparent";

/// Content type of an event body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContentType {
    /// `application/json`, the default.
    Json,
    /// `application/msgpack` (rmp-serde encoding of the same envelope).
    MsgPack,
}

impl ContentType {
    /// The MIME name written in the `ct` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::MsgPack => "application/msgpack",
        }
    }

    /// Parses a `ct` field value as a media type (RFC 9110: `type/subtype` and `; name=value`
    /// parameters, names case-insensitive); unknown types are an error, never a guess. JSON is
    /// UTF-8 (RFC 8259), so a JSON `charset` other than UTF-8 is refused rather than misread.
    pub fn parse(name: &str) -> Result<Self, WireError> {
        let shown = || name.chars().take(64).collect::<String>();
        let mut parts = name.split(';');
        let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let ct = match essence.as_str() {
            "application/json" | "json" => ContentType::Json,
            "application/msgpack"
            | "application/x-msgpack"
            | "application/vnd.msgpack"
            | "msgpack" => ContentType::MsgPack,
            _ => return Err(WireError::UnsupportedContentType(shown())),
        };
        for parameter in parts {
            let parameter = parameter.trim();
            if parameter.is_empty() {
                continue;
            }
            let Some((key, value)) = parameter.split_once('=') else {
                return Err(WireError::UnsupportedContentType(shown()));
            };
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            if ct == ContentType::Json
                && key.trim().eq_ignore_ascii_case("charset")
                && !value.eq_ignore_ascii_case("utf-8")
                && !value.eq_ignore_ascii_case("utf8")
            {
                return Err(WireError::UnsupportedCharset(
                    value.chars().take(64).collect(),
                ));
            }
        }
        Ok(ct)
    }
}

/// Limits applied to a body before and while decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest accepted raw body, in bytes.
    pub max_bytes: usize,
    /// Deepest accepted nesting of arrays and objects.
    pub max_depth: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            max_bytes: 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The body is larger than the configured limit.
    #[error("body is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the body.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The `ct` field names a content type ecst does not read.
    #[error(
        "unsupported content type {0:?} (expected application/json or application/msgpack, parameters allowed)"
    )]
    UnsupportedContentType(String),
    /// The `ct` field says JSON in a character set other than UTF-8.
    #[error("unsupported charset {0:?} for application/json: JSON bodies must be UTF-8")]
    UnsupportedCharset(String),
    /// The body is not valid JSON.
    #[error("invalid JSON body: {0}")]
    Json(String),
    /// The body is not valid MessagePack.
    #[error("invalid MessagePack body: {0}")]
    MsgPack(String),
    /// The body is not a map (JSON object / MessagePack map).
    #[error("body is not an object")]
    NotAMap,
    /// The body nests deeper than the configured limit.
    #[error("body nests deeper than {0} levels")]
    TooDeep(usize),
}

/// Decodes a raw body into a JSON value, enforcing `limits` before and during decoding.
pub fn decode_body(bytes: &[u8], ct: ContentType, limits: BodyLimits) -> Result<Value, WireError> {
    let value: Value = decode_as(bytes, ct, limits)?;
    // JSON was measured whole before decoding (see `decode_members`).
    if ct == ContentType::MsgPack && depth(&value) > limits.max_depth {
        return Err(WireError::TooDeep(limits.max_depth));
    }
    Ok(value)
}

/// Decodes a canonical body straight into its members, without a mapping, keeping the payload
/// members `payload` selects; the payload's nesting counts one level below the body.
pub fn decode_members(
    bytes: &[u8],
    ct: ContentType,
    limits: BodyLimits,
    payload: &PayloadSelection,
) -> Result<Members, WireError> {
    // A struct would also accept an array positionally; a body must be a map.
    let is_map = match ct {
        ContentType::Json => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        ContentType::MsgPack => matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)),
    };
    if !is_map && bytes.len() <= limits.max_bytes {
        return Err(WireError::NotAMap);
    }
    let members = decode_seed(bytes, ct, limits, MembersSeed { payload })?;
    // A JSON body was measured whole before decoding; MessagePack's scan counts containers
    // differently at the edge, so its payload is measured again as JSON nests.
    if ct == ContentType::MsgPack
        && let Some(payload) = &members.payload
        && depth(payload) + 1 > limits.max_depth
    {
        return Err(WireError::TooDeep(limits.max_depth));
    }
    Ok(members)
}

fn decode_as<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    ct: ContentType,
    limits: BodyLimits,
) -> Result<T, WireError> {
    decode_seed(bytes, ct, limits, std::marker::PhantomData::<T>)
}

fn decode_seed<'de, S: serde::de::DeserializeSeed<'de>>(
    bytes: &'de [u8],
    ct: ContentType,
    limits: BodyLimits,
    seed: S,
) -> Result<S::Value, WireError> {
    if bytes.len() > limits.max_bytes {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    match ct {
        ContentType::Json => {
            // Unused members are skipped by serde_json without its nesting limit, so the
            // whole body is measured first, not only what is kept.
            if json_depth_exceeds(bytes, limits.max_depth) {
                return Err(WireError::TooDeep(limits.max_depth));
            }
            // JSON is UTF-8 (RFC 8259): checked once for the whole body, in word-wide steps,
            // instead of string by string as the parser would, unused members included.
            let text = std::str::from_utf8(bytes)
                .map_err(|e| WireError::Json(format!("the body is not UTF-8: {e}")))?;
            let mut de = serde_json::Deserializer::from_str(text);
            let value = seed
                .deserialize(&mut de)
                .and_then(|value| de.end().map(|()| value))
                .map_err(|e| WireError::Json(e.to_string()))?;
            Ok(value)
        }
        ContentType::MsgPack => {
            if msgpack_depth_exceeds(bytes, limits.max_depth) {
                return Err(WireError::TooDeep(limits.max_depth));
            }
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            seed.deserialize(&mut de)
                .map_err(|e| WireError::MsgPack(e.to_string()))
        }
    }
}

/// Encodes a value as a body of the given content type.
pub fn encode_body<T: serde::Serialize>(value: &T, ct: ContentType) -> Result<Vec<u8>, WireError> {
    match ct {
        ContentType::Json => serde_json::to_vec(value).map_err(|e| WireError::Json(e.to_string())),
        ContentType::MsgPack => {
            rmp_serde::to_vec_named(value).map_err(|e| WireError::MsgPack(e.to_string()))
        }
    }
}

fn depth(value: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// Whether the arrays and objects of a JSON text nest deeper than `max_depth`, counting
/// brackets outside strings in one pass without allocating. Malformed text is left to the
/// real decoder.
fn json_depth_exceeds(bytes: &[u8], max_depth: usize) -> bool {
    // Nesting cannot exceed the number of opening brackets, wherever they are: a count that
    // compiles to vector instructions settles almost every body without the exact scan.
    let opening: usize = bytes
        .chunks(255)
        .map(|chunk| {
            let in_chunk = chunk
                .iter()
                .fold(0u8, |n, &b| n + u8::from(b == b'[' || b == b'{'));
            usize::from(in_chunk)
        })
        .sum();
    if opening <= max_depth {
        return false;
    }
    let mut open = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                open += 1;
                if open > max_depth {
                    return true;
                }
            }
            b']' | b'}' => open = open.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Scans MessagePack container headers without allocating, so that a hostile body cannot make
/// the real decoder recurse or pre-allocate for declared lengths it never delivers.
fn msgpack_depth_exceeds(bytes: &[u8], max_depth: usize) -> bool {
    // Each stack slot holds how many items the open container still expects.
    let mut open: Vec<u64> = Vec::new();
    let mut pos = 0usize;
    let read_be = |pos: usize, n: usize| -> Option<u64> {
        let slice = bytes.get(pos..pos + n)?;
        Some(slice.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    while pos < bytes.len() {
        let marker = bytes[pos];
        pos += 1;
        // (payload bytes to skip, items of a new container)
        let (skip, container): (u64, Option<u64>) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, None),
            0x80..=0x8f => (0, Some(u64::from(marker & 0x0f) * 2)),
            0x90..=0x9f => (0, Some(u64::from(marker & 0x0f))),
            0xa0..=0xbf => (u64::from(marker & 0x1f), None),
            0xc4 | 0xd9 => (read_be(pos, 1).unwrap_or(u64::MAX).saturating_add(1), None),
            0xc5 | 0xda => (read_be(pos, 2).unwrap_or(u64::MAX).saturating_add(2), None),
            0xc6 | 0xdb => (read_be(pos, 4).unwrap_or(u64::MAX).saturating_add(4), None),
            0xc7 => (read_be(pos, 1).unwrap_or(u64::MAX).saturating_add(2), None),
            0xc8 => (read_be(pos, 2).unwrap_or(u64::MAX).saturating_add(3), None),
            0xc9 => (read_be(pos, 4).unwrap_or(u64::MAX).saturating_add(5), None),
            0xca | 0xce | 0xd2 => (4, None),
            0xcb | 0xcf | 0xd3 => (8, None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xd4 => (2, None),
            0xd5 => (3, None),
            0xd6 => (5, None),
            0xd7 => (9, None),
            0xd8 => (17, None),
            0xdc => (2, Some(read_be(pos, 2).unwrap_or(0))),
            0xdd => (4, Some(read_be(pos, 4).unwrap_or(0))),
            0xde => (2, Some(read_be(pos, 2).unwrap_or(0) * 2)),
            0xdf => (4, Some(read_be(pos, 4).unwrap_or(0) * 2)),
            0xc1 => return false, // never used; the real decoder reports it
        };
        pos = pos.saturating_add(usize::try_from(skip).unwrap_or(usize::MAX));
        // This item fills one slot of the innermost open container.
        if let Some(top) = open.last_mut() {
            *top = top.saturating_sub(1);
        }
        if let Some(items) = container
            && items > 0
        {
            open.push(items);
            if open.len() >= max_depth {
                return true;
            }
        }
        while open.last() == Some(&0) {
            open.pop();
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_and_msgpack_decode_to_the_same_value() {
        let value = serde_json::json!({"aggregateId": "a-1", "aggregateVersion": 3, "payload": {"x": [1, 2, {"y": null}]}});
        let json = encode_body(&value, ContentType::Json).unwrap();
        let mp = encode_body(&value, ContentType::MsgPack).unwrap();
        let limits = BodyLimits::default();
        assert_eq!(
            decode_body(&json, ContentType::Json, limits).unwrap(),
            value
        );
        assert_eq!(
            decode_body(&mp, ContentType::MsgPack, limits).unwrap(),
            value
        );
    }

    #[test]
    fn oversized_body_is_refused_before_decoding() {
        let limits = BodyLimits {
            max_bytes: 10,
            max_depth: 8,
        };
        let err = decode_body(b"{\"a\": \"0123456789\"}", ContentType::Json, limits).unwrap_err();
        assert_eq!(
            err,
            WireError::TooLarge {
                size: 19,
                limit: 10
            }
        );
    }

    #[test]
    fn deep_msgpack_is_refused() {
        // 200 nested one-element arrays.
        let mut bytes = vec![0x91u8; 200];
        bytes.push(0x01);
        let err = decode_body(&bytes, ContentType::MsgPack, BodyLimits::default()).unwrap_err();
        assert_eq!(err, WireError::TooDeep(64));
    }

    #[test]
    fn huge_declared_msgpack_length_does_not_allocate() {
        // array32 declaring 4 billion items but carrying none.
        let bytes = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_body(&bytes, ContentType::MsgPack, BodyLimits::default()).is_err());
        // map32 the same way.
        let bytes = [0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, b'a'];
        assert!(decode_body(&bytes, ContentType::MsgPack, BodyLimits::default()).is_err());
    }

    #[test]
    fn content_type_names() {
        assert_eq!(
            ContentType::parse("application/msgpack").unwrap(),
            ContentType::MsgPack
        );
        assert_eq!(
            ContentType::parse("Application/JSON").unwrap(),
            ContentType::Json
        );
        assert!(ContentType::parse("text/xml").is_err());
    }

    #[test]
    fn content_types_are_media_types_with_parameters() {
        for json in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;Charset=\"UTF-8\"",
            " application/json ; charset=utf8 ; profile=x",
            "application/json;",
        ] {
            assert_eq!(ContentType::parse(json), Ok(ContentType::Json), "{json}");
        }
        for msgpack in [
            "application/msgpack",
            "application/x-msgpack; v=1",
            "application/vnd.msgpack",
        ] {
            assert_eq!(
                ContentType::parse(msgpack),
                Ok(ContentType::MsgPack),
                "{msgpack}"
            );
        }
        assert_eq!(
            ContentType::parse("application/json; charset=latin1")
                .unwrap_err()
                .to_string(),
            "unsupported charset \"latin1\" for application/json: JSON bodies must be UTF-8"
        );
        assert_eq!(
            ContentType::parse("text/csv").unwrap_err().to_string(),
            "unsupported content type \"text/csv\" (expected application/json or application/msgpack, parameters allowed)"
        );
        assert!(ContentType::parse("application/json; charset").is_err());
        assert!(ContentType::parse("application/jsonx").is_err());
    }

    #[test]
    fn deep_nesting_anywhere_in_a_json_body_is_refused() {
        let limits = BodyLimits::default();
        // An unused member nested 10,000 deep: serde_json would skip it without a limit.
        let deep = format!(
            "{{\"aggregateId\":\"a\",\"aggregateVersion\":1,\"payload\":{{}},\"junk\":{}1{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(
            decode_members(
                deep.as_bytes(),
                ContentType::Json,
                limits,
                &PayloadSelection::All
            ),
            Err(WireError::TooDeep(64))
        );
        // Brackets inside strings do not count.
        let text = format!(
            "{{\"aggregateId\":\"a\\\"[[\",\"aggregateVersion\":1,\"payload\":{{\"s\":\"{}\"}}}}",
            "[".repeat(100)
        );
        let members = decode_members(
            text.as_bytes(),
            ContentType::Json,
            limits,
            &PayloadSelection::All,
        )
        .unwrap();
        assert_eq!(members.aggregate_id, Some(serde_json::json!("a\"[[")));
        // Exactly at the limit is accepted.
        let at_limit = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(decode_body(at_limit.as_bytes(), ContentType::Json, limits).is_ok());
    }

    #[test]
    fn a_json_body_must_be_utf8_even_in_members_nobody_reads() {
        let limits = BodyLimits::default();
        let body = b"{\"aggregateId\":\"a\",\"aggregateVersion\":1,\"junk\":\"\xff\"}";
        let err = decode_members(body, ContentType::Json, limits, &PayloadSelection::All)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid JSON body: the body is not UTF-8: invalid utf-8 sequence of 1 bytes from index"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = BodyLimits { max_bytes: 4096, max_depth: 16 };
            let _ = decode_body(&bytes, ContentType::Json, limits);
            let _ = decode_body(&bytes, ContentType::MsgPack, limits);
        }

        #[test]
        fn msgpack_prefixes_of_valid_bodies_never_panic(cut in 0usize..200, depth in 0usize..40) {
            let mut value = serde_json::json!({"aggregateId": "a", "aggregateVersion": 1});
            for _ in 0..depth { value = serde_json::json!([value, "x"]); }
            let bytes = encode_body(&value, ContentType::MsgPack).unwrap();
            let cut = cut.min(bytes.len());
            let _ = decode_body(&bytes[..cut], ContentType::MsgPack, BodyLimits::default());
        }
    }
}
