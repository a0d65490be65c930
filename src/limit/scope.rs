//! Which bucket a request draws from: its [`QuotaKey`], from the quota's scope (`header:NAME`,
//! `client_ip`, `proxy_user`) and a bounded table of the scope values seen.
//!
//! A missing scope value goes to the `_default` bucket of that quota, so requests without a
//! tenant header share one bucket instead of escaping the limit. Values are used as they are when
//! short and plain, else as a SHA-256 prefix, so keys stay small and never leak a credential.
//! Each quota tracks at most `max_keys` values; past that the least recently used is evicted
//! (its bucket forgotten locally; in Redis it expires on its own) and counted.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use http::header::PROXY_AUTHORIZATION;
use http::HeaderMap;

use crate::config::ScopeKey;

/// The bucket name of a request for one quota: `<scope value>` or `_all` for unscoped quotas.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaKey(pub String);

/// Bucket used when a request lacks the scope value (no tenant header, say).
pub const DEFAULT_BUCKET: &str = "_default";

pub fn quota_key(scope: &[ScopeKey], headers: &HeaderMap, peer: Option<SocketAddr>) -> QuotaKey {
    quota_key_for(scope, headers, peer, None, None)
}

/// [`quota_key`], with the authenticated client's name for `proxy_user` when there is one, and
/// for `credential` what a changing injected credential stands for (a brokered OAuth token's
/// name, so a renewal keeps the bucket).
pub fn quota_key_for(
    scope: &[ScopeKey],
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    client: Option<&str>,
    credential: Option<&str>,
) -> QuotaKey {
    if scope.is_empty() {
        return QuotaKey("_all".to_owned());
    }
    let parts: Vec<String> = scope
        .iter()
        .map(|key| {
            let value = match key {
                ScopeKey::Header(name) => {
                    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).map(str::to_owned)
                }
                ScopeKey::ClientIp => peer.map(|peer| peer.ip().to_string()),
                ScopeKey::ProxyUser => client.map(str::to_owned).or_else(|| proxy_user(headers)),
                // Never the secret itself: a stable hash of it (or of what it stands for).
                ScopeKey::Credential(name) => match credential {
                    Some(stands_for) => Some(format!("c-{}", short_hash(stands_for))),
                    None => {
                        headers.get(name).map(|v| format!("c-{}", short_hash(&String::from_utf8_lossy(v.as_bytes()))))
                    }
                },
            };
            match value.filter(|value| !value.is_empty()) {
                Some(value) => safe_component(&value),
                None => DEFAULT_BUCKET.to_owned(),
            }
        })
        .collect();
    QuotaKey(parts.join("|"))
}

/// The client identity in `Proxy-Authorization`: the Basic user name, or a hash of a Bearer token.
pub fn proxy_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(PROXY_AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, credentials) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = crate::security::clients::decode_base64(credentials.trim())?;
        let text = String::from_utf8(decoded).ok()?;
        let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
        return Some(user.to_owned());
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(format!("token-{}", short_hash(credentials.trim())));
    }
    None
}

/// Headers that carry the caller's (or the injected) credential to the vendor.
pub const AUTH_HEADERS: &[&str] = &["authorization", "x-api-key", "api-key", "x-hubspot-api-key"];

