//! One upstream's token broker: the access token in use, and how it is renewed.
//!
//! A request takes the token in use while it is fresh. Past its refresh point (the lifetime less
//! `min(60 s, 10%)`) it is still used while one background task renews it, so no request waits
//! on a refresh that can happen ahead of time. Past its end (the lifetime less `min(5 s, 5%)`,
//! so it cannot run out between sluice and the vendor) requests wait for the renewal. A 401
//! from the vendor renews a token only if it is still the one in use: requests that were sent
//! with an older one simply take the new one.
//!
//! Every renewal is single-flight. Inside the process, one runs at a time and those who need it
//! wait for its result; with the Redis store, one replica at a time asks the token endpoint
//! (the lock in `share`, with a lease), and the others poll, bounded, for the token it publishes.
//! Each renewal looks first for a token another replica already got, and again once it holds
//! the lock, so the endpoint is asked once per expiry whatever the number of replicas. A
//! renewal runs as its own task: a caller that goes away cannot cut an exchange in half (and
//! lose a rotated refresh token with it). A failed renewal holds further ones off, from 1 s
//! doubling to 30 s; meanwhile a request with no usable token gets `502 credential_unavailable`
//! at once, and the token endpoint is not stampeded. When Redis cannot be reached the broker
//! carries on alone (one exchange per replica instead of one in all), logged once.
//!
//! Time is tokio's (`Instant`), so tests can pause it; the token's remaining life across replicas
//! is the Redis key's own `PTTL`, so replicas' clocks never matter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::header::HeaderValue;
use http::uri::{Authority, Scheme as UriScheme};
use tokio::time::Instant;

use super::endpoint::{Answer, Ask, Endpoint};
use super::rotation::{self, Rotated};
use super::share::{Keys, Share, SharedToken};
use crate::config::{ConfigError, Grant, HostPattern, OAuth2, Scheme, Upstream};
use crate::error::ErrorKind;
use crate::telemetry::Metrics;

/// Assumed lifetime of a token whose answer had no `expires_in` (Salesforce's shortest session
/// timeout); a vendor 401 renews it sooner.
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// A token is used for at most this long, whatever its lifetime, and at least this short.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Backoff after a failed renewal.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A vendor 401 renews the token at most this often (a vendor refusing every token, a missing
/// scope say, must not turn each request into an exchange).
const MIN_REJECTION_INTERVAL: Duration = Duration::from_secs(5);
/// How often a replica waiting for another's renewal looks for its token.
const POLL: Duration = Duration::from_millis(50);
/// Bound on the rounds of one renewal (each sleeps at least [`POLL`] or ends it).
const MAX_ROUNDS: u32 = 10_000;

/// An access token as requests use it. Its `Debug` shows neither the token nor the header.
pub struct Token {
    /// The header value (prefix and token), marked sensitive.
    pub header: HeaderValue,
    /// From the token's hash: the same token has the same id on every replica.
    pub id: u64,
    pub refresh_at: Instant,
    pub usable_until: Instant,
    /// Where requests go, when the answer named an instance and `instance_url: true`.
    pub instance: Option<Instance>,
    /// Unix time it expires, for the gauge.
    expires_unix: f64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("id", &format_args!("{:016x}", self.id)).finish_non_exhaustive()
    }
}

/// Scheme and authority of a Salesforce `instance_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub scheme: UriScheme,
    pub authority: Authority,
}

impl Token {
    fn fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }

    fn usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

/// When a token of `lifetime`, obtained at `at`, is renewed ahead, and when it is no longer sent.
/// A time past what `Instant` can hold is `at` (the token is treated as spent, never a panic).
pub fn schedule(at: Instant, lifetime: Duration) -> (Instant, Instant) {
    let refresh_before = (lifetime / 10).min(Duration::from_secs(60));
    let margin = (lifetime / 20).min(Duration::from_secs(5));
    let after = |wait: Duration| at.checked_add(wait).unwrap_or(at);
    (after(lifetime.saturating_sub(refresh_before)), after(lifetime.saturating_sub(margin)))
}

/// What a renewal must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any token still usable (there is none, or it ran out).
    Usable,
    /// A token not yet due for renewal (the one in use is in its refresh window).
    Fresh,
    /// A usable token other than this one (the vendor refused it).
    Replacing(u64),
}

