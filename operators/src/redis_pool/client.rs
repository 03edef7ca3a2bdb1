//! The one constructor of Redis clients: a URL with ecst's TLS options.
//!
//! TLS (`rediss://`) verifies the server against the system roots, or against the CA file of
//! `tls_ca`; `tls_cert` and `tls_key` present a client certificate; the redis crate's
//! `#insecure` fragment skips verification.

use std::collections::HashMap;

use redis::{Client, ClientTlsConfig, ErrorKind, RedisError, TlsCertificates};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::secret::SecretUrl;

/// The query options ecst reads from a Redis URL (and removes before the redis crate sees it).
const TLS_OPTIONS: [&str; 3] = ["tls_ca", "tls_cert", "tls_key"];

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisUrlError {
    /// The redis crate rejected the URL.
    #[error("{0}")]
    Url(RedisError),
    /// The URL does not parse at all.
    #[error("{0}")]
    Syntax(#[from] url::ParseError),
    /// A `tls_*` query option ecst does not know.
    #[error("unknown option `{0}`: the TLS options are tls_ca, tls_cert and tls_key")]
    UnknownOption(String),
    /// A TLS option on a plain `redis://` URL.
    #[error("`{0}` needs a rediss:// URL (TLS)")]
    NotTls(String),
    /// `tls_cert` without `tls_key` or the reverse.
    #[error("tls_cert and tls_key must be given together")]
    ClientCertPair,
    /// `tls_ca` together with `#insecure`, which would ignore it.
    #[error("tls_ca has no effect with #insecure, which skips certificate verification")]
    InsecureWithCa,
    /// A certificate or key file that cannot be read.
    #[error("{option}={path}: {reason}")]
    File {
        /// The URL option naming the file.
        option: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A single-node URL with a comma-separated host list.
    #[error("a redis:// URL names one server; for a Redis Cluster list its seed nodes as {0}")]
    HostList(String),
    /// A cluster URL with an empty entry in its host list.
    #[error(
        "a cluster URL lists its seed nodes as host:port separated by commas, without empty entries"
    )]
    EmptySeed,
    /// A PEM file the TLS library cannot use.
    #[error("TLS certificates: {0}")]
    Pem(RedisError),
}

/// Builds the client for `url`, one server, reading its TLS files; the one way ecst makes a
/// single-node Redis client.
pub fn redis_client(url: &SecretUrl) -> Result<Client, RedisUrlError> {
    reject_host_list(url)?;
    let TlsParts { url, certificates } = tls_parts(url.expose())?;
    match certificates {
        None => Client::open(url).map_err(RedisUrlError::Url),
        Some(certificates) => Client::build_with_tls(url, certificates).map_err(|e| {
            if e.kind() == ErrorKind::Io {
                RedisUrlError::Pem(e)
            } else {
                RedisUrlError::Url(e)
            }
        }),
    }
}

/// A URL without ecst's `tls_*` options, and the certificates they name.
pub(super) struct TlsParts {
    /// The URL for the redis crate.
    pub(super) url: String,
    /// The files of `tls_ca`, `tls_cert` and `tls_key`, when any was given.
    pub(super) certificates: Option<TlsCertificates>,
}

