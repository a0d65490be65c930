//! The interception CA: loads (or creates) the CA sluice signs with, and mints a short-lived
//! leaf certificate per intercepted host, cached with a bound.
//!
//! All leaves share one key pair generated at load: minting is then one signature, not a key
//! generation, which keeps the first CONNECT to a new host cheap. Leaves live `leaf_ttl` and are
//! re-minted an hour before they expire, so a cached leaf is never served stale.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::config::{ConfigError, Intercept, Problems};

/// A leaf is replaced when it has less than this much life left (or a quarter of its TTL).
const RENEW_BEFORE: Duration = Duration::from_secs(3600);

/// Why a leaf certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot mint a certificate for {host}: {source}")]
pub struct MintError {
    host: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaf_key: KeyPair,
    leaf_ttl: Duration,
    cache: Mutex<LeafCache>,
}

#[derive(Default)]
struct LeafCache {
    by_host: HashMap<String, CachedLeaf>,
    /// Insertion order, for evicting the oldest leaf when the cache is full.
    order: VecDeque<String>,
    capacity: usize,
}

struct CachedLeaf {
    config: Arc<ServerConfig>,
    renew_at: SystemTime,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").field("leaf_ttl", &self.leaf_ttl).finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA named in the config; when both files are absent, creates them first.
    pub fn load_or_generate(settings: &Intercept) -> Result<Self, ConfigError> {
        let (cert_path, key_path) = (&settings.ca_cert, &settings.ca_key);
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => {
                let (cert_pem, key_pem) =
                    generate_ca_pem().map_err(|error| ConfigError::at_key("intercept", error.to_string()))?;
                write_ca_files(cert_path, key_path, &cert_pem, &key_pem)
                    .map_err(|error| ConfigError::at_key("intercept.ca_cert", error.to_string()))?;
                tracing::warn!(
                    ca_cert = %cert_path.display(),
                    "Created a new interception CA; clients must trust this certificate."
                );
            }
            (true, false) => {
                return Err(ConfigError::at_key("intercept.ca_key", format!("{} does not exist", key_path.display())))
            }
            (false, true) => {
                return Err(ConfigError::at_key("intercept.ca_cert", format!("{} does not exist", cert_path.display())))
            }
            (true, true) => {}
        }
        // The two files are read (and then parsed) independently: every problem is reported.
        let mut problems = Problems::default();
        let cert_pem = problems.keep(std::fs::read_to_string(cert_path).map_err(|error| {
            ConfigError::at_key("intercept.ca_cert", format!("cannot read {}: {error}", cert_path.display()))
        }));
        let key_pem = problems.keep(refuse_exposed_key(key_path).and_then(|()| {
            std::fs::read_to_string(key_path).map_err(|error| {
                ConfigError::at_key("intercept.ca_key", format!("cannot read {}: {error}", key_path.display()))
            })
        }));
        let (Some(cert_pem), Some(key_pem)) = (cert_pem, key_pem) else { return Err(problems.refusal()) };
        Self::from_pem(&cert_pem, &key_pem, settings.leaf_ttl, settings.leaf_cache_size)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str, leaf_ttl: Duration, capacity: usize) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let ca_key = problems.keep(load_key(key_pem).map_err(|error| {
            ConfigError::at_key("intercept.ca_key", format!("not a usable PEM private key: {error}"))
        }));
        let ca_der = problems.keep(
            CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|error| ConfigError::at_key("intercept.ca_cert", format!("not a PEM certificate: {error}"))),
        );
        let (Some(ca_key), Some(ca_der)) = (ca_key, ca_der) else { return Err(problems.refusal()) };
        let issuer = Issuer::from_ca_cert_pem(cert_pem, ca_key).map_err(|error| {
            ConfigError::at_key("intercept.ca_cert", format!("not a usable CA certificate: {error}"))
        })?;
        let leaf_key = KeyPair::generate()
            .map_err(|error| ConfigError::at_key("intercept", format!("key generation: {error}")))?;
        Ok(Self {
            issuer,
            ca_der,
            leaf_key,
            leaf_ttl,
            cache: Mutex::new(LeafCache { capacity, ..LeafCache::default() }),
        })
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// A TLS server config presenting a leaf for `host`, from the cache or freshly minted.
    pub fn server_config(&self, host: &str) -> Result<(Arc<ServerConfig>, bool), MintError> {
        let now = SystemTime::now();
        if let Some(leaf) = self.cache_lock().by_host.get(host) {
            if leaf.renew_at > now {
                return Ok((leaf.config.clone(), false));
            }
        }
        let config = Arc::new(self.mint(host)?);
        let renew_at = now + self.leaf_ttl.saturating_sub(RENEW_BEFORE.min(self.leaf_ttl / 4));
        let mut cache = self.cache_lock();
        if !cache.by_host.contains_key(host) {
            while cache.by_host.len() >= cache.capacity {
                match cache.order.pop_front() {
                    Some(oldest) => cache.by_host.remove(&oldest),
                    None => break,
                };
            }
            cache.order.push_back(host.to_owned());
        }
        cache.by_host.insert(host.to_owned(), CachedLeaf { config: config.clone(), renew_at });
        Ok((config, true))
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, LeafCache> {
        // A poisoned cache only means a panic elsewhere mid-insert; its data is still usable.
        crate::kit::lock(&self.cache)
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, MintError> {
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| MintError { host: host.to_owned(), source };
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(|error| fail(error.into()))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::seconds(self.leaf_ttl.as_secs() as i64);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&self.leaf_key, &self.issuer).map_err(|error| fail(error.into()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], key)
            .map_err(|error| fail(error.into()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A private key as PKCS#8, or as PKCS#1 RSA (what `openssl genrsa` and Helm's `genCA` write),
/// which is rewrapped into PKCS#8 for the signer.
fn load_key(pem: &str) -> Result<KeyPair, String> {
    match KeyPair::from_pem(pem) {
        Ok(key) => Ok(key),
        Err(first) => match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs1(rsa)) => {
                let wrapped = pkcs1_to_pkcs8(rsa.secret_pkcs1_der());
                KeyPair::try_from(&PrivatePkcs8KeyDer::from(wrapped)).map_err(|error| error.to_string())
            }
            _ => Err(first.to_string()),
        },
    }
}

/// PrivateKeyInfo { version 0, rsaEncryption, OCTET STRING pkcs1 } (RFC 5208), DER.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    fn length(len: usize) -> Vec<u8> {
        if len < 0x80 {
            return vec![len as u8];
        }
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
    const VERSION_AND_ALGORITHM: &[u8] = &[
        0x02, 0x01, 0x00, // INTEGER 0
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
        0x00, // rsaEncryption, NULL
    ];
    let mut octets = vec![0x04];
    octets.extend(length(pkcs1.len()));
    octets.extend_from_slice(pkcs1);
    let mut body = VERSION_AND_ALGORITHM.to_vec();
    body.extend(octets);
    let mut out = vec![0x30];
    out.extend(length(body.len()));
    out.extend(body);
    out
}

/// The CA key signs certificates every client trusts: a world-readable key file is refused.
fn refuse_exposed_key(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|error| ConfigError::at_key("intercept.ca_key", format!("cannot read {}: {error}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        return Err(ConfigError::at_key(
            "intercept.ca_key",
            format!(
                "{} is readable or writable by every user (mode {:o}); make it 0600 (or 0640/0440)",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

/// A new CA certificate and key, PEM: what `sluice ca init` writes.
pub fn generate_ca_pem() -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "sluice interception CA");
    name.push(DnType::OrganizationName, "sluice");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a CA pair; the key is created readable by its owner only. Refuses to overwrite.
pub fn write_ca_files(cert_path: &Path, key_path: &Path, cert_pem: &str, key_pem: &str) -> std::io::Result<()> {
    for path in [cert_path, key_path] {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut key_file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(key_path)?;
    key_file.write_all(key_pem.as_bytes())?;
    let mut cert_file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(cert_path)?;
    cert_file.write_all(cert_pem.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mints_and_caches_with_bound() {
        crate::tls::install_crypto_provider();
        let (cert, key) = generate_ca_pem().unwrap();
        let ca = CertAuthority::from_pem(&cert, &key, Duration::from_secs(86400), 2).unwrap();
        let (first, minted) = ca.server_config("api.hubapi.com").unwrap();
        assert!(minted);
        let (again, minted) = ca.server_config("api.hubapi.com").unwrap();
        assert!(!minted);
        assert!(Arc::ptr_eq(&first, &again));
        ca.server_config("a.example").unwrap();
        ca.server_config("b.example").unwrap();
        assert_eq!(ca.cache_lock().by_host.len(), 2);
        assert!(ca.server_config("127.0.0.1").is_ok());
    }
}
