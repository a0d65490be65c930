//! CONSUMER: who spends the quota. A CRM quota is shared by every service of a company, so
//! each request is attributed to one consumer, taken from the first of these that yields a value:
//!
//! 1. the authenticated proxy client (`clients:`), which cannot be forged;
//! 2. the caller's `Sluice-Consumer` header (parsed by `controls`, stripped before the vendor);
//! 3. the proxy user (the Basic user name in `Proxy-Authorization`, without `clients:`);
//! 4. the sidecar's own consumer, [`DEFAULT_ENV`] in sluice's environment: the injector sets it
//!    from the pod's service account, so a pod's calls are attributed without the app sending
//!    anything. It is always a known name.
//!
//! The answer is a metric label and a Redis hash field, so it comes from a bounded set: the
//! names in `consumers:` (or, without that list, the names of `clients:`). Any other value counts
//! as [`OTHER`], and a request that names no one as [`NONE`]; whatever callers send, the label
//! set is the known names plus those two.
//!
//! A leaf beside `controls` and `request`: Route writes [`Consumer`] into the request's
//! extensions, Batch replaces it on a bulk call by [`ItemConsumers`] (each item's own caller),
//! and the limiter reads them when it counts the tokens spent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::{ClientSettings, ConsumerSettings, Lane};

/// What spend is attributed to when the caller names a consumer that is not known.
pub const OTHER: &str = "other";

/// What spend is attributed to when nothing names a consumer.
pub const NONE: &str = "none";

/// The environment variable naming the sidecar's own consumer (read when a generation is built).
pub const DEFAULT_ENV: &str = "SLUICE_CONSUMER";

/// The consumer a request spends for (a request extension, written by Route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer(pub Arc<str>);

/// The consumers a bulk call spends for: one per item, in item order, each that item's caller's
/// (a request extension, written by Batch in place of the first caller's [`Consumer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemConsumers(pub Vec<Arc<str>>);

/// The consumers spend may be attributed to, with [`OTHER`] and [`NONE`]. Built once per
/// generation; a lookup hands out the shared name, so attribution allocates nothing.
#[derive(Debug, Clone)]
pub struct Known {
    names: HashSet<Arc<str>>,
    /// Consumers whose requests take another lane than `normal` by default.
    lanes: HashMap<Arc<str>, Lane>,
    other: Arc<str>,
    none: Arc<str>,
    /// The sidecar's own consumer, when nothing else names one.
    default: Option<Arc<str>>,
}

impl Default for Known {
    fn default() -> Self {
        Self::new(None, &[], None)
    }
}

impl Known {
    /// The names of `consumers:` when it is given, else the names of `clients:`; and `default`,
    /// the sidecar's own (see [`DEFAULT_ENV`]).
    pub fn new(listed: Option<&[ConsumerSettings]>, clients: &[ClientSettings], default: Option<Arc<str>>) -> Self {
        let mut names: HashSet<Arc<str>> = match listed {
            Some(listed) => listed.iter().map(|consumer| consumer.name.clone()).collect(),
            None => clients.iter().map(|client| client.name.clone()).collect(),
        };
        names.extend(default.clone());
        let lanes =
            listed.into_iter().flatten().filter_map(|consumer| Some((consumer.name.clone(), consumer.lane?))).collect();
        Self { names, lanes, other: Arc::from(OTHER), none: Arc::from(NONE), default }
    }

    /// The lane a consumer's requests take when they send no `Sluice-Priority`.
    pub fn lane_of(&self, consumer: &Consumer) -> Lane {
        self.lanes.get(&consumer.0).copied().unwrap_or_default()
    }

    /// The sidecar's own consumer from [`DEFAULT_ENV`], if it is set to a valid name (an invalid
    /// one is logged and ignored: attribution is never a reason not to start).
    pub fn default_from_env() -> Option<Arc<str>> {
        let value = std::env::var(DEFAULT_ENV).ok()?;
        let value = value.trim();
        if value.is_empty() {
            return None;
        }
        if !crate::config::is_consumer_name(value) || crate::config::RESERVED_CONSUMERS.contains(&value) {
            tracing::warn!(value, "{DEFAULT_ENV} is not a consumer name (1-64 of A-Z, a-z, 0-9, ., - and _); ignored.");
            return None;
        }
        Some(Arc::from(value))
    }

