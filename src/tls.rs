//! TLS: the listener side (rustls server, certificates chosen by SNI, ALPN
//! `h2` + `http/1.1`, TLS 1.2 and 1.3 only, server cipher order) and the
//! upstream side (rustls client with a CA bundle or the system roots).
//!
//! Certificates are parsed at load time: their DNS names (SAN, or CN when a
//! certificate has no SAN) become an exact/wildcard lookup table, so a
//! handshake costs one hash lookup to pick a certificate. The store sits in an
//! `ArcSwap` so a reload can replace certificates without touching open
//! connections.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{ListenerTls, Protocol, UpstreamTls};
use crate::upstream::UpstreamTlsConfig;

/// A certificate or key that could not be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The process's crypto provider (aws-lc-rs: includes the X25519MLKEM768
/// post-quantum key exchange).
pub fn provider() -> Arc<CryptoProvider> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    seed_random(&provider);
    Arc::new(provider)
}

/// Draws from the provider's random source once per process (every TLS
/// config is built on [`provider`]), so that its one-time seeding runs
/// while the config is loaded rather than inside the first client's
/// handshake. aws-lc seeds its generator from CPU jitter on first use: ~420 M instructions (callgrind), 43 ms on the 2-vCPU bench VM,
/// during which a one-worker proxy served nothing (first handshake 47 ms,
/// the next ones 3.7 ms, `curl -w %{time_appconnect}`).
fn seed_random(provider: &CryptoProvider) {
    static SEEDED: std::sync::Once = std::sync::Once::new();
    SEEDED.call_once(|| {
        let mut scratch = [0u8; 32];
        if provider.secure_random.fill(&mut scratch).is_err() {
            tracing::warn!("the TLS random source failed at start-up; handshakes will retry it");
        }
    });
}

/// Installs the provider process-wide (idempotent).
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A loaded certificate with what the resolver and metrics need.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lowercase DNS names; `*.example.com` for wildcards.
    pub names: Vec<String>,
    /// `notAfter` as Unix seconds.
    pub not_after: i64,
}

/// Loads a PEM chain and key, checks they belong together.
pub fn load_cert(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| file_err(cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_path, e))?;
    if chain.is_empty() {
        return Err(file_err(cert_path, "no PEM certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_err(key_path, e))?;
    let (names, not_after) = cert_facts(&chain[0]).map_err(|e| file_err(cert_path, e))?;
    let key = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| file_err(key_path, format!("does not fit the certificate: {e}")))?;
    Ok(LoadedCert {
        key: Arc::new(key),
        names,
        not_after,
    })
}

fn cert_facts(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Certificates of one listener.
#[derive(Debug)]
pub struct CertStore {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Earliest `notAfter` among the listener's certificates.
    pub not_after: i64,
}

impl CertStore {
    pub fn load(tls: &ListenerTls) -> Result<CertStore, TlsError> {
        let default = load_cert(&tls.cert, &tls.key)?;
        let mut store = CertStore {
            default: default.key.clone(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            not_after: default.not_after,
        };
        // SNI certificates first so that their names win over the default's.
        let mut all = Vec::new();
        for (c, k) in &tls.sni_certs {
            all.push(load_cert(c, k)?);
        }
        all.push(default);
        for cert in all {
            store.not_after = store.not_after.min(cert.not_after);
            for name in &cert.names {
                let map = match name.strip_prefix("*.") {
                    Some(rest) => store.wildcard.entry(rest.to_string()),
                    None => store.exact.entry(name.clone()),
                };
                map.or_insert_with(|| cert.key.clone());
            }
        }
        Ok(store)
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = sni {
            // rustls hands SNI over lowercased and without a trailing dot.
            if let Some(k) = self.exact.get(name) {
                return k.clone();
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(k) = self.wildcard.get(parent) {
                    return k.clone();
                }
            }
        }
        self.default.clone()
    }
}

/// Chooses a certificate by SNI; swappable on reload.
#[derive(Debug)]
pub struct SniResolver {
    pub store: ArcSwap<CertStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.load().pick(hello.server_name()))
    }
}

/// Builds a listener's rustls config.
pub fn server_config(tls: &ListenerTls) -> Result<(Arc<ServerConfig>, Arc<SniResolver>), TlsError> {
    let resolver = Arc::new(SniResolver {
        store: ArcSwap::from_pointee(CertStore::load(tls)?),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Ok((Arc::new(cfg), resolver))
}

/// Builds the client side for a pool's endpoints.
pub fn upstream_tls(
    tls: &UpstreamTls,
    protocol: Protocol,
    endpoint: std::net::SocketAddr,
) -> Result<UpstreamTlsConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|e| file_err(ca, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(ca, e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(file_err(ca, "no usable CA certificate"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = match protocol {
        Protocol::H2 => vec![b"h2".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    let server_name = match &tls.server_name {
        Some(n) => ServerName::try_from(n.clone()).map_err(|e| TlsError::File {
            path: "tls.server_name".into(),
            reason: e.to_string(),
        })?,
        None => ServerName::IpAddress(endpoint.ip().into()),
    };
    Ok(UpstreamTlsConfig {
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        server_name,
    })
}