impl Need {
    fn met_by(self, token: &Token, now: Instant) -> bool {
        match self {
            Need::Usable => token.usable(now),
            Need::Fresh => token.fresh(now),
            Need::Replacing(id) => token.id != id && token.usable(now),
        }
    }
}

/// What single-flight renewals remember between them.
#[derive(Default)]
struct Renewals {
    failures: u32,
    held_off_until: Option<Instant>,
    last_error: String,
    last_rejection: Option<Instant>,
    /// Whether "Redis is unreachable" was already logged (once per outage).
    alone_logged: bool,
}

/// The broker of one upstream's OAuth 2.0 credential.
pub struct Broker {
    upstream: Arc<str>,
    settings: Arc<OAuth2>,
    prefix: String,
    hosts: Vec<HostPattern>,
    target_scheme: Option<Scheme>,
    endpoint: Endpoint,
    share: Arc<Share>,
    keys: Keys,
    /// What the token stands for, for quota scopes and pause accounts (never the token).
    name: Arc<str>,
    metrics: Arc<Metrics>,
    current: ArcSwapOption<Token>,
    renewals: tokio::sync::Mutex<Renewals>,
    /// The newest rotated refresh token this process knows (kept across config changes).
    rotated: Arc<Mutex<Option<Rotated>>>,
    ahead: AtomicBool,
    replacing: AtomicBool,
    /// This broker's name on the Redis lock.
    owner: String,
    /// How long the lock is held at most: longer than an exchange may take.
    lease: Duration,
    /// How long a replica waits for another's renewal before giving up.
    wait: Duration,
    /// Whether a failed write-back was already logged.
    write_back_logged: AtomicBool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("upstream", &self.upstream).finish_non_exhaustive()
    }
}

impl Broker {
    /// The broker for `upstream`, whose credentials are `settings` (under `prefix`).
    pub fn new(
        upstream: &Upstream,
        settings: Arc<OAuth2>,
        prefix: String,
        share: Arc<Share>,
        key_prefix: &str,
        metrics: Arc<Metrics>,
        rotated: Arc<Mutex<Option<Rotated>>>,
    ) -> Result<Self, ConfigError> {
        let endpoint = Endpoint::new(upstream, &settings, &format!("upstream `{}` tls.extra_ca", upstream.name))?;
        let lease = endpoint.timeout + Duration::from_secs(2);
        let fingerprint = fingerprint(&settings);
        let keys = Keys::new(key_prefix, &upstream.name, &fingerprint);
        let name = Arc::from(format!("oauth2:{}:{fingerprint}", upstream.name));
        Ok(Self {
            upstream: upstream.name.clone(),
            prefix,
            hosts: upstream.hosts.clone(),
            target_scheme: upstream.target.as_ref().map(|target| target.scheme),
            endpoint,
            share,
            keys,
            name,
            metrics,
            current: ArcSwapOption::empty(),
            renewals: tokio::sync::Mutex::new(Renewals::default()),
            rotated,
            ahead: AtomicBool::new(false),
            replacing: AtomicBool::new(false),
            owner: format!("{:016x}", rand::random::<u64>()),
            lease,
            wait: lease * 2,
            write_back_logged: AtomicBool::new(false),
            settings,
        })
    }

