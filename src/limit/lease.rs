//! Tokens this replica took ahead from the shared store, so that a busy scope costs one Redis
//! round trip per lease instead of one per request (see "Leases" in `redis.rs` for what that
//! trades and why the window promise holds).
//!
//! The size of the next ask follows the scope's own recent demand: a quarter of the units it
//! was admitted over the last lease lifetime, capped at `store.lease_max`, so a lease is spent
//! long before it expires. A scope below 32 units a lifetime asks for nothing extra, so its
//! decisions stay exact and no token is dropped; a scope at thousands of requests a second asks
//! for full leases.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::decide::{Decision, Rule, Standing};

/// Lease entries kept at most; past it, expired ones are swept, and if that is not enough the
/// table starts over (dropping unspent tokens: under-use, never over-use).
const MAX_ENTRIES: usize = 4096;

/// Units per lease lifetime below which a scope is decided request by request (with the default
/// 50 ms lifetime: below 640 requests a second per scope and replica).
const MIN_DEMAND: i64 = 32;

/// An ask is a lifetime's demand divided by this.
const SPEND_WITHIN: i64 = 4;

/// Grants held at once per scope (a refill arrives while the last one is still being spent).
const MAX_GRANTS: usize = 4;

/// What the store charged for one admitted request.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a> {
    /// The upstream the quotas belong to (for the lease metric).
    pub upstream: &'a Arc<str>,
    /// The request's own cost.
    pub cost: i64,
    /// Units charged per quota: the cost plus what was leased.
    pub charged: i64,
    /// The scope's standings after the charge.
    pub standings: &'a [Standing],
}

pub struct Leases {
    max_tokens: i64,
    ttl: Duration,
    entries: Mutex<HashMap<Vec<String>, Lease>>,
    /// `sluice_quota_lease_tokens_total{upstream, outcome}`.
    tokens_metric: prometheus::IntCounterVec,
}

struct Lease {
    upstream: Arc<str>,
    /// The quota rules the tokens were charged under: a reload or a vendor-lowered limit that
    /// changes them makes the lease void.
    rules: Vec<Rule>,
    /// Tokens of each grant still held, oldest first, each with its own expiry: a token must be
    /// spent within its grant's lifetime, whatever was granted since.
    grants: VecDeque<(i64, Instant)>,
    /// The scope's standings at the last grant, with this replica's unspent tokens counted back in.
    standings: Vec<Standing>,
    /// Demand: units admitted since `since`.
    since: Instant,
    served: i64,
    /// Units per lifetime, as last estimated.
    demand: i64,
    /// The last ask's size (extra tokens).
    ask: i64,
    /// While an ask is in flight, concurrent decisions ask for nothing: one lease at a time
    /// per scope, not one per request in flight. Stale after a lifetime (a failed call).
    asking_until: Instant,
}

impl Leases {
    pub fn new(max_tokens: u64, ttl: Duration, tokens_metric: prometheus::IntCounterVec) -> Self {
        Self {
            max_tokens: i64::try_from(max_tokens).unwrap_or(i64::MAX),
            ttl,
            entries: Mutex::new(HashMap::new()),
            tokens_metric,
        }
    }

    /// Counts `tokens` of `upstream`'s leases under `outcome` (`leased` or `dropped`).
    fn count(&self, upstream: &str, outcome: &str, tokens: i64) {
        if tokens > 0 {
            self.tokens_metric.with_label_values(&[upstream, outcome]).inc_by(u64::try_from(tokens).unwrap_or(0));
        }
    }

    /// How long a lease under `margin` (the tightest rolling quota's safety margin) may live:
    /// `store.lease_ttl`, but at most half the margin. `None`: no leasing.
    pub fn lifetime(&self, margin: Option<Duration>) -> Option<Duration> {
        let lifetime = margin.map_or(self.ttl, |margin| self.ttl.min(margin / 2));
        (self.max_tokens > 1 && !lifetime.is_zero()).then_some(lifetime)
    }

