//! Quota state in this process: the whole fleet is one replica (`store.kind: memory`), or Redis
//! is down and each replica enforces its local share (`on_failure: local`).
//!
//! The same [`gcra::decide`] as the Redis script runs under one lock, so memory mode gives the
//! same decisions as one replica on Redis. Bucket state is dropped once its bucket is full again
//! (an absent bucket is a full one), and the scope tables cap how many buckets can exist.

use std::collections::HashMap;
use std::sync::Mutex;

use super::gcra::{self, Decision, Micros, Rule, State};

#[derive(Default)]
pub struct MemoryStore {
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    states: HashMap<String, State>,
    /// Vendor pauses: key -> until.
    pauses: HashMap<String, Micros>,
    /// Decisions since the last sweep of full buckets.
    since_sweep: usize,
}

/// How long a pause's record outlives it (the Redis key's extra TTL in `PAUSE_SCRIPT`).
const PAUSE_AFTERGLOW: Micros = 1_000_000;

/// Sweep finished buckets after this many decisions, keeping the map at the size of live ones.
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
        let mut states: Vec<State> =
            keys.iter().map(|key| buckets.states.get(key).copied().unwrap_or_default()).collect();
        if let Some(&until) = buckets.pauses.get(pause_key) {
            if until > now {
                let standings =
                    rules.iter().zip(&states).map(|((rule, _), state)| gcra::standing(rule, state, now)).collect();
                return Decision::Paused { remaining: until - now, standings };
            }
            if until + PAUSE_AFTERGLOW > now {
                // As in decide.lua: buckets restart empty at the pause's end, so held requests
                // are released at the bucket's rate.
                for ((rule, _), state) in rules.iter().zip(states.iter_mut()) {
                    if let Rule::Rolling { tolerance, .. } = rule {
                        let tat = match state {
                            State::Tat(tat) => *tat,
                            _ => 0,
                        };
                        *state = State::Tat(tat.max(until + tolerance));
                    }
                }
            } else {
                buckets.pauses.remove(pause_key);
            }
        }
        let decision = gcra::decide(rules, &mut states, now, max_wait);
        if matches!(decision, Decision::Allowed { .. }) {
            for (key, state) in keys.iter().zip(states) {
                // Busy buckets are updated in place; only a new one copies its key.
                match buckets.states.get_mut(key) {
                    Some(stored) => *stored = state,
                    None => {
                        buckets.states.insert(key.clone(), state);
                    }
                }
            }
        }
        buckets.since_sweep += 1;
        if buckets.since_sweep >= SWEEP_EVERY {
            buckets.since_sweep = 0;
            buckets.states.retain(|_, state| is_live(state, now));
            buckets.pauses.retain(|_, until| *until + PAUSE_AFTERGLOW > now);
        }
        decision
    }

    /// Extends the pause at `key` to `until` (never shortens it).
    pub fn pause(&self, key: &str, until: Micros) {
        let mut buckets = self.lock();
        let entry = buckets.pauses.entry(key.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// When the pause at `key` ends, if it is in force.
    pub fn paused_until(&self, key: &str, now: Micros) -> Option<Micros> {
        self.lock().pauses.get(key).copied().filter(|until| *until > now)
    }

    /// Current states of `keys` (for `/quotas`).
    pub fn peek(&self, keys: &[String]) -> Vec<State> {
        let buckets = self.lock();
        keys.iter().map(|key| buckets.states.get(key).copied().unwrap_or_default()).collect()
    }

    /// Forgets a bucket (its scope value was evicted).
    pub fn forget(&self, key: &str) {
        self.lock().states.remove(key);
    }

    /// Forgets a bucket if it is full again (its state no longer affects any decision).
    pub fn forget_if_idle(&self, key: &str, now: Micros) {
        let mut buckets = self.lock();
        if buckets.states.get(key).is_some_and(|state| !is_live(state, now)) {
            buckets.states.remove(key);
        }
    }

    /// Forgets every bucket whose key starts with `prefix` (local shares after Redis recovers).
    pub fn forget_prefix(&self, prefix: &str) {
        self.lock().states.retain(|key, _| !key.starts_with(prefix));
    }

    pub fn len(&self) -> usize {
        self.lock().states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // The map holds plain numbers: still consistent if another thread panicked mid-decision.
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn is_live(state: &State, now: Micros) -> bool {
    match state {
        State::Empty => false,
        State::Tat(tat) => *tat > now,
        // Fixed-window counts live until a day past their window; windows are at most a year.
        State::Counts { first, second } => first.0.max(second.0) + 400 * 86_400_000_000 > now,
    }
}
