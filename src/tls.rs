//! TLS settings (`[client.tls]`, `[redis.tls]`, `[replication.tls]`, `[node.admin_tls]`) and
//! the rustls configurations built from them, rebuilt when the files change on disk
//! (cert-manager rotates certificates in place). This module reads files and builds
//! configurations; it owns no socket: `server::conn` runs handshakes and moves bytes.
//!
//! A rotation is noticed when a handshake begins, at most once per [`RELOAD_CHECK`]: the
//! files' modification times and sizes are compared with the ones the current configuration
//! was built from. A rotation that leaves the files unusable (half-written, a key that does
//! not match the certificate) keeps the previous configuration and logs why; connections
//! already open keep the keys they negotiated.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;

/// How often, at most, a handshake checks whether the files changed.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The CA bundle that verifies servers when a client-side link names no `ca_file`
/// (Debian's `ca-certificates`; the same path on most distributions).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One `*.tls` table. Present = TLS on for that link; files in PEM.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// This side's certificate chain (leaf first). A listening side must have one; a
    /// connecting side presents it as its client certificate.
    pub cert_file: String,
    /// The private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// CA certificates that verify the other side. A connecting side without one uses the
    /// system bundle ([`SYSTEM_CA_BUNDLE`]).
    pub ca_file: String,
    /// A listening side: refuse a client without a certificate signed by `ca_file`.
    /// Default: false on the client port and the admin port, true on the peer link.
    pub verify_clients: Option<bool>,
    /// A connecting side: the name the other side's certificate must carry. Default: the
    /// host part of the address connected to (an IP address must then be in the
    /// certificate's subject alternative names).
    pub server_name: String,
}

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file the table names cannot be read.
    #[error("[{link}] cannot read `{field}` {path}: {reason}")]
    File { link: &'static str, field: &'static str, path: String, reason: String },
    /// A file was read but holds no usable PEM item of the kind the field needs.
    #[error("[{link}] `{field}` {path}: {reason}")]
    Pem { link: &'static str, field: &'static str, path: String, reason: String },
    /// A field this link needs is empty.
    #[error("[{link}] needs `{field}`: {why}")]
    Missing { link: &'static str, field: &'static str, why: &'static str },
    /// rustls refused the combination (a key that does not match the certificate, an
    /// unusable CA, a server name that is not a DNS name or IP address).
    #[error("[{link}] {reason}")]
    Rustls { link: &'static str, reason: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(link: &'static str, field: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    readable(link, field, path)?;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem { link, field, path: path.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { link, field, path: path.into(), reason: "no CERTIFICATE in the file".into() });
    }
    Ok(certs)
}

fn key(link: &'static str, path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    readable(link, "key_file", path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        link,
        field: "key_file",
        path: path.into(),
        reason: format!("no usable private key: {e}"),
    })
}

/// A clear error for a missing or unreadable file (the PEM reader's own is terse).
fn readable(link: &'static str, field: &'static str, path: &str) -> Result<(), TlsError> {
    std::fs::metadata(path).map(|_| ()).map_err(|e| TlsError::File {
        link,
        field,
        path: path.into(),
        reason: e.to_string(),
    })
}

fn roots(link: &'static str, path: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs(link, "ca_file", path)?);
    if added == 0 {
        return Err(TlsError::Pem {
            link,
            field: "ca_file",
            path: path.into(),
            reason: "no usable CA certificate".into(),
        });
    }
    Ok(Arc::new(store))
}

fn rustls_err(link: &'static str) -> impl Fn(rustls::Error) -> TlsError {
    move |e| TlsError::Rustls { link, reason: e.to_string() }
}

/// The rustls server side of a listening link.
pub fn server_config(link: &'static str, cfg: &TlsConfig, verify_default: bool) -> Result<ServerConfig, TlsError> {
    if cfg.cert_file.is_empty() {
        return Err(TlsError::Missing { link, field: "cert_file", why: "a listening side shows a certificate" });
    }
    if cfg.key_file.is_empty() {
        return Err(TlsError::Missing { link, field: "key_file", why: "the certificate needs its key" });
    }
    let chain = certs(link, "cert_file", &cfg.cert_file)?;
    let key = key(link, &cfg.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err(link))?;
    let builder = if cfg.verify_clients.unwrap_or(verify_default) {
        if cfg.ca_file.is_empty() {
            return Err(TlsError::Missing {
                link,
                field: "ca_file",
                why: "verifying clients needs the CA that signs them",
            });
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(link, &cfg.ca_file)?, provider())
                .build()
                .map_err(|e| TlsError::Rustls { link, reason: e.to_string() })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder.with_single_cert(chain, key).map_err(rustls_err(link))
}

/// The rustls client side of a connecting link.
pub fn client_config(link: &'static str, cfg: &TlsConfig) -> Result<ClientConfig, TlsError> {
    let ca = if cfg.ca_file.is_empty() { SYSTEM_CA_BUNDLE } else { cfg.ca_file.as_str() };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err(link))?
        .with_root_certificates(roots(link, ca)?);
    match (cfg.cert_file.is_empty(), cfg.key_file.is_empty()) {
        (true, true) => Ok(builder.with_no_client_auth()),
        (false, false) => {
            let chain = certs(link, "cert_file", &cfg.cert_file)?;
            builder.with_client_auth_cert(chain, key(link, &cfg.key_file)?).map_err(rustls_err(link))
        }
        (false, true) => Err(TlsError::Missing { link, field: "key_file", why: "the certificate needs its key" }),
        (true, false) => Err(TlsError::Missing { link, field: "cert_file", why: "the key needs its certificate" }),
    }
}

