//! Postgres connection URLs with libpq's TLS options (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`), connected over rustls.
//!
//! tokio-postgres understands only `sslmode=disable|prefer|require` and rejects the other
//! options, so they are taken out of the URL here and turned into a rustls client config with
//! libpq's meaning:
//!
//! | `sslmode` | encrypted | certificate checked |
//! | --- | --- | --- |
//! | `disable` | no | - |
//! | `allow`, `prefer` (default) | if the server offers it | no |
//! | `require` | yes | no; chain only when `sslrootcert` is given (as libpq) |
//! | `verify-ca` | yes | chain up to `sslrootcert` (or the system roots) |
//! | `verify-full` | yes | chain and host name |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::secret::dsn_pairs;

/// The TLS connector every ecst Postgres connection uses.
pub type PgTls = MakeRustlsConnect;

/// How much of the server's certificate is checked (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`: plain TCP.
    Disable,
    /// `allow` / `prefer`: TLS when the server offers it, certificate not checked.
    Prefer,
    /// `require`: TLS, certificate not checked.
    Require,
    /// `verify-ca`: TLS, chain checked, host name not.
    VerifyCa,
    /// `verify-full`: TLS, chain and host name checked.
    VerifyFull,
}

/// A parsed Postgres URL: the driver's config and the TLS connector it needs.
#[derive(Clone)]
pub struct PgTarget {
    /// The driver's config, TLS options removed.
    pub config: tokio_postgres::Config,
    /// The connector for `config`.
    pub tls: PgTls,
    /// The effective `sslmode`.
    pub mode: TlsMode,
}

/// A Postgres URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgUrlError {
    /// The driver rejected the URL.
    #[error("invalid Postgres URL: {0}")]
    Url(#[from] tokio_postgres::Error),
    /// An `sslmode` libpq does not know.
    #[error(
        "invalid sslmode `{0}`: expected disable, allow, prefer, require, verify-ca or verify-full"
    )]
    SslMode(String),
    /// A certificate or key file that cannot be read.
    #[error("{option}={path}: {reason}")]
    File {
        /// The URL option naming the file.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `sslcert` without `sslkey` or the reverse.
    #[error("sslcert and sslkey must be given together")]
    ClientCertPair,
    /// The system trust store could not be read.
    #[error("cannot load the system's root certificates: {0}")]
    SystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS options taken out of a URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsOptions {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl TlsOptions {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Parses `url` (URL or `key=value` form) and builds its TLS connector; reads certificate files.
pub fn parse_postgres_url(url: &str) -> Result<PgTarget, PgUrlError> {
    let (rest, options) = split_tls_options(url);
    let mode = match options.sslmode.as_deref() {
        None | Some("prefer") | Some("allow") => TlsMode::Prefer,
        Some("disable") => TlsMode::Disable,
        // libpq: with a root certificate given, `require` behaves like `verify-ca`.
        Some("require") if options.sslrootcert.is_some() => TlsMode::VerifyCa,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(other) => return Err(PgUrlError::SslMode(other.to_string())),
    };
    let mut config: tokio_postgres::Config = rest.parse()?;
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    let tls = MakeRustlsConnect::new(client_config(mode, &options)?);
    Ok(PgTarget { config, tls, mode })
}

/// Removes the TLS options from the query string (URL form) or the `key=value` list.
fn split_tls_options(url: &str) -> (String, TlsOptions) {
    let mut options = TlsOptions::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), options);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !options.take(key, percent_decode(value))
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, options)
    } else {
        // Pairs are cut out by their byte ranges, quoting respected: a quoted password that
        // holds ` sslrootcert=...` stays the password (it was taken as an option, and its
        // text printed in the file error).
        let mut kept = String::with_capacity(url.len());
        let mut copied = 0;
        for pair in dsn_pairs(url) {
            if options.take(&url[pair.key.clone()], pair.unquoted(url)) {
                kept.push_str(&url[copied..pair.key.start]);
                let after = &url[pair.value.end..];
                copied = url.len() - after.trim_start().len();
            }
        }
        kept.push_str(&url[copied..]);
        (kept.trim_end().to_string(), options)
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(mode: TlsMode, options: &TlsOptions) -> Result<ClientConfig, PgUrlError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(root_store(options.sslrootcert.as_deref())?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| PgUrlError::Tls(rustls::Error::General(e.to_string())))?;
            if mode == TlsMode::VerifyCa {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            } else {
                builder.with_webpki_verifier(webpki)
            }
        }
    };
    match (&options.sslcert, &options.sslkey) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certificates("sslcert", Path::new(cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| PgUrlError::File {
                option: "sslkey",
                path: key.into(),
                reason: e.to_string(),
            })?;
            Ok(builder.with_client_auth_cert(chain, key)?)
        }
        _ => Err(PgUrlError::ClientCertPair),
    }
}

/// `sslrootcert=<file>`, or the system's trust store for `system` or when absent.
fn root_store(sslrootcert: Option<&str>) -> Result<RootCertStore, PgUrlError> {
    let mut roots = RootCertStore::empty();
    match sslrootcert {
        Some(path) if path != "system" => {
            for cert in read_certificates("sslrootcert", Path::new(path))? {
                roots.add(cert).map_err(|e| PgUrlError::File {
                    option: "sslrootcert",
                    path: path.into(),
                    reason: e.to_string(),
                })?;
            }
        }
        _ => {
            let loaded = rustls_native_certs::load_native_certs();
            if loaded.certs.is_empty() {
                let reasons: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
                return Err(PgUrlError::SystemRoots(if reasons.is_empty() {
                    "no certificates found".into()
                } else {
                    reasons.join("; ")
                }));
            }
            roots.add_parsable_certificates(loaded.certs);
        }
    }
    Ok(roots)
}

