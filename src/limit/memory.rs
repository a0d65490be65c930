//! Quota state in this process: the whole fleet is one replica (`store.kind: memory`), or Redis
//! is down and each replica enforces its local share (`on_failure: local`).
//!
//! The same [`decide::decide`] as the Redis script runs under one lock, so memory mode gives the
//! same decisions as one replica on Redis. Each bucket keeps the expiry the Redis key would have
//! (`decide::expires_at`): an expired bucket is a fresh one and is swept, and the limiter's scope
//! tables cap how many buckets a quota can have, so memory stays bounded whatever scope values
//! clients send.

use std::collections::HashMap;
use std::sync::Mutex;

use super::decide::{self, Decision, Micros, Rule, State};
use super::store::{Ask, QuotaStore, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    buckets: Mutex<Buckets>,
}

/// One bucket's state and the instant after which it no longer matters.
struct Bucket {
    state: State,
    expires: Micros,
}

#[derive(Default)]
struct Buckets {
    states: HashMap<String, Bucket>,
    /// Vendor pauses: key -> (until, outage).
    pauses: HashMap<String, (Micros, bool)>,
    /// Decisions since the last sweep of expired buckets.
    since_sweep: usize,
}

/// How long a pause's record outlives it (the Redis key's extra TTL in `PAUSE_SCRIPT`).
const PAUSE_AFTERGLOW: Micros = 1_000_000;

/// Sweep expired buckets after this many decisions, keeping the map at the size of live ones.
const SWEEP_EVERY: usize = 4096;

impl MemoryStore {
    pub fn decide(
        &self,
        keys: &[String],
        pause_key: &str,
        rules: &[(Rule, i64)],
        now: Micros,
        max_wait: Micros,
    ) -> Decision {
        let mut buckets = self.lock();
        // Take the states out of the map (no copies of a rolling log), and put them back after.
        let mut taken: Vec<(Option<String>, State)> = keys
            .iter()
            .map(|key| match buckets.states.remove_entry(key) {
                Some((key, bucket)) if bucket.expires > now => (Some(key), bucket.state),
                Some((key, _)) => (Some(key), State::Empty),
                None => (None, State::Empty),
            })
            .collect();
        let mut states: Vec<State> = taken.iter_mut().map(|(_, state)| std::mem::take(state)).collect();
        let decision = match buckets.pauses.get(pause_key).copied() {
            Some((until, outage)) if until > now => {
                let standings =
                    rules.iter().zip(&states).map(|((rule, _), state)| decide::standing(rule, state, now)).collect();
                Decision::Paused { remaining: until - now, outage, standings }
            }
            paused => {
                match paused {
                    // As in decide.lua: paced buckets restart empty at the pause's end, so held
                    // requests are released at the bucket's rate.
                    Some((until, _)) if until + PAUSE_AFTERGLOW > now => {
                        for ((rule, _), state) in rules.iter().zip(states.iter_mut()) {
                            if let Rule::Smooth(pace) = rule {
                                let tat = match state {
                                    State::Tat(tat) => *tat,
                                    _ => 0,
                                };
                                *state = State::Tat(tat.max(until + pace.tolerance));
                            }
                        }
                    }
                    Some(_) => {
                        buckets.pauses.remove(pause_key);
                    }
                    None => {}
                }
                decide::decide(rules, &mut states, now, max_wait)
            }
        };
        for ((index, (stored_key, _)), state) in taken.into_iter().enumerate().zip(states) {
            let Some((rule, _)) = rules.get(index) else { continue };
            let expires = decide::expires_at(rule, &state, now);
            if expires <= now {
                continue;
            }
            // Busy buckets keep their key; only a new one copies it.
            let key = stored_key.unwrap_or_else(|| keys[index].clone());
            buckets.states.insert(key, Bucket { state, expires });
        }
        buckets.since_sweep += 1;
        if buckets.since_sweep >= SWEEP_EVERY {
            buckets.since_sweep = 0;
            buckets.states.retain(|_, bucket| bucket.expires > now);
            buckets.pauses.retain(|_, (until, _)| *until + PAUSE_AFTERGLOW > now);
        }
        decision
    }

    /// Lowers what the bucket at `key` reports as left to `remaining` (the vendor's figure).
    pub fn adopt(&self, key: &str, rule: &Rule, remaining: i64, now: Micros) -> bool {
        let mut buckets = self.lock();
        let mut state = match buckets.states.get(key) {
            Some(bucket) if bucket.expires > now => bucket.state.clone(),
            _ => State::Empty,
        };
        if !decide::adopt(rule, &mut state, remaining, now) {
            return false;
        }
        let expires = decide::expires_at(rule, &state, now);
        buckets.states.insert(key.to_owned(), Bucket { state, expires });
        true
    }

    /// Extends the pause at `key` to `until` (never shortens it); an outage mark sticks.
    pub fn pause(&self, key: &str, until: Micros, outage: bool) {
        let mut buckets = self.lock();
        let entry = buckets.pauses.entry(key.to_owned()).or_insert((until, outage));
        *entry = (entry.0.max(until), entry.1 || outage);
    }

