//! The key schema: how buckets and pauses are named, in memory and in Redis alike.
//!
//! - `<prefix>:{<upstream>}:<quota><shape>:<scope>`: a quota's bucket for one scope. The hash tag
//!   `{<upstream>}` puts all keys of one request in one Redis Cluster slot. Each shape has its own
//!   Redis type and tag (`@roll` a sorted set, `@rollb` a hash of counters, `@fixed` a hash of
//!   windows, none for a paced TAT string, the key of earlier releases), so a reload that changes
//!   the shape starts a fresh bucket instead of failing with WRONGTYPE.
//! - `<prefix>:{<upstream>}:!pause:[<host>:]<account>`: a vendor pause. `!` is never in a quota
//!   name, so no bucket can be read as a pause.
//! - `<prefix>:{<upstream>}:<quota>~<lane><shape>:<scope>`: a lane's own bucket (`lanes`).
//! - `local:<bucket>`: a replica's local share of a bucket while Redis is away (memory only).
//! - `<prefix>:{<upstream>}:<quota>!use:<slot>` and `<bucket>!spent`: spend by consumer and a
//!   scope's spend counter (see `usage`).

use super::rolling;
use super::scope::{self, QuotaKey};
use super::Caller;
use crate::config::{HostPattern, Quota, Upstream, Window};

/// The namespace of local shares in the memory store.
pub const LOCAL: &str = "local:";

/// A bucket's local-share key.
pub fn local(bucket: &str) -> String {
    format!("{LOCAL}{bucket}")
}

/// Names buckets and pauses under one `store.key_prefix`.
#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
}

impl KeySchema {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// `store.key_prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn bucket(&self, upstream: &Upstream, quota: &Quota, scope: &QuotaKey) -> String {
        format!("{}:{{{}}}:{}{}:{}", self.prefix, upstream.name, quota.name, shape_tag(quota), scope.0)
    }

    /// The bucket of a lane's own pseudo-quota `pseudo` of `quota` (see `lanes`), for the scope
    /// of `bucket`, that quota's bucket: `<prefix>:{<upstream>}:<quota>~<lane><shape>:<scope>`.
    /// `~` is never in a quota name, so no quota's bucket can be read as a lane's.
    pub fn lane_bucket(&self, upstream: &Upstream, quota: &Quota, pseudo: &Quota, bucket: &str) -> String {
        let head = format!("{}:{{{}}}:{}{}:", self.prefix, upstream.name, quota.name, shape_tag(quota));
        let scope = bucket.strip_prefix(head.as_str()).unwrap_or("_all");
        format!("{}:{{{}}}:{}{}:{scope}", self.prefix, upstream.name, pseudo.name, shape_tag(pseudo))
    }

    /// Where a vendor pause for this request is kept: per upstream, per destination host on a
    /// wildcard upstream without a target, and per vendor account (the credentials the request
    /// carries), so one account's throttle holds neither another account nor another host, and
    /// no caller dodges it by changing a scope header.
    pub fn pause(&self, upstream: &Upstream, caller: &Caller<'_>) -> String {
        let credential_header = upstream.credentials.as_ref().map(|credentials| credentials.header.as_str());
        let account = scope::account_key(caller.headers, credential_header, caller.credential);
        let per_host =
            upstream.target.is_none() && upstream.hosts.iter().any(|host| matches!(host, HostPattern::Subdomains(_)));
        match caller.host.filter(|_| per_host) {
            Some(host) => format!("{}:{{{}}}:!pause:{}:{account}", self.prefix, upstream.name, host),
            None => format!("{}:{{{}}}:!pause:{account}", self.prefix, upstream.name),
        }
    }
}

/// The part of a bucket key that says the quota's shape.
pub fn shape_tag(quota: &Quota) -> &'static str {
    match quota.window {
        Window::Rolling if quota.limit <= rolling::EXACT_LOG_MAX => "@roll",
        Window::Rolling => "@rollb",
        Window::Smooth => "",
        Window::Fixed { .. } => "@fixed",
    }
}

/// The shape as a small number, for the scope table to notice a reload that changed it.
pub fn shape_variant(quota: &Quota) -> u8 {
    match shape_tag(quota) {
        "@roll" => 1,
        "@rollb" => 2,
        "@fixed" => 3,
        _ => 0,
    }
}