/// Which vendor account a request spends: a hash of every auth-bearing header it carries to the
/// vendor (`extra`: the upstream's own `credentials.header`), or `_all` when it carries none.
/// Vendor pauses are keyed by it: a caller cannot dodge a pause by changing a scope header, and
/// one account's throttle does not hold another's. `credential` stands for the value of the
/// `extra` header when that value changes over time (a brokered OAuth token), so a renewal does
/// not forget a pause.
pub fn account_key(headers: &HeaderMap, extra: Option<&str>, credential: Option<&str>) -> String {
    let mut material = String::new();
    for name in AUTH_HEADERS.iter().copied().chain(extra.filter(|extra| !AUTH_HEADERS.contains(extra))) {
        if let (Some(stands_for), true) = (credential, Some(name) == extra) {
            material.push_str(name);
            material.push_str("~=");
            material.push_str(stands_for);
            material.push('\n');
            continue;
        }
        for value in headers.get_all(name) {
            material.push_str(name);
            material.push('=');
            material.push_str(&String::from_utf8_lossy(value.as_bytes()));
            material.push('\n');
        }
    }
    if material.is_empty() {
        return "_all".to_owned();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    let hex: String = digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("a-{hex}")
}

fn safe_component(value: &str) -> String {
    let plain = value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@' | b':'));
    if plain {
        value.to_owned()
    } else {
        format!("h-{}", short_hash(value))
    }
}

/// First 16 hex digits of SHA-256: stable across replicas and processes.
pub fn short_hash(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The scope values of one quota, least recently used first out.
#[derive(Debug)]
pub struct ScopeTable {
    capacity: usize,
    entries: HashMap<QuotaKey, Entry>,
    by_tick: BTreeMap<u64, QuotaKey>,
    tick: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    tick: u64,
    hits: u64,
    /// The scope's bucket key (the limiter builds it once per scope value) and the variant it
    /// was built for (the window kind, which a reload can change).
    bucket: String,
    variant: u8,
}

impl ScopeTable {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), entries: HashMap::new(), by_tick: BTreeMap::new(), tick: 0 }
    }

    /// Records a use of `key`; returns the key evicted to make room, if any.
    pub fn touch(&mut self, key: &QuotaKey) -> Option<QuotaKey> {
        self.touch_with(key, 0, String::new).1
    }

    /// [`ScopeTable::touch`], also returning the scope's bucket key: the one stored with it for
    /// `variant`, or `bucket()` for a scope seen for the first time (or under another variant).
    pub fn touch_with(
        &mut self,
        key: &QuotaKey,
        variant: u8,
        bucket: impl FnOnce() -> String,
    ) -> (String, Option<QuotaKey>) {
        self.tick += 1;
        if let Some(entry) = self.entries.get_mut(key) {
            // Move the key to the newest tick without allocating a copy of it.
            let moved = self.by_tick.remove(&entry.tick).unwrap_or_else(|| key.clone());
            entry.tick = self.tick;
            entry.hits += 1;
            self.by_tick.insert(self.tick, moved);
            if entry.variant != variant {
                entry.bucket = bucket();
                entry.variant = variant;
            }
            return (entry.bucket.clone(), None);
        }
        let evicted = if self.entries.len() >= self.capacity {
            self.by_tick.pop_first().map(|(_, oldest)| {
                self.entries.remove(&oldest);
                oldest
            })
        } else {
            None
        };
        let bucket = bucket();
        self.entries.insert(key.clone(), Entry { tick: self.tick, hits: 1, bucket: bucket.clone(), variant });
        self.by_tick.insert(self.tick, key.clone());
        (bucket, evicted)
    }

    /// Whether `key` is in the table now.
    pub fn contains(&self, key: &QuotaKey) -> bool {
        self.entries.contains_key(key)
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// The `n` scopes with the most requests.
    pub fn busiest(&self, n: usize) -> Vec<(QuotaKey, u64)> {
        let mut all: Vec<_> = self.entries.iter().map(|(key, entry)| (key.clone(), entry.hits)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0 .0.cmp(&b.0 .0)));
        all.truncate(n);
        all
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keys_from_scope() {
        let mut headers = HeaderMap::new();
        let tenant = ScopeKey::Header("x-tenant-id".parse().unwrap());
        assert_eq!(quota_key(std::slice::from_ref(&tenant), &headers, None).0, DEFAULT_BUCKET);
        headers.insert("x-tenant-id", HeaderValue::from_static("acme"));
        assert_eq!(quota_key(std::slice::from_ref(&tenant), &headers, None).0, "acme");
        headers.insert("x-tenant-id", HeaderValue::from_static("has spaces {and braces}"));
        assert!(quota_key(&[tenant], &headers, None).0.starts_with("h-"));
        assert_eq!(quota_key(&[], &headers, None).0, "_all");
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        assert_eq!(quota_key(&[ScopeKey::ClientIp], &headers, Some(peer)).0, "10.1.2.3");
    }

    #[test]
    fn account_keys_follow_credentials_not_scope_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(account_key(&headers, None, None), "_all");
        headers.insert("authorization", HeaderValue::from_static("Bearer one"));
        headers.insert("x-tenant-id", HeaderValue::from_static("a"));
        let first = account_key(&headers, None, None);
        headers.insert("x-tenant-id", HeaderValue::from_static("b"));
        assert_eq!(account_key(&headers, None, None), first, "a scope header does not change the account");
        headers.insert("authorization", HeaderValue::from_static("Bearer two"));
        assert_ne!(account_key(&headers, None, None), first);
        let mut custom = HeaderMap::new();
        custom.insert("x-vendor-token", HeaderValue::from_static("t"));
        assert_eq!(account_key(&custom, None, None), "_all");
        assert_ne!(account_key(&custom, Some("x-vendor-token"), None), "_all");
    }

    #[test]
    fn a_renewed_token_keeps_its_account_and_bucket() {
        let renewed = |token: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("authorization", HeaderValue::from_static(token));
            headers
        };
        let (before, after) = (renewed("Bearer at-1"), renewed("Bearer at-2"));
        let name = Some("oauth2:hubspot");
        let account = |headers: &HeaderMap| account_key(headers, Some("authorization"), name);
        assert_eq!(account(&before), account(&after));
        assert_ne!(account_key(&before, Some("authorization"), None), account_key(&after, Some("authorization"), None));
        let scope = [ScopeKey::Credential(http::header::AUTHORIZATION)];
        let key = |headers: &HeaderMap| quota_key_for(&scope, headers, None, None, name);
        assert_eq!(key(&before), key(&after));
        assert!(key(&before).0.starts_with("c-") && !key(&before).0.contains("at-1"));
    }

    #[test]
    fn proxy_user_basic_and_bearer() {
        let mut headers = HeaderMap::new();
        headers.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0"));
        assert_eq!(proxy_user(&headers).as_deref(), Some("alice"));
        headers.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(proxy_user(&headers).unwrap().starts_with("token-"));
    }

    #[test]
    fn table_evicts_least_recently_used() {
        let mut table = ScopeTable::new(2);
        let key = |s: &str| QuotaKey(s.to_owned());
        assert_eq!(table.touch(&key("a")), None);
        assert_eq!(table.touch(&key("b")), None);
        assert_eq!(table.touch(&key("a")), None);
        assert_eq!(table.touch(&key("c")), Some(key("b")));
        assert_eq!(table.len(), 2);
        assert_eq!(table.busiest(1)[0].0, key("a"));
    }
}