    /// What every token of this broker stands for (see `request::CredentialName`).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn settings(&self) -> &Arc<OAuth2> {
        &self.settings
    }

    /// The rotated refresh token record, for a broker replacing this one.
    pub fn rotated(&self) -> Arc<Mutex<Option<Rotated>>> {
        self.rotated.clone()
    }

    /// The token a new request is sent with.
    pub async fn token(self: &Arc<Self>) -> Result<Arc<Token>, ErrorKind> {
        let now = Instant::now();
        if let Some(token) = self.current.load_full() {
            if token.fresh(now) {
                return Ok(token);
            }
            if token.usable(now) {
                self.in_background(Need::Fresh, &self.ahead);
                return Ok(token);
            }
        }
        self.renew(Need::Usable).await
    }

    /// The token to retry with after the vendor refused `rejected`: a newer one (renewed now if
    /// `rejected` is still in use), or `rejected` itself when it may not be renewed yet.
    pub async fn after_rejection(self: &Arc<Self>, rejected: u64) -> Result<Arc<Token>, ErrorKind> {
        self.renew(Need::Replacing(rejected)).await
    }

    /// The vendor refused `rejected` on a request that cannot be sent again: renew it for the
    /// next ones, in the background.
    pub fn rejected_in_background(self: &Arc<Self>, rejected: u64) {
        self.in_background(Need::Replacing(rejected), &self.replacing);
    }

    fn in_background(self: &Arc<Self>, need: Need, running: &AtomicBool) {
        if running.swap(true, Ordering::AcqRel) {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            let _ = broker.renew_now(need).await;
            let flag = match need {
                Need::Fresh | Need::Usable => &broker.ahead,
                Need::Replacing(_) => &broker.replacing,
            };
            flag.store(false, Ordering::Release);
        });
    }

    /// A renewal as its own task, so the caller going away does not cut it short.
    async fn renew(self: &Arc<Self>, need: Need) -> Result<Arc<Token>, ErrorKind> {
        let broker = self.clone();
        match tokio::spawn(async move { broker.renew_now(need).await }).await {
            Ok(result) => result,
            Err(error) => Err(ErrorKind::Internal { detail: format!("token renewal task: {error}") }),
        }
    }

    async fn renew_now(&self, need: Need) -> Result<Arc<Token>, ErrorKind> {
        let mut renewals = self.renewals.lock().await;
        let now = Instant::now();
        let current = self.current.load_full();
        if let Some(token) = current.as_ref().filter(|token| need.met_by(token, now)) {
            return Ok(token.clone());
        }
        if let (Need::Replacing(id), Some(token)) = (need, current.as_ref()) {
            let recently = renewals.last_rejection.is_some_and(|at| now < at + MIN_REJECTION_INTERVAL);
            if token.id == id && recently {
                return Ok(token.clone());
            }
        }
        if let Some(until) = renewals.held_off_until.filter(|until| now < *until) {
            return Err(unavailable(&renewals.last_error, until - now));
        }
        match self.obtain(need, &mut renewals).await {
            Ok(token) => {
                renewals.failures = 0;
                renewals.held_off_until = None;
                if matches!(need, Need::Replacing(_)) {
                    renewals.last_rejection = Some(now);
                }
                self.metrics.oauth_token_expiry.with_label_values(&[&self.upstream]).set(token.expires_unix);
                self.current.store(Some(token.clone()));
                Ok(token)
            }
            Err(detail) => {
                let backoff = crate::kit::exponential(FIRST_BACKOFF, renewals.failures, MAX_BACKOFF);
                renewals.failures = renewals.failures.saturating_add(1);
                renewals.held_off_until = Some(Instant::now() + backoff);
                tracing::warn!(
                    upstream = &*self.upstream,
                    error = %detail,
                    retry_in_s = backoff.as_secs(),
                    "OAuth token renewal failed."
                );
                renewals.last_error = detail;
                Err(unavailable(&renewals.last_error, backoff))
            }
        }
    }

    /// A token meeting `need`: another replica's, or one from the token endpoint, asked by one
    /// replica at a time. Errors are the 502's detail.
    async fn obtain(&self, need: Need, renewals: &mut Renewals) -> Result<Arc<Token>, String> {
        let started = Instant::now();
        let deadline = started + self.wait;
        let mut shared = self.share.is_shared();
        for _ in 0..MAX_ROUNDS {
            if shared {
                match self.adopt(need).await {
                    Ok(Some(token)) => return Ok(token),
                    Ok(None) => {}
                    Err(error) => shared = self.alone(renewals, &error),
                }
            }
            let locked = if shared { self.share.lock(&self.keys, &self.owner, self.lease).await } else { Ok(true) };
            match locked {
                Ok(true) => {
                    if shared {
                        // The holder before us may have just published.
                        if let Ok(Some(token)) = self.adopt(need).await {
                            let _ = self.share.unlock(&self.keys, &self.owner).await;
                            return Ok(token);
                        }
                    }
                    let result = self.exchange(shared).await;
                    if shared {
                        let _ = self.share.unlock(&self.keys, &self.owner).await;
                    }
                    return result;
                }
                Ok(false) => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "another replica has held the token refresh for over {}",
                            humantime::format_duration(self.wait)
                        ));
                    }
                    tokio::time::sleep(crate::kit::spread(POLL)).await;
                }
                Err(error) => shared = self.alone(renewals, &error),
            }
        }
        Err("gave up waiting for a token".into())
    }

    /// Notes that Redis failed, once per outage; the renewal goes on without it.
    fn alone(&self, renewals: &mut Renewals, error: &super::share::ShareError) -> bool {
        if !renewals.alone_logged {
            renewals.alone_logged = true;
            tracing::warn!(upstream = &*self.upstream, %error, "Cannot share the OAuth token through Redis; this replica renews it alone.");
        }
        false
    }

    /// Another replica's token, if it meets `need`.
    async fn adopt(&self, need: Need) -> Result<Option<Arc<Token>>, super::share::ShareError> {
        let Some(shared) = self.share.read_token(&self.keys).await? else { return Ok(None) };
        let now = Instant::now();
        let Ok(token) = self.token_from(&shared.value, shared.lifetime, now, shared.remaining, shared.instance_url)
        else {
            return Ok(None);
        };
        if !need.met_by(&token, now) {
            return Ok(None);
        }
        self.metrics.oauth_refreshes.with_label_values(&[&self.upstream, "shared"]).inc();
        tracing::debug!(upstream = &*self.upstream, "Took the OAuth token another replica obtained.");
        Ok(Some(Arc::new(token)))
    }

    /// Asks the token endpoint (this replica holds the lock, or shares with no one).
    async fn exchange(&self, shared: bool) -> Result<Arc<Token>, String> {
        let sent = Instant::now();
        let counted = |outcome: &str| self.metrics.oauth_refreshes.with_label_values(&[&self.upstream, outcome]).inc();
        let (answer, used, kept) = self.ask(shared).await.inspect_err(|_| counted("failure"))?;
        // Kept first: the endpoint has rotated it whatever becomes of this answer.
        if let (Some(fresh), Some(used)) = (answer.refresh_token.as_deref(), used.as_deref()) {
            if fresh != used {
                self.keep_rotated(kept.as_ref(), used, fresh, shared).await;
            }
        }
        let lifetime = answer.lifetime.unwrap_or(UNKNOWN_LIFETIME).clamp(MIN_LIFETIME, MAX_LIFETIME);
        let instance_url = answer.instance_url.clone().filter(|_| self.settings.instance_url);
        let token = self
            .token_from(&answer.access_token, lifetime, sent, lifetime, instance_url.clone())
            .inspect_err(|_| counted("failure"))?;
        counted("success");
        if shared {
            let published = SharedToken {
                value: answer.access_token.clone(),
                lifetime,
                remaining: lifetime.saturating_sub(sent.elapsed()),
                instance_url,
            };
            if let Err(error) = self.share.write_token(&self.keys, &published).await {
                tracing::warn!(upstream = &*self.upstream, %error, "Cannot publish the OAuth token to Redis.");
            }
        }
        tracing::info!(
            upstream = &*self.upstream,
            grant = self.settings.grant.as_str(),
            lifetime_s = lifetime.as_secs(),
            "OAuth token obtained."
        );
        Ok(Arc::new(token))
    }

    /// One exchange with the secrets read now; the refresh token it sent, if any, and the
    /// rotation record it was chosen with.
    async fn ask(&self, shared: bool) -> Result<(Answer, Option<String>, Option<Rotated>), String> {
        let client_id = read_secret(&self.settings.client_id_file).await?;
        let client_secret = match &self.settings.client_secret_file {
            Some(path) => Some(read_secret(path).await?),
            None => None,
        };
        let (refresh_token, kept) = match (&self.settings.refresh_token_file, self.settings.grant) {
            (Some(path), Grant::RefreshToken) => {
                let file = read_secret(path).await?;
                let kept = self.kept_rotated(shared).await;
                (Some(rotation::choose(&file, kept.as_ref()).to_owned()), kept)
            }
            _ => (None, None),
        };
        let ask = Ask {
            grant: self.settings.grant,
            client_id: &client_id,
            client_secret: client_secret.as_deref(),
            refresh_token: refresh_token.as_deref(),
            scope: self.settings.scope.as_deref(),
            audience: self.settings.audience.as_deref(),
            client_auth: self.settings.client_auth,
        };
        let answer = self.endpoint.exchange(&ask).await.map_err(|error| error.to_string())?;
        Ok((answer, refresh_token, kept))
    }

    /// The newest rotated refresh token: Redis's (every replica's), else this process's.
    async fn kept_rotated(&self, shared: bool) -> Option<Rotated> {
        if shared {
            match self.share.read_rotated(&self.keys).await {
                Ok(Some(rotated)) => return Some(rotated),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(upstream = &*self.upstream, %error, "Cannot read the rotated refresh token from Redis.")
                }
            }
        }
        crate::kit::lock(&self.rotated).clone()
    }

    /// Stores a rotated refresh token everywhere it can be found next time; `kept` is the record
    /// `used` was chosen with, whose chain the new one continues.
    async fn keep_rotated(&self, kept: Option<&Rotated>, used: &str, fresh: &str, shared: bool) {
        let record = rotation::rotate(kept, used, fresh);
        *crate::kit::lock(&self.rotated) = Some(record.clone());
        if shared {
            if let Err(error) = self.share.write_rotated(&self.keys, &record).await {
                tracing::error!(upstream = &*self.upstream, %error, "Cannot store the rotated refresh token in Redis; other replicas will use an older one.");
            }
        }
        let mut written = false;
        if let Some(path) = self.settings.refresh_token_file.clone() {
            let token = fresh.to_owned();
            let result = tokio::task::spawn_blocking(move || rotation::write_back(&path, &token)).await;
            match result {
                Ok(Ok(())) => written = true,
                Ok(Err(error)) => {
                    if !self.write_back_logged.swap(true, Ordering::Relaxed) {
                        tracing::info!(upstream = &*self.upstream, %error, "The refresh token file is not writable; the rotated refresh token is kept in memory (and Redis).");
                    }
                }
                Err(_) => {}
            }
        }
        tracing::info!(target: "sluice::audit", event = "oauth_refresh_token_rotated", upstream = &*self.upstream, written_back = written, "The token endpoint rotated the refresh token; the new one is in use.");
    }

    /// A token from an access token `value`, `remaining` of whose `lifetime` is left at `now`.
    fn token_from(
        &self,
        value: &str,
        lifetime: Duration,
        now: Instant,
        remaining: Duration,
        instance_url: Option<String>,
    ) -> Result<Token, String> {
        let mut header = HeaderValue::from_str(&format!("{}{value}", self.prefix))
            .map_err(|_| "the access token is not a usable header value".to_owned())?;
        header.set_sensitive(true);
        // Bounded whatever the store holds: a lifetime is 1 s to 24 h, and no more of it is left.
        let lifetime = lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME);
        let remaining = remaining.min(lifetime);
        let instance = match instance_url.filter(|_| self.settings.instance_url) {
            Some(url) => Some(instance_of(&url, &self.hosts, self.target_scheme)?),
            None => None,
        };
        let issued = now.checked_sub(lifetime.saturating_sub(remaining)).unwrap_or(now);
        let (refresh_at, usable_until) = schedule(issued, lifetime);
        let expires_unix = crate::kit::unix_seconds_f64(SystemTime::now()) + remaining.as_secs_f64();
        Ok(Token { header, id: token_id(value), refresh_at, usable_until, instance, expires_unix })
    }
}