    /// Admits `cost` from the lease of `keys`, if one is live under `rules` and holds enough.
    ///
    /// When what would be left falls under half the last ask and no ask is in flight, the
    /// request goes to the store instead (and asks): the refill is on its way while the rest of
    /// the lease serves the requests that arrive during the round trip.
    pub fn take(&self, keys: &[String], rules: &[(Rule, i64)], cost: i64, now: Instant) -> Option<Decision> {
        let mut entries = self.lock();
        let lease = entries.get_mut(keys)?;
        if !same_rules(&lease.rules, rules) {
            let dropped: i64 = lease.grants.drain(..).map(|(tokens, _)| tokens).sum();
            self.count(&lease.upstream, "dropped", dropped);
            return None;
        }
        while let Some(&(tokens, expires)) = lease.grants.front() {
            if tokens > 0 && expires > now {
                break;
            }
            self.count(&lease.upstream, "dropped", tokens);
            lease.grants.pop_front();
        }
        let held: i64 = lease.grants.iter().map(|(tokens, _)| *tokens).sum();
        if held < cost {
            return None;
        }
        if held - cost < lease.ask / 2 && lease.asking_until <= now {
            return None;
        }
        let mut owed = cost;
        for (tokens, _) in lease.grants.iter_mut() {
            let taken = owed.min(*tokens);
            *tokens -= taken;
            owed -= taken;
            if owed == 0 {
                break;
            }
        }
        lease.served += cost;
        for standing in &mut lease.standings {
            standing.remaining = (standing.remaining - cost).max(0);
        }
        Some(Decision::Allowed { wait: 0, standings: lease.standings.clone() })
    }

    /// How many tokens beyond `cost` to ask for with the next decision of `keys`.
    pub fn ask(&self, keys: &[String], lifetime: Duration, now: Instant) -> i64 {
        let mut entries = self.lock();
        let Some(lease) = entries.get_mut(keys) else { return 0 };
        if lease.asking_until > now {
            return 0;
        }
        let elapsed = now.saturating_duration_since(lease.since);
        let demand = if elapsed >= lifetime {
            // Units per lifetime over the last measured stretch; then measure afresh.
            let per_lifetime = (lease.served as f64) * lifetime.as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
            lease.since = now;
            lease.served = 0;
            per_lifetime.ceil() as i64
        } else {
            // Not a lifetime yet: demand is at least what was served so far, and the last estimate.
            lease.served.max(lease.demand)
        };
        lease.demand = demand;
        // A scope this quiet costs Redis little; leasing it would only drop tokens.
        if demand < MIN_DEMAND {
            lease.ask = 0;
            return 0;
        }
        // A quarter of a lifetime's demand: with the refill at half a lease, what is held lasts
        // well under a lifetime, so few tokens expire unspent when demand holds.
        lease.ask = (demand / SPEND_WITHIN).clamp(1, self.max_tokens.saturating_sub(1).max(1));
        lease.asking_until = now + lifetime;
        lease.ask
    }

