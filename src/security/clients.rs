//! Proxy client identity for shared deployments: `Proxy-Authorization` (Basic or Bearer) is
//! matched against the configured clients, whose secrets are stored as SHA-256 hashes or read
//! from files. A known client may use only its listed upstreams; its name is its `proxy_user`
//! quota scope. Without `clients:`, sluice is a sidecar and serves loopback peers only (unless
//! `listen.allow_remote_clients`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http::header::PROXY_AUTHORIZATION;
use http::HeaderMap;
use subtle::{Choice, ConstantTimeEq};

use crate::config::{ClientSecret, ClientSettings, ConfigError, Problem, Problems};
use crate::error::{ErrorKind, ProxyError};

/// Who a request came from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub name: Arc<str>,
    upstreams: Arc<[String]>,
}

impl ClientIdentity {
    pub fn may_use(&self, upstream: &str) -> bool {
        self.upstreams.iter().any(|allowed| allowed == upstream || allowed == "*")
    }
}

#[derive(Debug, Clone)]
struct Client {
    name: Arc<str>,
    /// SHA-256 of the Basic user name, compared in constant time like the secret.
    user: [u8; 32],
    secret: Secret,
    upstreams: Arc<[String]>,
}

#[derive(Debug, Clone)]
enum Secret {
    Sha256([u8; 32]),
    File(SecretFile),
}

/// A file's modification time and the SHA-256 of its (trimmed) content.
type CachedDigest = (std::time::SystemTime, [u8; 32]);

/// A secret kept in a file: its digest is cached and re-read only when the file's modification
/// time changes, so a rotation is seen at once without a read on every request.
#[derive(Debug, Clone)]
struct SecretFile {
    path: PathBuf,
    cached: Arc<std::sync::Mutex<Option<CachedDigest>>>,
}

impl SecretFile {
    fn digest(&self) -> Option<[u8; 32]> {
        let modified = std::fs::metadata(&self.path).and_then(|meta| meta.modified()).ok()?;
        let mut cached = crate::kit::lock(&self.cached);
        if let Some((at, digest)) = *cached {
            if at == modified {
                return Some(digest);
            }
        }
        let text = std::fs::read_to_string(&self.path).ok()?;
        let digest = super::digest(text.trim().as_bytes());
        *cached = Some((modified, digest));
        Some(digest)
    }
}

impl Secret {
    /// Whether the secret's digest is `presented` (a SHA-256), in constant time.
    fn matches(&self, presented: &[u8; 32]) -> Choice {
        match self {
            Secret::Sha256(expected) => presented.ct_eq(expected),
            Secret::File(file) => match file.digest() {
                Some(stored) => presented.ct_eq(&stored),
                None => Choice::from(0),
            },
        }
    }
}

/// The configured clients, or none (sidecar mode).
#[derive(Debug, Clone, Default)]
pub struct Clients {
    clients: Vec<Client>,
    allow_remote: bool,
}

impl Clients {
    /// The clients of a config; a secret file that cannot be read is a problem of its key
    /// (every client's, not only the first).
    pub fn new(settings: &[ClientSettings], allow_remote: bool) -> Result<Self, ConfigError> {
        let mut clients = Vec::with_capacity(settings.len());
        let mut problems = Problems::default();
        for (at, client) in settings.iter().enumerate() {
            let secret = match &client.secret {
                ClientSecret::Sha256(digest) => Secret::Sha256(*digest),
                ClientSecret::File(path) => {
                    if let Err(error) = std::fs::metadata(path) {
                        problems.push(Problem::new(
                            format!("clients[{at}].secret_file"),
                            format!("cannot read {}: {error}", path.display()),
                        ));
                    }
                    Secret::File(SecretFile { path: path.clone(), cached: Arc::default() })
                }
            };
            clients.push(Client {
                name: client.name.clone(),
                user: super::digest(client.user.as_deref().unwrap_or(&client.name).as_bytes()),
                secret,
                upstreams: client.upstreams.clone().into(),
            });
        }
        problems.finish()?;
        Ok(Self { clients, allow_remote })
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Who sent `headers` from `peer`; `Ok(None)` in sidecar mode (no clients configured).
    pub fn identify(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Option<ClientIdentity>, ProxyError> {
        if self.clients.is_empty() {
            if self.allow_remote || peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback() {
                return Ok(None);
            }
            return Err(ProxyError::new(
                ErrorKind::ClientNotAllowed { detail: format!("{} is not a loopback client", peer.ip()) },
                None,
            ));
        }
        let required = || ProxyError::new(ErrorKind::ProxyAuthRequired, None);
        let value = headers.get(PROXY_AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(required)?;
        let (scheme, credentials) = value.trim().split_once(' ').ok_or_else(required)?;
        let client = if scheme.eq_ignore_ascii_case("basic") {
            let decoded = decode_base64(credentials.trim()).ok_or_else(required)?;
            let text = String::from_utf8(decoded).map_err(|_| required())?;
            let (user, password) = text.split_once(':').ok_or_else(required)?;
            let (user, password) = (super::digest(user.as_bytes()), super::digest(password.as_bytes()));
            self.find(|client| client.user.ct_eq(&user) & client.secret.matches(&password))
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let token = super::digest(credentials.trim().as_bytes());
            self.find(|client| client.secret.matches(&token))
        } else {
            None
        };
        let client = client.ok_or_else(required)?;
        Ok(Some(ClientIdentity { name: client.name.clone(), upstreams: client.upstreams.clone() }))
    }
}

impl Clients {
    /// The first client `test` accepts. Every client is tested, matching or not, and each test is
    /// constant-time, so how long a lookup takes says nothing about which name or secret is valid.
    fn find(&self, test: impl Fn(&Client) -> Choice) -> Option<&Client> {
        let mut found = None;
        for client in &self.clients {
            let matched: bool = test(client).into();
            if matched && found.is_none() {
                found = Some(client);
            }
        }
        found
    }
}

/// Standard base64 (RFC 4648 §4), padded or not, as clients send HTTP Basic credentials.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn basic_and_bearer() {
        let raw = vec![ClientSettings {
            name: "billing".into(),
            user: None,
            secret: ClientSecret::Sha256(crate::security::digest(b"s3cret")),
            upstreams: vec!["hubspot".into()],
        }];
        let clients = Clients::new(&raw, false).unwrap();
        let peer: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(clients.identify(&headers, peer).unwrap_err().code(), "proxy_auth_required");
        headers.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Basic YmlsbGluZzpzM2NyZXQ="));
        let identity = clients.identify(&headers, peer).unwrap().unwrap();
        assert!(identity.may_use("hubspot") && !identity.may_use("salesforce"));
        headers.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(clients.identify(&headers, peer).unwrap().is_some());
        headers.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer wrong"));
        assert!(clients.identify(&headers, peer).is_err());
    }

    #[test]
    fn sidecar_mode_is_loopback_only() {
        let clients = Clients::new(&[], false).unwrap();
        assert!(clients.identify(&HeaderMap::new(), "127.0.0.1:1".parse().unwrap()).unwrap().is_none());
        assert_eq!(
            clients.identify(&HeaderMap::new(), "10.0.0.1:1".parse().unwrap()).unwrap_err().code(),
            "client_not_allowed"
        );
        let open = Clients::new(&[], true).unwrap();
        assert!(open.identify(&HeaderMap::new(), "10.0.0.1:1".parse().unwrap()).is_ok());
    }
}
