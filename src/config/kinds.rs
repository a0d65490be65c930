//! The closed vocabularies of the config file: the words a key may take (`over_limit: reject`,
//! `store.kind: redis`, `shape: smooth`). They sit in a leaf so the file model, validation and
//! the rooms that read validated config all name the same types without importing each other.

use serde::{Deserialize, Serialize};

/// What a request over quota gets (`over_limit:`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// Wait for a turn, at most `max_queue_wait`.
    #[default]
    Queue,
    /// 429 at once.
    Reject,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Quota state in this process only: one replica.
    #[default]
    Memory,
    /// Quota state in Redis, shared by every replica.
    Redis,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Enforce each quota locally at `limit / replicas` (the last known replica count).
    #[default]
    Local,
    /// Let traffic through unlimited.
    Allow,
    /// Answer 503.
    Deny,
}

/// A request's priority lane (`Sluice-Priority`, a consumer's `lane`): when a quota is
/// contended, higher lanes are admitted first. Ordered: `High < Normal < Low` sorts the most
/// urgent first.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    High,
    #[default]
    Normal,
    Low,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::High => "high",
            Lane::Normal => "normal",
            Lane::Low => "low",
        }
    }

    /// `high`, `normal` or `low`, any case.
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "high" => Some(Lane::High),
            "normal" => Some(Lane::Normal),
            "low" => Some(Lane::Low),
            _ => None,
        }
    }
}

/// `replace` what the client sent, or set the credential only `if_absent`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CredentialMode {
    #[default]
    Replace,
    IfAbsent,
}

/// How an OAuth 2.0 credential is obtained (`credentials.oauth2.grant`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// RFC 6749 §6: a refresh token (HubSpot public apps, Salesforce connected apps).
    RefreshToken,
    /// RFC 6749 §4.4: the client's own id and secret (server-to-server apps).
    ClientCredentials,
}

impl Grant {
    /// The `grant_type` form value.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// How sluice authenticates to the token endpoint (`credentials.oauth2.client_auth`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (RFC 6749 §2.3.1; what HubSpot requires).
    #[default]
    Body,
    /// HTTP Basic with the form-encoded id and secret (RFC 6749 §2.3.1, `client_secret_basic`).
    Basic,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    /// A full burst of `limit`, then one request per slot freed (the vendor's rolling window).
    Burst,
    /// Paced: `burst` at once, then evenly spaced (GCRA).
    Smooth,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// At most `limit` in ANY window of length `per` (HubSpot's TEN_SECONDLY_ROLLING).
    #[default]
    Rolling,
    /// At most `limit` per calendar window, resetting at `resets_at` (HubSpot's daily quota).
    Fixed,
}