    /// Records an admission of `keys` decided by the store: what it charged beyond the request's
    /// cost is spent locally until `lifetime` from now.
    pub fn granted(&self, keys: &[String], rules: &[(Rule, i64)], grant: Grant<'_>, lifetime: Duration, now: Instant) {
        let Grant { upstream, cost, charged, standings } = grant;
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(keys) {
            entries.retain(|_, lease| {
                let keep = lease.grants.iter().any(|(_, expires)| *expires > now)
                    || lease.since + lease_window(lifetime) > now;
                if !keep {
                    self.count(&lease.upstream, "dropped", held(lease, now));
                }
                keep
            });
            if entries.len() >= MAX_ENTRIES {
                for lease in entries.values() {
                    self.count(&lease.upstream, "dropped", held(lease, now));
                }
                entries.clear();
            }
        }
        let lease = entries.entry(keys.to_vec()).or_insert_with(|| Lease {
            upstream: upstream.clone(),
            rules: Vec::new(),
            grants: VecDeque::new(),
            standings: Vec::new(),
            since: now,
            served: 0,
            demand: 0,
            ask: 0,
            asking_until: now,
        });
        lease.served += cost;
        if charged > cost {
            lease.asking_until = now;
        }
        let extra = (charged - cost).max(0);
        if extra == 0 {
            return;
        }
        if !same_rules(&lease.rules, rules) {
            let dropped: i64 = lease.grants.drain(..).map(|(tokens, _)| tokens).sum();
            self.count(upstream, "dropped", dropped);
            lease.rules = rules.iter().map(|(rule, _)| *rule).collect();
        }
        let expired: i64 = lease.grants.iter().filter(|(_, expires)| *expires <= now).map(|(tokens, _)| *tokens).sum();
        self.count(upstream, "dropped", expired);
        lease.grants.retain(|(tokens, expires)| *tokens > 0 && *expires > now);
        if lease.grants.len() >= MAX_GRANTS {
            // Dropping the oldest tokens is safe: they are simply not spent.
            if let Some((tokens, _)) = lease.grants.pop_front() {
                self.count(upstream, "dropped", tokens);
            }
        }
        lease.grants.push_back((extra, now + lifetime));
        self.count(upstream, "leased", extra);
        let held: i64 = lease.grants.iter().map(|(tokens, _)| *tokens).sum();
        lease.standings = standings
            .iter()
            .map(|standing| Standing { remaining: standing.remaining + held, reset_in: standing.reset_in })
            .collect();
    }

    /// Unspent leased tokens of every lease that includes the bucket `key` (for `/quotas`).
    pub fn held_for(&self, key: &str, now: Instant) -> i64 {
        self.lock().iter().filter(|(keys, _)| keys.iter().any(|k| k == key)).map(|(_, lease)| held(lease, now)).sum()
    }

    /// Drops every lease (a vendor pause was recorded: nothing more goes out on old tokens).
    pub fn clear(&self) {
        let mut entries = self.lock();
        let now = Instant::now();
        for lease in entries.values() {
            self.count(&lease.upstream, "dropped", held(lease, now));
        }
        entries.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, Lease>> {
        // Plain numbers: still consistent if another thread panicked while holding the lock.
        crate::kit::lock(&self.entries)
    }
}

/// Unspent tokens of `lease` that are still live at `now`.
fn held(lease: &Lease, now: Instant) -> i64 {
    lease.grants.iter().filter(|(_, expires)| *expires > now).map(|(tokens, _)| *tokens).sum()
}

/// How long a demand record is worth keeping after its lease is gone.
fn lease_window(lifetime: Duration) -> Duration {
    lifetime * 4
}

fn same_rules(leased: &[Rule], rules: &[(Rule, i64)]) -> bool {
    leased.len() == rules.len() && leased.iter().zip(rules).all(|(leased, (rule, _))| leased == rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("leases", "test"), &["upstream", "outcome"]).unwrap()
    }

    fn upstream() -> Arc<str> {
        Arc::from("hubspot")
    }

    fn rules() -> Vec<(Rule, i64)> {
        vec![(Rule::smooth(1_000, 10_000_000, 50, 100_000), 1)]
    }

    /// Records one admission of cost 1 that the store charged `charged` units for.
    fn grant(leases: &Leases, keys: &[String], charged: i64, standings: &[Standing], lifetime: Duration, at: Instant) {
        leases.granted(keys, &rules(), Grant { upstream: &upstream(), cost: 1, charged, standings }, lifetime, at);
    }

    #[test]
    fn quiet_scope_asks_for_nothing() {
        let leases = Leases::new(64, Duration::from_millis(50), metric());
        let keys = vec!["k".to_owned()];
        let start = Instant::now();
        let lifetime = Duration::from_millis(50);
        assert_eq!(leases.ask(&keys, lifetime, start), 0);
        grant(&leases, &keys, 1, &[], lifetime, start);
        // One request per second: a lease would only be dropped.
        for second in 1..5 {
            let now = start + Duration::from_secs(second);
            assert_eq!(leases.ask(&keys, lifetime, now), 0);
            grant(&leases, &keys, 1, &[], lifetime, now);
        }
    }

