//! The limiter's books per quota: which scopes it has seen (a bounded LRU table, with each
//! scope's bucket key built once), the buckets of scopes that left the table while still live,
//! and the quota's decision counters, so a decision formats no key and looks up no metric by
//! label. Memory stays bounded whatever scope values clients send: at most `2 × max_keys`
//! buckets per quota.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::keys::{self, KeySchema};
use super::memory::MemoryStore;
use super::scope::{self, QuotaKey, ScopeTable};
use super::Caller;
use crate::config::{Quota, Upstream};
use crate::telemetry::Metrics;

/// `sluice_quota_decisions_total` of one quota, and its upstream's queue wait histogram.
pub struct DecisionCounters {
    pub allowed: prometheus::IntCounter,
    pub queued: prometheus::IntCounter,
    pub rejected: prometheus::IntCounter,
    pub queue_wait: prometheus::Histogram,
}

/// One request's buckets: a key per quota, and each quota's counters.
pub struct Buckets {
    pub keys: Vec<String>,
    pub counters: Vec<Arc<DecisionCounters>>,
}

/// (upstream, quota) names.
type QuotaId = (Arc<str>, Arc<str>);

struct QuotaBook {
    table: ScopeTable,
    retiring: Retiring,
    counters: Arc<DecisionCounters>,
}

impl QuotaBook {
    fn new(metrics: &Metrics, upstream: &Upstream, quota: &Quota) -> Self {
        let counter =
            |result: &str| metrics.quota_decisions.with_label_values(&[&*upstream.name, &*quota.name, result]);
        Self {
            table: ScopeTable::new(quota.max_keys),
            retiring: Retiring::default(),
            counters: Arc::new(DecisionCounters {
                allowed: counter("allowed"),
                queued: counter("queued"),
                rejected: counter("rejected"),
                queue_wait: metrics.quota_queue_wait.with_label_values(&[&upstream.name]),
            }),
        }
    }
}

/// Every quota's book.
#[derive(Default)]
pub struct Books {
    quotas: Mutex<HashMap<QuotaId, QuotaBook>>,
}

impl Books {
    /// The bucket of each quota for this request, recording scope use and evictions. An evicted
    /// scope's bucket goes at once if idle; a live one is kept while it can still matter (Redis
    /// keeps it until it expires, and memory decides alike), but only up to `max_keys` of them.
    pub fn buckets(
        &self,
        upstream: &Upstream,
        caller: &Caller<'_>,
        schema: &KeySchema,
        memory: &MemoryStore,
        metrics: &Metrics,
        now: i64,
    ) -> Buckets {
        let mut keys = Vec::with_capacity(upstream.limits.quotas.len());
        let mut counters = Vec::with_capacity(upstream.limits.quotas.len());
        let mut quotas = self.lock();
        for quota in &upstream.limits.quotas {
            let key = scope::quota_key_for(&quota.scope, caller.headers, caller.peer, caller.client, caller.credential);
            let book = quotas
                .entry((upstream.name.clone(), quota.name.clone()))
                .or_insert_with(|| QuotaBook::new(metrics, upstream, quota));
            book.table.set_capacity(quota.max_keys);
            let variant = keys::shape_variant(quota);
            let (bucket, evicted) = book.table.touch_with(&key, variant, || schema.bucket(upstream, quota, &key));
            book.retiring.returned(&bucket);
            if let Some(evicted) = evicted {
                metrics.scope_evictions.with_label_values(&[&upstream.name, &quota.name]).inc();
                let evicted_bucket = schema.bucket(upstream, quota, &evicted);
                let idle = memory.forget_if_idle(&evicted_bucket, now)
                    & memory.forget_if_idle(&keys::local(&evicted_bucket), now);
                if !idle {
                    for gone in book.retiring.push(evicted, evicted_bucket, quota.max_keys, &book.table) {
                        memory.forget(&gone);
                        memory.forget(&keys::local(&gone));
                    }
                }
            }
            keys.push(bucket);
            counters.push(book.counters.clone());
        }
        Buckets { keys, counters }
    }

    /// The `n` busiest scopes of a quota and their requests.
    pub fn busiest(&self, upstream: &Upstream, quota: &Quota, n: usize) -> Vec<(QuotaKey, u64)> {
        self.lock()
            .get(&(upstream.name.clone(), quota.name.clone()))
            .map(|book| book.table.busiest(n))
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<QuotaId, QuotaBook>> {
        crate::kit::lock(&self.quotas)
    }
}

/// Buckets of scopes evicted from a quota's table while still live, oldest first. Redis keeps
/// such a bucket until it expires, and memory does the same (so both decide alike), but only for
/// `max_keys` of them: past that the oldest is forgotten, unless its scope is back in the table.
#[derive(Default)]
struct Retiring {
    order: VecDeque<(u64, QuotaKey, String)>,
    /// The latest entry of each bucket in `order` (older ones are stale).
    latest: HashMap<String, u64>,
    next: u64,
}

impl Retiring {
    /// A scope is in the table again: its bucket is no longer retiring.
    fn returned(&mut self, bucket: &str) {
        if !self.latest.is_empty() {
            self.latest.remove(bucket);
        }
    }

    /// Records an evicted live bucket; returns the buckets to forget now.
    fn push(&mut self, scope: QuotaKey, bucket: String, capacity: usize, table: &ScopeTable) -> Vec<String> {
        self.next += 1;
        self.latest.insert(bucket.clone(), self.next);
        self.order.push_back((self.next, scope, bucket));
        let mut gone = Vec::new();
        while self.latest.len() > capacity.max(1) {
            let Some((at, scope, bucket)) = self.order.pop_front() else { break };
            if self.latest.get(&bucket) == Some(&at) {
                self.latest.remove(&bucket);
                if !table.contains(&scope) {
                    gone.push(bucket);
                }
            }
        }
        // Stale entries (re-evicted buckets) are dropped once they are most of the queue.
        if self.order.len() > 4 * capacity.max(1) {
            let latest = &self.latest;
            self.order.retain(|(at, _, bucket)| latest.get(bucket) == Some(at));
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retiring_keeps_max_keys_live_buckets_and_forgets_the_oldest() {
        let mut retiring = Retiring::default();
        let table = ScopeTable::new(2);
        let scope = |s: &str| QuotaKey(s.to_owned());
        assert!(retiring.push(scope("a"), "a".into(), 2, &table).is_empty());
        assert!(retiring.push(scope("b"), "b".into(), 2, &table).is_empty());
        assert_eq!(retiring.push(scope("c"), "c".into(), 2, &table), vec!["a".to_owned()]);
        // "b" came back to the table: it is not retiring any more, and never forgotten from here.
        retiring.returned("b");
        assert!(retiring.push(scope("d"), "d".into(), 2, &table).is_empty());
        assert_eq!(retiring.push(scope("e"), "e".into(), 2, &table), vec!["c".to_owned()]);
    }
}
