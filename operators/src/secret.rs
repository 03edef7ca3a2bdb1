//! Connection URLs and DSNs that may carry passwords: usable, but never printed in full.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Deserializer};

/// A connection URL (or libpq `key=value` DSN) whose password is masked in `Debug` and
/// `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The full URL, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

/// What replaces a secret.
const MASK: &str = "***";

/// Keys whose values are secrets: libpq's `password` and `sslpassword`, and the redis crate's
/// `pass` (its `redis+unix://` URLs take the password in the query string).
fn is_secret_key(key: &str) -> bool {
    ["password", "sslpassword", "pass"]
        .iter()
        .any(|secret| key.eq_ignore_ascii_case(secret))
}

/// Masks every password in a Postgres or Redis connection string, in any form:
/// - URL userinfo: `scheme://user:pw@host`, `scheme://:pw@host`;
/// - URL query parameters: `?password=pw`, `&sslpassword=pw`, `?pass=pw`;
/// - libpq `key=value` DSNs: `host=h password=pw`, `password = 'a b\'c'`.
///
/// Everything else (hosts, users, `sslkey`/`sslcert` paths) is kept, so the result still says
/// which server is meant.
pub fn redact(url: &str) -> String {
    match url.find("://") {
        Some(scheme_end) => redact_url(url, scheme_end + 3),
        None => redact_key_values(url),
    }
}

/// The URL form; `rest_start` is just past `://`.
fn redact_url(url: &str, rest_start: usize) -> String {
    let (scheme, rest) = url.split_at(rest_start);
    // Where the userinfo ends: at the last `@`. Drivers disagree (tokio-postgres stops at the
    // first `@`, the redis crate at the last `@` before the first `/`, `?` or `#`), and a
    // password may hold any of those; masking up to the last `@` never shows a part of one,
    // at worst it also hides a host or path.
    let userinfo_end = rest.rfind('@');
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    let after_userinfo = match userinfo_end {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            &rest[at..]
        }
        None => rest,
    };
    out.push_str(&redact_query(after_userinfo));
    out
}

/// Masks the value of every secret `key=value` that follows a `?` or `&`, wherever it is, so
/// that a malformed URL cannot slip one past; a value runs to the next `&`.
fn redact_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(delimiter) = rest.find(['?', '&']) {
        out.push_str(&rest[..=delimiter]);
        rest = &rest[delimiter + 1..];
        let pair_end = rest.find('&').unwrap_or(rest.len());
        if let Some((key, _)) = rest[..pair_end].split_once('=')
            && is_secret_key(&percent_decoded_key(key))
        {
            out.push_str(key);
            out.push('=');
            out.push_str(MASK);
            rest = &rest[pair_end..];
        }
    }
    out.push_str(rest);
    out
}

/// A query key with `%XX` escapes decoded, so `pass%77ord` is still recognised.
fn percent_decoded_key(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One `key = value` pair of a libpq connection string, as byte ranges into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnPair {
    /// The key.
    pub key: Range<usize>,
    /// The value as written, quotes and escapes included.
    pub value: Range<usize>,
}

impl DsnPair {
    /// The value with its quotes and backslash escapes removed, as libpq reads it.
    pub fn unquoted(&self, dsn: &str) -> String {
        let raw = &dsn[self.value.clone()];
        let inner = match raw.strip_prefix('\'') {
            Some(quoted) => quoted.strip_suffix('\'').unwrap_or(quoted),
            None => raw,
        };
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    }
}

/// The `key = value` pairs of a libpq connection string: values are bare (backslash escapes
/// allowed) or single-quoted (`\'` and `\\` escaped), so a quoted value may hold spaces and
/// `=`. Words that are not `key=value` are skipped (the driver refuses them).
pub fn dsn_pairs(dsn: &str) -> Vec<DsnPair> {
    let bytes = dsn.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    while i < bytes.len() {
        i = skip_space(i);
        let key_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = key_start..i;
        i = skip_space(i);
        if bytes.get(i) != Some(&b'=') {
            continue;
        }
        i = skip_space(i + 1);
        let value_start = i;
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = i.min(bytes.len());
        }
        // A backslash may have escaped a multi-byte character: end on a character boundary.
        while !dsn.is_char_boundary(i) {
            i += 1;
        }
        pairs.push(DsnPair {
            key,
            value: value_start..i,
        });
    }
    pairs
}

