//! The certificates of a TLS listener: one or more certificate and key files, chosen per
//! handshake by the name the client asks for (SNI), and read again when their files change,
//! so a renewed certificate is served without a restart (connections already open keep
//! theirs). A pair that fails to load at start is an error; one that fails later keeps the
//! certificate it had, and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate chain file and its private key file (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate or key that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("{cert} with {key}: {what}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        what: String,
    },
}

/// When a file last changed, as far as a reload can tell.
type Stamp = Option<(SystemTime, u64)>;

/// The listener's certificates, in the order given: the first is served to clients that ask
/// for no name, or a name no certificate covers.
#[derive(Debug)]
pub struct CertStore {
    pairs: Vec<CertPair>,
    keys: RwLock<Vec<Arc<CertifiedKey>>>,
    stamps: Mutex<Vec<(Stamp, Stamp)>>,
}

impl CertStore {
    /// Reads every pair; any that cannot be used is an error naming its file.
    pub fn load(pairs: Vec<CertPair>) -> Result<Arc<CertStore>, CertError> {
        let mut keys = Vec::new();
        let mut stamps = Vec::new();
        for pair in &pairs {
            stamps.push((stamp(&pair.cert), stamp(&pair.key)));
            keys.push(Arc::new(certified_key(pair)?));
        }
        Ok(Arc::new(CertStore {
            pairs,
            keys: RwLock::new(keys),
            stamps: Mutex::new(stamps),
        }))
    }

    /// Reads again the pairs whose files changed since the last look. Returns the pairs
    /// reloaded, and the errors of those that could not be (they keep their old certificate).
    pub fn reload_if_changed(&self) -> (usize, Vec<CertError>) {
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        let (mut reloaded, mut errors) = (0, Vec::new());
        for (i, pair) in self.pairs.iter().enumerate() {
            let now = (stamp(&pair.cert), stamp(&pair.key));
            if now == stamps[i] {
                continue;
            }
            stamps[i] = now;
            match certified_key(pair) {
                Ok(key) => {
                    self.keys.write().unwrap_or_else(|p| p.into_inner())[i] = Arc::new(key);
                    reloaded += 1;
                }
                Err(error) => errors.push(error),
            }
        }
        (reloaded, errors)
    }

    /// A server configuration that takes its certificates from here: TLS 1.2 and 1.3,
    /// ALPN `h2` then `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// The certificate for `name`: the first whose names cover it, else the first one.
    fn choose(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        name.and_then(|name| keys.iter().find(|key| covers(key, name)).cloned())
            .or_else(|| keys.first().cloned())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// True when the certificate's names (its subject alternative names) cover `name`.
fn covers(key: &CertifiedKey, name: &str) -> bool {
    let (Ok(der), Ok(name)) = (key.end_entity_cert(), ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(der)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

fn certified_key(pair: &CertPair) -> Result<CertifiedKey, CertError> {
    let file = |path: &Path, what: String| CertError::File {
        path: path.to_path_buf(),
        what,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
        .map_err(|e| file(&pair.cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file(&pair.cert, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(file(&pair.cert, "holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&pair.key)
        .map_err(|e| file(&pair.key, format!("no usable PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| CertError::Pair {
        cert: pair.cert.clone(),
        key: pair.key.clone(),
        what: e.to_string(),
    })
}
