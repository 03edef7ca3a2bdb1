//! Claim-check references: a payload too large for the stream, stored elsewhere under its
//! content hash, and the envelope's `payloadRef` that names it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The store name of the Redis claim store.
pub const REDIS_STORE: &str = "redis";
/// The default prefix of claim keys in Redis; the key ends `sha256:<hex>` after it.
pub const DEFAULT_KEY_PREFIX: &str = "ecst:claim:";
/// Longest key a reference may name (a Redis key or a URL), in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Where a claim-checked payload lives and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRef {
    /// The store holding the body (`redis`).
    pub store: String,
    /// The body's key in that store; ends with `sha256:<hex>` (content-addressed).
    pub key: String,
    /// Lowercase hex SHA-256 of the stored bytes.
    pub sha256: String,
    /// Length of the stored bytes.
    pub size: u64,
}

/// Why a `payloadRef` is not a valid reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimRefError {
    /// Not an object with exactly `store`, `key`, `sha256` and `size`.
    #[error("must be an object with store, key, sha256 and size: {0}")]
    Shape(String),
    /// The store name is empty or not lowercase letters, digits, `-` and `_`.
    #[error("store `{0}` must be a non-empty name of lowercase letters, digits, - or _")]
    Store(String),
    /// The hash is not 64 lowercase hex digits.
    #[error("sha256 `{0}` must be 64 lowercase hex digits")]
    Sha256(String),
    /// The key is empty, too long, or does not end with the hash it claims.
    #[error("key `{key}` must be 1 to {MAX_KEY_BYTES} bytes ending with sha256:{sha256}")]
    Key {
        /// The key as written.
        key: String,
        /// The reference's hash.
        sha256: String,
    },
}

/// Why fetched bytes are not the body a reference names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimMismatch {
    /// The length differs from `size`.
    #[error("size {found} bytes, reference says {expected}")]
    Size {
        /// `size` of the reference.
        expected: u64,
        /// Length of the fetched bytes.
        found: u64,
    },
    /// The SHA-256 differs from `sha256`.
    #[error("sha256 {found}, reference says {expected}")]
    Sha256 {
        /// `sha256` of the reference.
        expected: String,
        /// Hash of the fetched bytes.
        found: String,
    },
}

impl ClaimRef {
    /// The reference to `body` stored in Redis under `prefix` + `sha256:<hex>`.
    pub fn redis(prefix: &str, body: &[u8]) -> ClaimRef {
        let sha256 = sha256_hex(body);
        ClaimRef {
            store: REDIS_STORE.to_string(),
            key: format!("{prefix}sha256:{sha256}"),
            sha256,
            size: body.len() as u64,
        }
    }

    /// Reads and validates a reference from its JSON form.
    pub fn from_value(value: Value) -> Result<ClaimRef, ClaimRefError> {
        let claim: ClaimRef =
            serde_json::from_value(value).map_err(|e| ClaimRefError::Shape(e.to_string()))?;
        claim.validate()?;
        Ok(claim)
    }

    /// Checks the reference's shape: a store name, a hex hash, a key ending with that hash.
    pub fn validate(&self) -> Result<(), ClaimRefError> {
        let name_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        if self.store.is_empty() || self.store.len() > 64 || !self.store.chars().all(name_char) {
            return Err(ClaimRefError::Store(shorten(&self.store)));
        }
        if !is_sha256_hex(&self.sha256) {
            return Err(ClaimRefError::Sha256(shorten(&self.sha256)));
        }
        let suffix_ok = self
            .key
            .strip_suffix(self.sha256.as_str())
            .is_some_and(|head| head.ends_with("sha256:"));
        if self.key.len() > MAX_KEY_BYTES || !suffix_ok {
            return Err(ClaimRefError::Key {
                key: shorten(&self.key),
                sha256: self.sha256.clone(),
            });
        }
        Ok(())
    }

