//! Where quota decisions are made: [`QuotaStore`] is what the limiter asks of any store, the
//! memory store (this process) and Redis (every replica) alike; [`SharedStore`] adds what a store
//! shared over the network needs besides: health, heartbeats, connections, and taking back what
//! a replica admitted alone while it was away. Both run the same maths (`decide`).
//!
//! Stores take the caller's `now` for their own bookkeeping; a shared store keeps its own time
//! (Redis `TIME`), so replicas' clocks never matter.

use std::future::Future;
use std::time::Duration;

use super::decide::{Decision, Micros, Rule, State};

/// Why a store call failed; the limiter then applies `on_failure`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is not connected")]
    NotConnected,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from the quota script")]
    BadReply,
}

impl StoreError {
    /// Bounded label for the store errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotConnected => "not_connected",
            StoreError::Timeout(_) => "timeout",
            StoreError::Redis(_) => "redis_error",
            StoreError::BadReply => "bad_reply",
        }
    }
}

/// Tokens a decision may take ahead for this replica (see "Leases" in `redis.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Tokens wanted beyond the request's own cost; 0 asks for none.
    pub extra: i64,
    /// How long the lease lives (microseconds): no fixed window may end within it.
    pub lasts: Micros,
}

/// One decision to make: a request's buckets, its pause, its quotas' rules and cost.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub keys: &'a [String],
    pub pause_key: &'a str,
    pub rules: &'a [(Rule, i64)],
    /// The longest the caller may wait (microseconds).
    pub max_wait: Micros,
    pub now: Micros,
    pub lease: LeaseRequest,
}

/// What the limiter asks of a quota store.
pub trait QuotaStore: Send + Sync {
    /// One decision over all the request's quotas, all or nothing, with the tokens charged per
    /// quota when allowed (the cost, plus what a shared store leased).
    fn decide(&self, ask: Ask<'_>) -> impl Future<Output = Result<(Decision, i64), StoreError>> + Send;

    /// Extends the pause at `key` by `hold` from now (never shortens it).
    fn pause(
        &self,
        key: &str,
        hold: Micros,
        outage: bool,
        now: Micros,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Time left on the pause at `key`, and whether it is an outage.
    fn pause_remaining(
        &self,
        key: &str,
        now: Micros,
    ) -> impl Future<Output = Result<Option<(Micros, bool)>, StoreError>> + Send;

    /// Lowers what the bucket at `key` reports as left to `remaining` (the vendor's figure).
    fn adopt(
        &self,
        key: &str,
        rule: &Rule,
        remaining: i64,
        now: Micros,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Current states of `keys`, for `/quotas`.
    fn peek(&self, keys: &[String], now: Micros) -> impl Future<Output = Result<Vec<State>, StoreError>> + Send;
}

/// A store every replica shares, over the network.
pub trait SharedStore: QuotaStore {
    /// Builds a new connection and drops the old one (it may be silent rather than closed).
    fn reconnect(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Drops the current connection: the next use must build a new one.
    fn drop_connection(&self);
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Announces this replica; returns the live replica count.
    fn heartbeat(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Leaves the live set (at shutdown).
    fn leave(&self) -> impl Future<Output = ()> + Send;
    /// The last known number of live replicas (at least 1).
    fn replicas(&self) -> u64;
    /// The store's own clock (for `/quotas`).
    fn time(&self) -> impl Future<Output = Result<Micros, StoreError>> + Send;
    /// Folds a local share's state into the shared record of `key`; returns the tokens added.
    fn merge(&self, key: &str, rule: &Rule, state: &State) -> impl Future<Output = Result<i64, StoreError>> + Send;
}