    /// When the pause at `key` ends and whether it is an outage, if it is in force.
    pub fn paused_until(&self, key: &str, now: Micros) -> Option<(Micros, bool)> {
        self.lock().pauses.get(key).copied().filter(|(until, _)| *until > now)
    }

    /// Current states of `keys` (for `/quotas`).
    pub fn peek(&self, keys: &[String], now: Micros) -> Vec<State> {
        let buckets = self.lock();
        keys.iter()
            .map(|key| match buckets.states.get(key) {
                Some(bucket) if bucket.expires > now => bucket.state.clone(),
                _ => State::Empty,
            })
            .collect()
    }

    /// Forgets a bucket (its scope value left the table for good).
    pub fn forget(&self, key: &str) {
        self.lock().states.remove(key);
    }

    /// Forgets a bucket if it no longer affects any decision.
    pub fn forget_if_idle(&self, key: &str, now: Micros) -> bool {
        let mut buckets = self.lock();
        match buckets.states.get(key) {
            Some(bucket) if bucket.expires > now => false,
            _ => {
                buckets.states.remove(key);
                true
            }
        }
    }

    /// Takes out every live bucket whose key starts with `prefix`, with the key after the prefix
    /// (the local shares, to fold into Redis when it is back).
    pub fn drain_prefix(&self, prefix: &str, now: Micros) -> Vec<(String, State)> {
        let mut buckets = self.lock();
        let keys: Vec<String> = buckets.states.keys().filter(|key| key.starts_with(prefix)).cloned().collect();
        keys.into_iter()
            .filter_map(|key| {
                let bucket = buckets.states.remove(&key)?;
                (bucket.expires > now).then(|| (key[prefix.len()..].to_owned(), bucket.state))
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // The map holds plain numbers: still consistent if another thread panicked mid-decision.
        crate::kit::lock(&self.buckets)
    }
}

/// The memory store never fails: every answer is `Ok`.
impl QuotaStore for MemoryStore {
    async fn decide(&self, ask: Ask<'_>) -> Result<(Decision, i64), StoreError> {
        let cost = ask.rules.first().map_or(1, |(_, cost)| *cost);
        Ok((MemoryStore::decide(self, ask.keys, ask.pause_key, ask.rules, ask.now, ask.max_wait), cost))
    }

    async fn pause(&self, key: &str, hold: Micros, outage: bool, now: Micros) -> Result<(), StoreError> {
        MemoryStore::pause(self, key, now.saturating_add(hold), outage);
        Ok(())
    }

    async fn pause_remaining(&self, key: &str, now: Micros) -> Result<Option<(Micros, bool)>, StoreError> {
        Ok(self.paused_until(key, now).map(|(until, outage)| (until - now, outage)))
    }

    async fn adopt(&self, key: &str, rule: &Rule, remaining: i64, now: Micros) -> Result<bool, StoreError> {
        Ok(MemoryStore::adopt(self, key, rule, remaining, now))
    }

    async fn peek(&self, keys: &[String], now: Micros) -> Result<Vec<State>, StoreError> {
        Ok(MemoryStore::peek(self, keys, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Micros = 1_000_000;

    #[test]
    fn buckets_expire_like_redis_keys() {
        let store = MemoryStore::default();
        let keys = vec!["q:a".to_owned()];
        let rolling = [(Rule::rolling(2, SEC, 0), 1)];
        assert!(matches!(store.decide(&keys, "p", &rolling, 0, 0), Decision::Allowed { .. }));
        assert_eq!(store.len(), 1);
        assert!(!store.forget_if_idle("q:a", SEC / 2), "still in the window");
        assert!(store.forget_if_idle("q:a", SEC), "gone once the admission left the window");
        // A fixed window is forgotten when its window ends, not days later.
        let bounds = super::super::window::bounds(10 * SEC, None, 0);
        let fixed = [(Rule::Fixed { limit: 5, bounds }, 1)];
        assert!(matches!(store.decide(&keys, "p", &fixed, 0, 0), Decision::Allowed { .. }));
        assert!(!store.forget_if_idle("q:a", 9 * SEC));
        assert!(store.forget_if_idle("q:a", 10 * SEC));
    }

    #[test]
    fn pauses_hold_and_outages_are_marked() {
        let store = MemoryStore::default();
        let keys = vec!["q:a".to_owned()];
        let rules = [(Rule::rolling(10, SEC, 0), 1)];
        store.pause("p", 5 * SEC, true);
        store.pause("p", 3 * SEC, false);
        match store.decide(&keys, "p", &rules, SEC, 0) {
            Decision::Paused { remaining, outage, .. } => assert_eq!((remaining, outage), (4 * SEC, true)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(store.decide(&keys, "p", &rules, 5 * SEC, 0), Decision::Allowed { .. }));
    }

    #[test]
    fn local_shares_drain_for_the_shared_store() {
        let store = MemoryStore::default();
        let rules = [(Rule::rolling(10, SEC, 0), 1)];
        store.decide(&["local:q:a".to_owned()], "p", &rules, 0, 0);
        store.decide(&["q:b".to_owned()], "p", &rules, 0, 0);
        let drained = store.drain_prefix("local:", 1);
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].0, "q:a");
        assert_eq!(store.len(), 1, "only the local share was taken");
    }
}