    /// Checks fetched bytes against the reference: length first, then hash.
    pub fn check(&self, body: &[u8]) -> Result<(), ClaimMismatch> {
        let found = body.len() as u64;
        if found != self.size {
            return Err(ClaimMismatch::Size {
                expected: self.size,
                found,
            });
        }
        let hash = sha256_hex(body);
        if hash != self.sha256 {
            return Err(ClaimMismatch::Sha256 {
                expected: self.sha256.clone(),
                found: hash,
            });
        }
        Ok(())
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for byte in digest.iter() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn shorten(text: &str) -> String {
    if text.len() <= 80 {
        text.to_string()
    } else {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_redis_reference_is_content_addressed() {
        let claim = ClaimRef::redis(DEFAULT_KEY_PREFIX, b"abc");
        assert_eq!(
            claim.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(claim.key, format!("ecst:claim:sha256:{}", claim.sha256));
        assert_eq!(claim.size, 3);
        assert_eq!(claim.validate(), Ok(()));
        let back = ClaimRef::from_value(serde_json::to_value(&claim).unwrap()).unwrap();
        assert_eq!(back, claim);
    }

    #[test]
    fn bad_shapes_are_named() {
        let sha = sha256_hex(b"x");
        let good = json!({"store": "redis", "key": format!("ecst:claim:sha256:{sha}"), "sha256": sha, "size": 1});
        assert!(ClaimRef::from_value(good.clone()).is_ok());
        let with = |key: &str, value: Value| {
            let mut v = good.clone();
            v[key] = value;
            ClaimRef::from_value(v).unwrap_err().to_string()
        };
        assert!(with("size", json!(-1)).starts_with("must be an object"));
        assert!(with("extra", json!(1)).contains("unknown field `extra`"));
        assert!(with("store", json!("Redis!")).starts_with("store `Redis!`"));
        assert!(with("sha256", json!("ABC")).starts_with("sha256 `ABC`"));
        // A key naming another body than the hash it claims is refused.
        let other = sha256_hex(b"y");
        assert!(
            with("key", json!(format!("ecst:claim:sha256:{other}")))
                .starts_with("key `ecst:claim:sha256:")
        );
        assert!(with("key", json!(sha.clone())).starts_with("key `"));
        // Any prefix is fine as long as the key ends with the hash.
        assert!(
            ClaimRef::from_value({
                let mut v = good.clone();
                v["key"] = json!(format!("t1:claim:sha256:{sha}"));
                v
            })
            .is_ok()
        );
        assert!(ClaimRef::from_value(json!([1])).is_err());
    }

    #[test]
    fn check_compares_size_then_hash() {
        let claim = ClaimRef::redis(DEFAULT_KEY_PREFIX, b"hello");
        assert_eq!(claim.check(b"hello"), Ok(()));
        assert_eq!(
            claim.check(b"hell").unwrap_err().to_string(),
            "size 4 bytes, reference says 5"
        );
        let err = claim.check(b"jello").unwrap_err();
        assert!(matches!(err, ClaimMismatch::Sha256 { .. }), "{err}");
    }

    #[test]
    fn the_canonical_decode_path_reads_the_reference() {
        use crate::envelope::EnvelopeKeys;
        use crate::selection::PayloadSelection;
        use crate::wire::{BodyLimits, ContentType, decode_members};
        let claim = ClaimRef::redis(DEFAULT_KEY_PREFIX, b"{}");
        let body = serde_json::to_vec(
            &json!({"aggregateId": "a", "aggregateVersion": 1, "payloadRef": claim}),
        )
        .unwrap();
        let members = decode_members(
            &body,
            ContentType::Json,
            BodyLimits::default(),
            &PayloadSelection::nothing(),
        )
        .unwrap();
        let env = EnvelopeKeys::default().assemble(members).unwrap();
        assert_eq!(env.payload_ref, Some(claim));
        assert!(!env.is_tombstone());
    }
}