/// The libpq `key = value` form: only the secret values are replaced; all other text is kept
/// as is.
fn redact_key_values(dsn: &str) -> String {
    let mut out = String::with_capacity(dsn.len());
    // Start of the text not yet copied to `out`.
    let mut copied = 0;
    for pair in dsn_pairs(dsn) {
        if is_secret_key(&dsn[pair.key]) {
            out.push_str(&dsn[copied..pair.value.start]);
            out.push_str(MASK);
            copied = pair.value.end;
        }
    }
    out.push_str(&dsn[copied..]);
    out
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let url = SecretUrl::new("redis://app:s3cret@cache:6379/0");
        assert_eq!(url.to_string(), "redis://app:***@cache:6379/0");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.expose(), "redis://app:s3cret@cache:6379/0");
    }

    /// Each form, redacted, with the text that must remain.
    const FORMS: &[(&str, &str)] = &[
        // URL userinfo.
        ("redis://:pw@h", "redis://:***@h"),
        (
            "rediss://app:pw@cache:6380/2",
            "rediss://app:***@cache:6380/2",
        ),
        (
            "postgres://app:pw@db:5432/x?sslmode=require",
            "postgres://app:***@db:5432/x?sslmode=require",
        ),
        ("postgresql://:pw@db/x", "postgresql://:***@db/x"),
        // tokio-postgres takes the credentials up to the first `@`, `/` and `?` included.
        ("postgres://u:p/w?d@db/x", "postgres://u:***@db/x"),
        // The url crate's userinfo ends at the last `@` of the authority.
        ("redis://u:p@w@h:1/0", "redis://u:***@h:1/0"),
        // Passwords made by `openssl rand -base64`, and ones with `?`, `#` or `@`.
        ("redis://:Ab/cd+ef==@cache:6379", "redis://:***@cache:6379"),
        (
            "rediss://u:a?b#c@cache:6380/1",
            "rediss://u:***@cache:6380/1",
        ),
        ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
        // Query parameters.
        (
            "postgres://db/x?password=pw&application_name=a",
            "postgres://db/x?password=***&application_name=a",
        ),
        (
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=/ca.pem&password=p%26w",
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=/ca.pem&password=***",
        ),
        (
            "postgres://db/x?PassWord=pw&sslpassword=kp&sslkey=/k.pem&sslcert=/c.pem",
            "postgres://db/x?PassWord=***&sslpassword=***&sslkey=/k.pem&sslcert=/c.pem",
        ),
        (
            "postgres://db/x?pass%77ord=pw",
            "postgres://db/x?pass%77ord=***",
        ),
        (
            "redis+unix:///run/redis.sock?db=1&pass=pw",
            "redis+unix:///run/redis.sock?db=1&pass=***",
        ),
        // libpq key=value.
        (
            "host=127.0.0.1 port=1 password=pw sslmode=bogus",
            "host=127.0.0.1 port=1 password=*** sslmode=bogus",
        ),
        ("password=pw", "password=***"),
        (
            "host=db password = 'p w\\'x\\\\' user=app",
            "host=db password = *** user=app",
        ),
        (
            "host=db password=p\\ w user=app",
            "host=db password=*** user=app",
        ),
        ("host=db password='unterminated pw", "host=db password=***"),
        (
            "host=db sslpassword=kp sslkey=/etc/k.pem sslcert='/etc/c.pem'",
            "host=db sslpassword=*** sslkey=/etc/k.pem sslcert='/etc/c.pem'",
        ),
        ("host=db password=\\é user=x", "host=db password=*** user=x"),
        // Nothing secret: unchanged.
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("redis://user@h", "redis://user@h"),
        (
            "postgres://u@db/x?application_name=pass",
            "postgres://u@db/x?application_name=pass",
        ),
        ("host=db user=app dbname=x", "host=db user=app dbname=x"),
        ("", ""),
    ];

    #[test]
    fn every_form_is_redacted() {
        for (input, expected) in FORMS {
            assert_eq!(&redact(input), expected, "redact({input:?})");
        }
    }

    #[test]
    fn redaction_never_panics_and_never_grows_a_secret() {
        // Every prefix of every form, cut at each character: malformed input is still masked
        // or left alone, never a panic.
        for (input, _) in FORMS {
            for (cut, _) in input.char_indices() {
                let _ = redact(&input[..cut]);
            }
        }
        let redacted = redact("host=a password=Zz9secretQ");
        assert!(!redacted.contains("Zz9secretQ"));
    }

    #[test]
    fn dsn_values_are_unquoted_as_libpq_reads_them() {
        let dsn = r"host=db password = 'a b=c\'d\\' sslrootcert=/x\ y.pem user=app";
        let pairs: Vec<(&str, String)> = dsn_pairs(dsn)
            .iter()
            .map(|p| (&dsn[p.key.clone()], p.unquoted(dsn)))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("host", "db".to_string()),
                ("password", r"a b=c'd\".to_string()),
                ("sslrootcert", "/x y.pem".to_string()),
                ("user", "app".to_string()),
            ]
        );
    }
}