/// Checks and reads the TLS options of `url` and takes them out of it.
pub(super) fn tls_parts(url: &str) -> Result<TlsParts, RedisUrlError> {
    let mut parsed = url::Url::parse(url)?;
    let mut options: HashMap<String, String> = HashMap::new();
    let mut rest = Vec::new();
    for (key, value) in parsed.query_pairs() {
        if key.starts_with("tls_") {
            if !TLS_OPTIONS.contains(&key.as_ref()) {
                return Err(RedisUrlError::UnknownOption(key.into_owned()));
            }
            options.insert(key.into_owned(), value.into_owned());
        } else {
            rest.push((key.into_owned(), value.into_owned()));
        }
    }
    let tls = matches!(parsed.scheme(), "rediss" | "valkeys");
    if let Some(option) = TLS_OPTIONS.iter().find(|o| options.contains_key(**o)) {
        if !tls {
            return Err(RedisUrlError::NotTls((*option).to_string()));
        }
    } else {
        if tls {
            install_crypto_provider();
        }
        return Ok(TlsParts {
            url: url.to_string(),
            certificates: None,
        });
    }
    if parsed.fragment() == Some("insecure") && options.contains_key("tls_ca") {
        return Err(RedisUrlError::InsecureWithCa);
    }
    if options.contains_key("tls_cert") != options.contains_key("tls_key") {
        return Err(RedisUrlError::ClientCertPair);
    }
    parsed.set_query(None);
    if !rest.is_empty() {
        parsed.query_pairs_mut().extend_pairs(rest);
    }
    let read = |option: &'static str| -> Result<Option<Vec<u8>>, RedisUrlError> {
        options
            .get(option)
            .map(|path| {
                std::fs::read(path).map_err(|e| RedisUrlError::File {
                    option,
                    path: path.clone(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    };
    let (root_cert, client_cert, client_key) =
        (read("tls_ca")?, read("tls_cert")?, read("tls_key")?);
    // A file without certificates would fail every handshake later, with a vaguer message.
    for (option, pem) in [("tls_ca", &root_cert), ("tls_cert", &client_cert)] {
        let Some(pem) = pem else { continue };
        if !CertificateDer::pem_slice_iter(pem).any(|c| c.is_ok()) {
            return Err(RedisUrlError::File {
                option,
                path: options.get(option).cloned().unwrap_or_default(),
                reason: "no PEM certificate in it".to_string(),
            });
        }
    }
    let client_tls = match (client_cert, client_key) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    install_crypto_provider();
    Ok(TlsParts {
        url: parsed.to_string(),
        certificates: Some(TlsCertificates {
            client_tls,
            root_cert,
        }),
    })
}

/// Refuses a single-node URL that lists several hosts, pointing at the cluster form.
fn reject_host_list(url: &SecretUrl) -> Result<(), RedisUrlError> {
    let Some(parts) = UrlParts::split(url.expose()) else {
        return Ok(());
    };
    let cluster_scheme = match parts.scheme.to_ascii_lowercase().as_str() {
        "redis" | "valkey" => "redis+cluster",
        "rediss" | "valkeys" => "rediss+cluster",
        _ => return Ok(()),
    };
    if !parts.hosts.contains(',') {
        return Ok(());
    }
    let rest = &url.expose()[parts.scheme.len()..];
    Err(RedisUrlError::HostList(
        SecretUrl::new(format!("{cluster_scheme}{rest}")).redacted(),
    ))
}

/// A URL cut at its host list: `scheme://userinfo@hosts rest`, split the way the redis crate
/// reads it (the authority ends at the first `/`, `?` or `#`, the userinfo at its last `@`).
pub(super) struct UrlParts<'a> {
    /// Before `://`.
    pub(super) scheme: &'a str,
    /// `user:password`, without the `@`; empty when there is none.
    pub(super) userinfo: &'a str,
    /// `host:port` or a comma-separated list of them.
    pub(super) hosts: &'a str,
    /// Path, query and fragment.
    pub(super) rest: &'a str,
}

impl<'a> UrlParts<'a> {
    /// Splits `url`; `None` without `://`.
    pub(super) fn split(url: &'a str) -> Option<Self> {
        let (scheme, after) = url.split_once("://")?;
        let (authority, rest) = after.split_at(after.find(['/', '?', '#']).unwrap_or(after.len()));
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..at], &authority[at + 1..]),
            None => ("", authority),
        };
        Some(UrlParts {
            scheme,
            userinfo,
            hosts,
            rest,
        })
    }
}

/// Makes ring the process's rustls provider (as for Postgres), which the redis crate's TLS
/// uses; a provider installed earlier is kept.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The ACL user a URL logs in as (`default` when it names none).
pub fn redis_user(url: &SecretUrl) -> String {
    UrlParts::split(url.expose())
        .map(|parts| parts.userinfo.split(':').next().unwrap_or_default())
        .filter(|user| !user.is_empty())
        .unwrap_or("default")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_error(url: &str) -> String {
        match redis_client(&SecretUrl::new(url)) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tls_options_are_checked_before_connecting() {
        assert_eq!(client_error("rediss://127.0.0.1:6380"), "ok");
        assert_eq!(client_error("rediss://127.0.0.1:6380/#insecure"), "ok");
        assert_eq!(
            client_error("redis://127.0.0.1/?tls_ca=/etc/ca.pem"),
            "`tls_ca` needs a rediss:// URL (TLS)"
        );
        assert_eq!(
            client_error("rediss://127.0.0.1/?tls_cafile=x"),
            "unknown option `tls_cafile`: the TLS options are tls_ca, tls_cert and tls_key"
        );
        assert_eq!(
            client_error("rediss://127.0.0.1/?tls_cert=/etc/c.pem"),
            "tls_cert and tls_key must be given together"
        );
        assert!(
            client_error("rediss://127.0.0.1/?tls_ca=/nonexistent/ca.pem")
                .starts_with("tls_ca=/nonexistent/ca.pem: ")
        );
        let dir = std::env::temp_dir().join(format!("ecst-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let url = format!("rediss://127.0.0.1/?tls_ca={}", not_pem.display());
        assert_eq!(
            client_error(&format!("{url}#insecure")),
            "tls_ca has no effect with #insecure, which skips certificate verification"
        );
        assert_eq!(
            client_error(&url),
            format!("tls_ca={}: no PEM certificate in it", not_pem.display())
        );
    }

    #[test]
    fn the_user_comes_from_the_url() {
        assert_eq!(redis_user(&SecretUrl::new("redis://app:pw@h:1")), "app");
        assert_eq!(redis_user(&SecretUrl::new("redis://:pw@h:1")), "default");
    }
}