fn read_certificates(
    option: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PgUrlError> {
    let failed = |reason: String| PgUrlError::File {
        option,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| failed(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// `prefer` / `require` without a root certificate: libpq encrypts without checking who the
/// server is. The handshake signatures are still verified.
#[derive(Debug)]
pub(crate) struct EncryptOnly(pub(crate) Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the WebPKI chain check, with a name mismatch forgiven.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked only after the chain, so a name error means the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_leave_the_url_the_driver_reads() {
        let (rest, options) = split_tls_options(
            "postgres://u:p@db:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=x");
        assert_eq!(options.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(options.sslrootcert.as_deref(), Some("/etc/ca.pem"));

        let (rest, options) = split_tls_options("host=db user=u sslmode=require dbname=app");
        assert_eq!(rest, "host=db user=u dbname=app");
        assert_eq!(options.sslmode.as_deref(), Some("require"));

        // Quoted values keep their spaces and `=`; the options around them are still found.
        let (rest, options) = split_tls_options(
            "host=db password='a  sslrootcert=b' sslrootcert='/etc/my ca.pem' user=u",
        );
        assert_eq!(rest, "host=db password='a  sslrootcert=b' user=u");
        assert_eq!(options.sslrootcert.as_deref(), Some("/etc/my ca.pem"));

        let (rest, _) = split_tls_options("postgres://db/app?sslmode=disable");
        assert_eq!(rest, "postgres://db/app");
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |url: &str| parse_postgres_url(url).map(|t| t.mode);
        assert_eq!(mode("postgres://db/app").unwrap(), TlsMode::Prefer);
        assert_eq!(
            mode("postgres://db/app?sslmode=allow").unwrap(),
            TlsMode::Prefer
        );
        assert_eq!(
            mode("postgres://db/app?sslmode=disable").unwrap(),
            TlsMode::Disable
        );
        assert_eq!(
            mode("postgres://db/app?sslmode=require").unwrap(),
            TlsMode::Require
        );
        let err = mode("postgres://db/app?sslmode=verify-everything")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("invalid sslmode `verify-everything`"), "{err}");
    }

    #[test]
    fn missing_certificate_files_are_named() {
        let err = parse_postgres_url(
            "postgres://db/app?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.starts_with("sslrootcert=/nonexistent/ca.pem: "),
            "{err}"
        );
        let err = parse_postgres_url("postgres://db/app?sslmode=require&sslcert=/x.pem")
            .err()
            .unwrap()
            .to_string();
        assert_eq!(err, "sslcert and sslkey must be given together");
    }

    #[test]
    fn a_quoted_password_is_never_read_as_an_option() {
        // Before: split on spaces, `sslrootcert=Zz9secretQ'` was taken as an option, and the
        // "file" error printed that part of the password.
        let target = parse_postgres_url(
            "host=db user=u password='p sslrootcert=Zz9secretQ' sslmode=require",
        )
        .map_err(|e| e.to_string())
        .unwrap();
        assert_eq!(target.mode, TlsMode::Require);
        assert_eq!(
            target.config.get_password(),
            Some(&b"p sslrootcert=Zz9secretQ"[..])
        );
    }
}

/// Against the real Postgres at `DATABASE_URL`, which must have `ssl = on` (Debian's default,
/// with its self-signed "snakeoil" certificate).
#[cfg(test)]
mod server_tests {
    use super::*;

    fn database_url() -> String {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    fn with_options(options: &str) -> String {
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{options}")
    }

    async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
        let target = parse_postgres_url(url).map_err(|e| e.to_string())?;
        let (client, connection) = target.config.connect(target.tls).await.map_err(|e| {
            format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )
        })?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn encrypted(client: &tokio_postgres::Client) -> bool {
        client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The server's own certificate, which is its own CA when self-signed.
    async fn server_certificate() -> String {
        let client = connect(&with_options("sslmode=disable")).await.unwrap();
        let row = client
            .query_one(
                "SELECT current_setting('ssl'), current_setting('ssl_cert_file')",
                &[],
            )
            .await
            .unwrap();
        let (ssl, file): (String, String) = (row.get(0), row.get(1));
        assert_eq!(ssl, "on", "the test Postgres must have ssl = on");
        file
    }

    #[tokio::test]
    async fn sslmodes_encrypt_and_verify_as_libpq_does() {
        let plain = connect(&with_options("sslmode=disable")).await.unwrap();
        assert!(!encrypted(&plain).await);
        let required = connect(&with_options("sslmode=require")).await.unwrap();
        assert!(encrypted(&required).await);
        let preferred = connect(&database_url()).await.unwrap();
        assert!(
            encrypted(&preferred).await,
            "prefer (the default) did not encrypt"
        );

        let cert = server_certificate().await;
        let verified = connect(&with_options(&format!(
            "sslmode=verify-ca&sslrootcert={cert}"
        )))
        .await
        .unwrap();
        assert!(encrypted(&verified).await);
    }

    #[tokio::test]
    async fn verification_failures_refuse_to_connect() {
        let cert = server_certificate().await;
        // The server's certificate names a host, never the loopback address the tests use.
        let err = connect(&format!(
            "host=127.0.0.1 user=postgres dbname=postgres sslmode=verify-full sslrootcert={cert}"
        ))
        .await
        .expect_err("verify-full accepted a certificate for another name");
        assert!(err.contains("not valid for name"), "{err}");
        let unrelated = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/unrelated-ca.pem");
        let err = connect(&with_options(&format!(
            "sslmode=verify-ca&sslrootcert={unrelated}"
        )))
        .await
        .expect_err("verify-ca accepted a certificate no given root signed");
        assert!(
            err.contains("UnknownIssuer") || err.contains("unknown issuer"),
            "{err}"
        );
    }
}