    /// The consumer of a request: the first of `client`, `header` and `proxy_user` that says
    /// anything, as the known name it is, else [`OTHER`]; the default when none says anything,
    /// else [`NONE`].
    /// `proxy_user` is asked only when the other two are silent.
    pub fn attribute(
        &self,
        client: Option<&str>,
        header: Option<&str>,
        proxy_user: impl FnOnce() -> Option<String>,
    ) -> Consumer {
        let claimed = match client.or(header) {
            Some(name) => Some(self.lookup(name)),
            None => proxy_user().map(|user| self.lookup(&user)),
        };
        Consumer(claimed.or_else(|| self.default.clone()).unwrap_or_else(|| self.none.clone()))
    }

    fn lookup(&self, name: &str) -> Arc<str> {
        self.names.get(name).cloned().unwrap_or_else(|| self.other.clone())
    }

    /// How many label values attribution can produce: the known names, `other` and `none`.
    pub fn label_count(&self) -> usize {
        self.names.len() + 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientSecret;

    fn client(name: &str) -> ClientSettings {
        ClientSettings {
            name: Arc::from(name),
            user: None,
            secret: ClientSecret::Sha256([0; 32]),
            upstreams: vec!["*".into()],
        }
    }

    fn listed(name: &str, lane: Option<Lane>) -> ConsumerSettings {
        ConsumerSettings { name: Arc::from(name), lane }
    }

    #[test]
    fn a_consumer_may_have_a_lane_of_its_own() {
        let known = Known::new(Some(&[listed("billing", None), listed("backfill", Some(Lane::Low))]), &[], None);
        let lane = |header: &str| known.lane_of(&known.attribute(None, Some(header), || None));
        assert_eq!(lane("backfill"), Lane::Low);
        assert_eq!(lane("billing"), Lane::Normal);
        assert_eq!(lane("stranger"), Lane::Normal);
    }

    fn name(consumer: Consumer) -> String {
        consumer.0.to_string()
    }

    #[test]
    fn the_first_source_that_says_anything_wins() {
        let listed = [listed("billing", None), listed("sync", None)];
        let known = Known::new(Some(&listed), &[], None);
        let never = || -> Option<String> { panic!("the proxy user is not asked when another source speaks") };
        assert_eq!(name(known.attribute(Some("billing"), Some("sync"), never)), "billing", "client first");
        assert_eq!(name(known.attribute(None, Some("sync"), never)), "sync", "then the header");
        assert_eq!(name(known.attribute(None, None, || Some("billing".into()))), "billing", "then the proxy user");
        assert_eq!(name(known.attribute(None, None, || None)), NONE);
        // A client that is not listed is not taken for a known one, nor is its header consulted.
        assert_eq!(name(known.attribute(Some("intruder"), Some("sync"), never)), OTHER);
    }

    #[test]
    fn unknown_values_are_other_so_the_label_set_is_bounded() {
        let known = Known::new(Some(&[listed("billing", None)]), &[], None);
        let mut seen = HashSet::new();
        for at in 0..10_000 {
            seen.insert(name(known.attribute(None, Some(&format!("caller-{at}")), || None)));
        }
        seen.insert(name(known.attribute(None, Some("billing"), || None)));
        seen.insert(name(known.attribute(None, None, || None)));
        assert_eq!(seen.len(), known.label_count(), "{seen:?}");
        assert_eq!(name(known.attribute(None, Some("Billing"), || None)), OTHER, "names are exact");
    }

    #[test]
    fn without_a_list_the_clients_are_the_known_set() {
        let known = Known::new(None, &[client("billing"), client("sync")], None);
        assert_eq!(name(known.attribute(Some("sync"), None, || None)), "sync");
        assert_eq!(name(known.attribute(None, Some("billing"), || None)), "billing");
        assert_eq!(name(known.attribute(None, Some("backfill"), || None)), OTHER);
        // Sidecar mode without a list: nothing is known, so every claim is `other`.
        let sidecar = Known::default();
        assert_eq!(name(sidecar.attribute(None, Some("billing"), || None)), OTHER);
        assert_eq!(sidecar.label_count(), 2);
    }

    #[test]
    fn the_sidecars_own_consumer_counts_what_names_no_one() {
        let known = Known::new(Some(&[listed("billing", None)]), &[], Some(Arc::from("crm-sync")));
        assert_eq!(name(known.attribute(None, None, || None)), "crm-sync");
        assert_eq!(name(known.attribute(None, Some("billing"), || None)), "billing", "a caller still says");
        assert_eq!(name(known.attribute(None, Some("crm-sync"), || None)), "crm-sync", "and the default is known");
        assert_eq!(name(known.attribute(None, Some("stranger"), || None)), OTHER);
        assert_eq!(known.label_count(), 4);
    }
}
