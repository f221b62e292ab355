//! TLS configuration: rustls server and client configs, and the generated development PKI.
//!
//! The relay speaks TLS 1.2 and 1.3 only. On first start without `--cert/--key` it makes a
//! small CA and a server certificate signed by it; clients trust the CA (`--ca-file`), never a
//! "skip verification" switch, which does not exist in hyco.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A client's TLS connection to a relay (what the WebSocket connector dials and upgrades).
pub type ClientTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file held no certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was missing.
        what: &'static str,
    },
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// No trust anchor could be loaded at all.
    #[error("no trusted root certificates: {0}")]
    NoRoots(String),
}

/// ring's provider with AES-128-GCM preferred: every byte of a tunnel is sealed and opened on
/// four TLS legs, and AES-128 (10 rounds) is markedly cheaper than AES-256 (14 rounds) at the
/// same standard strength. ChaCha20-Poly1305 stays available for peers without AES hardware.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A PEM syntax error as the I/O error [`TlsError::Read`] carries.
fn pem_error(origin: &str, e: pem::Error) -> TlsError {
    TlsError::Read {
        path: origin.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// Parses every certificate in a PEM text.
pub fn parse_certs(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(origin, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: origin.into(),
            what: "no certificate found",
        });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#1, PKCS#8 or SEC1) in a PEM text.
pub fn parse_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Pem {
            path: origin.into(),
            what: "no private key found",
        },
        e => pem_error(origin, e),
    })
}

/// Server config from PEM files: TLS 1.2 + 1.3, HTTP/1.1 ALPN, session tickets for resumption.
pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = parse_certs(&read(cert)?, &cert.display().to_string())?;
    let key = parse_key(&read(key)?, &key.display().to_string())?;
    server_config(certs, key)
}

/// Server config from parsed material.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

/// Client config trusting the system roots, the bundled web roots, and `extra_ca` if given.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(path) = extra_ca {
        for c in parse_certs(&read(path)?, &path.display().to_string())? {
            roots
                .add(c)
                .map_err(|e| TlsError::NoRoots(format!("{}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots("the system store is empty".into()));
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A generated CA and a server certificate it signed, all PEM.
pub struct GeneratedPki {
    /// The CA certificate: what clients trust.
    pub ca_cert_pem: String,
    /// The CA key, kept so the server certificate can be re-issued for new host names.
    pub ca_key_pem: String,
    /// The server certificate.
    pub cert_pem: String,
    /// The server key.
    pub key_pem: String,
}

/// Makes a CA and a server certificate for `names` (DNS names or IP literals).
pub fn generate_pki(names: &[String]) -> Result<GeneratedPki, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "hyco relay local CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("hyco"),
    );
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(GeneratedPki {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