/// What identifies a version of a file: modification and change times, inode and size
/// (a copy that keeps the modification time still gets a new inode or change time; a
/// Kubernetes Secret volume swaps a symlink, which `metadata` follows).
type Stamp = Vec<Option<(SystemTime, i64, i64, u64, u64)>>;

fn stamp(cfg: &TlsConfig) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let ca = if cfg.ca_file.is_empty() { SYSTEM_CA_BUNDLE } else { cfg.ca_file.as_str() };
    [cfg.cert_file.as_str(), cfg.key_file.as_str(), ca]
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| {
            let m = std::fs::metadata(Path::new(p)).ok()?;
            Some((m.modified().ok()?, m.ctime(), m.ctime_nsec(), m.ino(), m.len()))
        })
        .collect()
}

struct Current<T> {
    config: Arc<T>,
    stamp: Stamp,
    checked: Instant,
    /// Files seen changed but unusable: not rebuilt (nor warned about) again until they
    /// change once more.
    failed: Option<Stamp>,
}

/// A rustls configuration that follows its files: [`Reloading::current`] hands out the
/// configuration for the next handshake, rebuilt when the files changed.
pub struct Reloading<T> {
    /// The table's name, for logs (`client.tls`).
    pub link: &'static str,
    cfg: TlsConfig,
    build: fn(&'static str, &TlsConfig, bool) -> Result<T, TlsError>,
    verify_default: bool,
    current: Mutex<Current<T>>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reloading({})", self.link)
    }
}

impl<T> Reloading<T> {
    fn new(
        link: &'static str,
        cfg: &TlsConfig,
        verify_default: bool,
        build: fn(&'static str, &TlsConfig, bool) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let stamp = stamp(cfg);
        let config = Arc::new(build(link, cfg, verify_default)?);
        Ok(Reloading {
            link,
            cfg: cfg.clone(),
            build,
            verify_default,
            current: Mutex::new(Current { config, stamp, checked: Instant::now(), failed: None }),
        })
    }

    /// The configuration for a handshake beginning at `now`.
    pub fn current(&self, now: Instant) -> Arc<T> {
        let mut cur = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if now.saturating_duration_since(cur.checked) >= RELOAD_CHECK {
            cur.checked = now;
            let seen = stamp(&self.cfg);
            if seen != cur.stamp && cur.failed.as_ref() != Some(&seen) {
                match (self.build)(self.link, &self.cfg, self.verify_default) {
                    Ok(c) => {
                        tracing::info!(link = self.link, "TLS files changed: new handshakes use them");
                        cur.config = Arc::new(c);
                        cur.stamp = seen;
                        cur.failed = None;
                    }
                    // Half-written by a rotation, or wrong: keep serving with what works, and
                    // try again once the files change again (finishing a write changes them).
                    Err(e) => {
                        tracing::warn!(link = self.link, "TLS files changed but cannot be used yet: {e}");
                        cur.failed = Some(seen);
                    }
                }
            }
        }
        cur.config.clone()
    }
}

/// A listening link's TLS.
pub type ServerTls = Reloading<ServerConfig>;
/// A connecting link's TLS.
pub type ClientTls = Reloading<ClientConfig>;

/// Build a listening link's TLS (`verify_default`: whether clients must show a certificate
/// when `verify_clients` is not set).
pub fn server(link: &'static str, cfg: &TlsConfig, verify_default: bool) -> Result<ServerTls, TlsError> {
    Reloading::new(link, cfg, verify_default, server_config)
}

/// Build a connecting link's TLS.
pub fn client(link: &'static str, cfg: &TlsConfig) -> Result<ClientTls, TlsError> {
    Reloading::new(link, cfg, false, |link, cfg, _| client_config(link, cfg))
}

impl ClientTls {
    /// The name `host`'s certificate must carry: `server_name` when configured, else `host`
    /// itself (an IP address or a DNS name).
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = if self.cfg.server_name.is_empty() { host } else { self.cfg.server_name.as_str() };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(name.to_string())
            .map_err(|e| TlsError::Rustls { link: self.link, reason: format!("server name `{name}`: {e}") })
    }
}

/// The host part of `host:port` (brackets kept off an IPv6 address).
pub fn host_of(addr: &str) -> &str {
    match addr.rfind(':') {
        Some(i) if !addr[..i].is_empty() => addr[..i].trim_start_matches('[').trim_end_matches(']'),
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("10.0.0.2:7381"), "10.0.0.2");
        assert_eq!(host_of("redis-b.ns.svc:6379"), "redis-b.ns.svc");
        assert_eq!(host_of("[::1]:6379"), "::1");
        assert_eq!(host_of("nohost"), "nohost");
    }

    #[test]
    fn missing_files_name_the_field() {
        let cfg = TlsConfig {
            cert_file: "/nonexistent/c.pem".into(),
            key_file: "/nonexistent/k.pem".into(),
            ..Default::default()
        };
        let e = server("client.tls", &cfg, false).unwrap_err().to_string();
        assert!(e.contains("client.tls") && e.contains("cert_file") && e.contains("/nonexistent/c.pem"), "{e}");
        let e = server("replication.tls", &TlsConfig::default(), true).unwrap_err().to_string();
        assert!(e.contains("cert_file"), "{e}");
        let cfg = TlsConfig { cert_file: "x".into(), ..Default::default() };
        let e = client("redis.tls", &cfg).unwrap_err().to_string();
        assert!(e.contains("key_file") || e.contains("ca_file"), "{e}");
    }
}