    #[test]
    fn busy_scope_asks_up_to_the_cap_and_spends_locally() {
        let leases = Leases::new(64, Duration::from_millis(50), metric());
        let keys = vec!["k".to_owned()];
        let lifetime = Duration::from_millis(50);
        let start = Instant::now();
        grant(&leases, &keys, 1, &[], lifetime, start);
        // 400 requests within 4 ms: a quarter of the demand per lifetime is far above the cap.
        for i in 0..400 {
            let now = start + Duration::from_micros(10 * i);
            grant(&leases, &keys, 1, &[], lifetime, now);
        }
        let now = start + Duration::from_millis(60);
        assert_eq!(leases.ask(&keys, lifetime, now), 63);
        let standings = [Standing { remaining: 100, reset_in: 0 }];
        grant(&leases, &keys, 64, &standings, lifetime, now);
        let mut leased = 0;
        while let Some(Decision::Allowed { wait: 0, standings }) = leases.take(&keys, &rules(), 1, now) {
            assert!(standings[0].remaining >= 100);
            leased += 1;
            assert!(leased <= 63, "never more than the lease");
        }
        assert_eq!(leased, 32, "down to half the ask, the next request goes to the store to refill");
        assert_eq!(leases.ask(&keys, lifetime, now), 63);
        for _ in 0..31 {
            let taken = leases.take(&keys, &rules(), 1, now);
            assert!(taken.is_some(), "while the refill is in flight, the rest of the lease serves");
        }
        assert!(leases.take(&keys, &rules(), 1, now).is_none(), "the lease is spent");
        // The refill arrives: its tokens live for their own lifetime.
        let later = now + lifetime / 2;
        grant(&leases, &keys, 64, &standings, lifetime, later);
        assert!(leases.take(&keys, &rules(), 1, now + lifetime).is_some(), "the refill outlives the first grant");
        assert!(leases.take(&keys, &rules(), 1, later + lifetime).is_none(), "and expires on its own");
    }

    #[test]
    fn lease_expires_and_follows_rule_changes() {
        let leases = Leases::new(64, Duration::from_millis(50), metric());
        let keys = vec!["k".to_owned()];
        let lifetime = Duration::from_millis(50);
        let now = Instant::now();
        grant(&leases, &keys, 10, &[Standing { remaining: 5, reset_in: 0 }], lifetime, now);
        assert!(leases.take(&keys, &rules(), 1, now).is_some());
        let changed = vec![(Rule::smooth(500, 10_000_000, 50, 100_000), 1)];
        assert!(leases.take(&keys, &changed, 1, now).is_none(), "a reload voids the lease");
        assert!(leases.take(&keys, &rules(), 1, now + lifetime).is_none(), "expired");
        grant(&leases, &keys, 10, &[], lifetime, now + lifetime);
        leases.clear();
        assert!(leases.take(&keys, &rules(), 1, now + lifetime).is_none(), "cleared by a pause");
        let counted = |outcome: &str| leases.tokens_metric.with_label_values(&["hubspot", outcome]).get();
        assert_eq!(counted("leased"), 18, "two grants of 9 extra tokens");
        assert!(counted("dropped") >= 9, "the second grant was dropped unspent by the pause");
    }

    #[test]
    fn lifetime_is_capped_by_half_the_margin() {
        let leases = Leases::new(64, Duration::from_millis(50), metric());
        assert_eq!(leases.lifetime(Some(Duration::from_millis(40))), Some(Duration::from_millis(20)));
        assert_eq!(leases.lifetime(Some(Duration::from_secs(1))), Some(Duration::from_millis(50)));
        assert_eq!(leases.lifetime(Some(Duration::ZERO)), None);
        assert_eq!(Leases::new(1, Duration::from_millis(50), metric()).lifetime(None), None);
    }
}