fn unavailable(detail: &str, retry_after: Duration) -> ErrorKind {
    ErrorKind::CredentialUnavailable { detail: detail.to_owned(), retry_after: retry_after.max(Duration::from_secs(1)) }
}

/// Reads a secret file afresh (a rotated Secret is picked up at the next exchange).
async fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text =
        tokio::fs::read_to_string(path).await.map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(value.to_owned())
}

/// The id of an access token: the first 8 bytes of its SHA-256.
fn token_id(value: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(bytes)
}

/// What makes two configs ask for the same token (and share it in Redis).
fn fingerprint(settings: &OAuth2) -> String {
    let material = format!(
        "{}\n{}\n{}\n{}",
        settings.token_url,
        settings.grant.as_str(),
        settings.scope.as_deref().unwrap_or_default(),
        settings.audience.as_deref().unwrap_or_default()
    );
    crate::security::digest(material.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a Salesforce `instance_url`: `scheme://host[:port]`, `https` unless the upstream's own
/// target is plain http, and one of the upstream's hosts when it lists any. A token endpoint may
/// not send the credential anywhere else.
pub fn instance_of(raw: &str, hosts: &[HostPattern], target_scheme: Option<Scheme>) -> Result<Instance, String> {
    let uri: http::Uri = raw.trim().parse().map_err(|_| format!("instance_url `{raw}` is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("https") => UriScheme::HTTPS,
        Some("http") if target_scheme == Some(Scheme::Http) => UriScheme::HTTP,
        _ => return Err(format!("instance_url `{raw}` must be https://")),
    };
    let authority = uri.authority().cloned().ok_or_else(|| format!("instance_url `{raw}` has no host"))?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("instance_url `{raw}` must be scheme://host[:port]"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if !hosts.is_empty() && !hosts.iter().any(|pattern| pattern.matches(&host)) {
        return Err(format!("instance_url `{raw}` is not one of this upstream's hosts"));
    }
    Ok(Instance { scheme, authority })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_renewed_ahead_and_never_sent_at_their_last_moment() {
        let at = Instant::now();
        let (refresh, until) = schedule(at, Duration::from_secs(1800));
        assert_eq!((refresh - at, until - at), (Duration::from_secs(1740), Duration::from_secs(1795)));
        let (refresh, until) = schedule(at, Duration::from_secs(2));
        assert_eq!((refresh - at, until - at), (Duration::from_millis(1800), Duration::from_millis(1900)));
        let (refresh, until) = schedule(at, Duration::from_secs(300));
        assert_eq!((refresh - at, until - at), (Duration::from_secs(270), Duration::from_secs(295)));
        assert_eq!(schedule(at, Duration::MAX), (at, at), "no overflow, whatever a store says");
    }

    #[test]
    fn needs() {
        let at = Instant::now();
        let (refresh_at, usable_until) = schedule(at, Duration::from_secs(100));
        let token = Token {
            header: HeaderValue::from_static("Bearer x"),
            id: 7,
            refresh_at,
            usable_until,
            instance: None,
            expires_unix: 0.0,
        };
        assert!(Need::Fresh.met_by(&token, at) && Need::Usable.met_by(&token, at));
        let window = at + Duration::from_secs(92);
        assert!(!Need::Fresh.met_by(&token, window) && Need::Usable.met_by(&token, window));
        assert!(!Need::Usable.met_by(&token, at + Duration::from_secs(96)));
        assert!(!Need::Replacing(7).met_by(&token, at) && Need::Replacing(8).met_by(&token, at));
        assert!(!format!("{token:?}").contains("Bearer"), "Debug never shows the token");
    }

    #[test]
    fn token_ids_agree_across_replicas() {
        assert_eq!(token_id("at-1"), token_id("at-1"));
        assert_ne!(token_id("at-1"), token_id("at-2"));
    }

    #[test]
    fn instance_urls_stay_within_the_upstreams_hosts() {
        let hosts = [HostPattern::Subdomains(".my.salesforce.com".into())];
        let ok = instance_of("https://acme.my.salesforce.com", &hosts, Some(Scheme::Https)).unwrap();
        assert_eq!((ok.scheme, ok.authority.as_str()), (UriScheme::HTTPS, "acme.my.salesforce.com"));
        assert!(instance_of("https://evil.example.com", &hosts, Some(Scheme::Https)).is_err());
        assert!(instance_of("http://acme.my.salesforce.com", &hosts, Some(Scheme::Https)).is_err());
        assert!(instance_of("https://acme.my.salesforce.com/services", &hosts, Some(Scheme::Https)).is_err());
        assert!(instance_of("https://u:p@acme.my.salesforce.com", &hosts, Some(Scheme::Https)).is_err());
        assert!(instance_of("http://127.0.0.1:8080", &[], Some(Scheme::Http)).is_ok(), "a plain-http test target");
        assert!(instance_of("https://anywhere.example", &[], Some(Scheme::Https)).is_ok(), "no hosts to hold it to");
    }
}
