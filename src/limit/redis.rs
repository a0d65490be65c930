//! Quota state in Redis, shared by every replica: one atomic Lua call per request decides all
//! its quotas (`decide.lua`), with time from Redis `TIME` so replica clocks don't matter.
//!
//! # Throughput
//! Each decision is one `EVALSHA` on a multiplexed connection: concurrent decisions from all
//! requests in flight are pipelined on the same socket. Left at that, Redis executing one script
//! per request would be the ceiling (and on a small node its CPU is taken from the proxy), so
//! busy scopes lease tokens in small batches.
//!
//! # Leases
//! A decision may ask for up to `store.lease_max` tokens beyond its own cost (`lease.rs` sizes
//! the ask to the scope's recent demand, so a quiet scope asks for none and stays exact). The
//! script grants extra tokens only to a request that goes at once, only out of headroom that
//! leaves as many again for the other replicas (so near the limit every decision is exact
//! again), and never when a fixed window ends within the lease's life. The replica then admits
//! requests of that scope from the lease, without a round trip, until it is spent or
//! `store.lease_ttl` has passed; what is left then is dropped.
//!
//! What that trades, and why the window promise still holds:
//! - A leased token is charged when it is leased and spent up to `lease_ttl` later. The
//!   bucket's promise is about charge times; send times can lag them by at most the lease's
//!   life. `lease_ttl` is therefore capped at half of the quota's safety margin `m`, and any
//!   L + 1 sends still span more than `W + m/2`: the other half of the margin stays for
//!   network jitter.
//! - Tokens dropped unspent at expiry are lost for that window: at most `lease_max` per scope
//!   and replica per `lease_ttl`, and only while the scope has headroom to spare.
//! - A vendor pause recorded by another replica is seen at the next round trip, so up to one
//!   lease's worth of requests (one `lease_ttl`) may still go into it. A pause this replica
//!   records itself drops its leases at once.
//! - `RateLimit` on a leased admission reports the scope as of the lease, less what this
//!   replica has spent since.
//!
//! # Keys
//! `<prefix>:{<upstream>}:<quota>:<scope>`: the hash tag `{<upstream>}` puts all keys of one
//! request in one slot, so the script runs on Redis Cluster too. A rolling bucket's key expires
//! when the bucket is full again, so idle scopes cost nothing.
//!
//! # Replicas
//! Each replica writes a heartbeat into a sorted set every `store.heartbeat`; the live count
//! (members seen within five heartbeats) is each replica's divisor for its local share of a quota
//! while Redis is unreachable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use super::gcra::{Decision, Micros, Rule, Standing};
use crate::config::Store;

const DECIDE_SCRIPT: &str = include_str!("decide.lua");

const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
";

const PAUSE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_at = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or nil)
if until_at > now and (current == nil or until_at > current) then
  redis.call('SET', KEYS[1], string.format('%.0f', until_at), 'PX', math.ceil((until_at - now) / 1000) + 1000)
  return 1
end
return 0
";

/// Tokens a decision may take ahead for this replica (see "Leases" in the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Tokens wanted beyond the request's own cost; 0 asks for none.
    pub extra: i64,
    /// How long the lease lives (microseconds): no fixed window may end within it.
    pub lasts: Micros,
}

/// Why a Redis call failed; the limiter then applies `on_failure`.
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

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisStore {
    settings: Store,
    conn: ArcSwapOption<Conn>,
    decide: redis::Script,
    heartbeat: redis::Script,
    pause: redis::Script,
    replica_id: String,
    replicas: AtomicU64,
}

impl RedisStore {
    /// Creates the store; the connection is made in the background (see [`RedisStore::connect`]).
    pub fn new(settings: Store) -> Arc<Self> {
        let replica_id = format!("{}-{:016x}", hostname(), rand::random::<u64>());
        Arc::new(Self {
            settings,
            conn: ArcSwapOption::empty(),
            decide: redis::Script::new(DECIDE_SCRIPT),
            heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
            pause: redis::Script::new(PAUSE_SCRIPT),
            replica_id,
            replicas: AtomicU64::new(1),
        })
    }

    pub fn settings(&self) -> &Store {
        &self.settings
    }

    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Opens the connection (single node or cluster). Called at start and by the health task
    /// until it succeeds; once made, the connection reconnects by itself.
    pub async fn connect(&self) -> Result<(), StoreError> {
        if self.is_connected() {
            return Ok(());
        }
        let url = self.settings.url.clone().ok_or(StoreError::NotConnected)?;
        let timeout = self.settings.timeout.max(Duration::from_millis(250));
        let conn = match cluster_nodes(&url) {
            Some(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout * 4)
                    .build()?;
                Conn::Cluster(client.get_async_connection().await?)
            }
            None => {
                let client = redis::Client::open(url.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout * 4))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Single(client.get_connection_manager_with_config(config).await?)
            }
        };
        self.conn.store(Some(Arc::new(conn)));
        Ok(())
    }

    /// Runs the decision script for `keys` / `rules`; the caller bounds it with `store.timeout`.
    pub async fn decide(
        &self,
        keys: &[String],
        pause_key: &str,
        rules: &[(Rule, i64)],
        max_wait: Micros,
        now_override: Micros,
    ) -> Result<Decision, StoreError> {
        let request = LeaseRequest { extra: 0, lasts: 0 };
        Ok(self.decide_leasing(keys, pause_key, rules, max_wait, now_override, request).await?.0)
    }

    /// [`RedisStore::decide`], asking for up to `lease.extra` tokens beyond the request's cost
    /// (see "Leases" above). Returns the decision and the tokens charged per quota when allowed
    /// (the cost plus what was leased).
    pub async fn decide_leasing(
        &self,
        keys: &[String],
        pause_key: &str,
        rules: &[(Rule, i64)],
        max_wait: Micros,
        now_override: Micros,
        lease: LeaseRequest,
    ) -> Result<(Decision, i64), StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let mut invocation = self.decide.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.key(pause_key);
        invocation.arg(max_wait).arg(now_override).arg(rules.len());
        for (rule, cost) in rules {
            match rule {
                Rule::Rolling { interval, tolerance } => {
                    invocation.arg(0).arg(*cost).arg(*interval).arg(*tolerance).arg(0).arg(0).arg(0);
                }
                Rule::Fixed { limit, bounds } => {
                    invocation
                        .arg(1)
                        .arg(*cost)
                        .arg(*limit)
                        .arg(bounds[0])
                        .arg(bounds[1])
                        .arg(bounds[2])
                        .arg(bounds[3]);
                }
            }
        }
        invocation.arg(lease.extra.max(0)).arg(lease.lasts.max(0));
        let reply: Vec<i64> = match &*conn {
            Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => invocation.invoke_async(&mut cluster.clone()).await?,
        };
        let cost = rules.first().map_or(1, |rule| rule.1);
        parse_reply(&reply, rules.len(), cost).ok_or(StoreError::BadReply)
    }

    /// Extends the vendor pause at `key` to `for_micros` from now in Redis time (never shortens
    /// it: the longest word wins).
    pub async fn pause(&self, key: &str, for_micros: Micros) -> Result<(), StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let mut invocation = self.pause.prepare_invoke();
        invocation.key(key).arg(for_micros);
        let _: i64 = match &*conn {
            Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => invocation.invoke_async(&mut cluster.clone()).await?,
        };
        Ok(())
    }

    /// Time left on the vendor pause at `key`, if one is in force (Redis time).
    pub async fn pause_remaining(&self, key: &str) -> Result<Option<Micros>, StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("TIME");
        let (until, (seconds, micros)): (Option<i64>, (i64, i64)) = match &*conn {
            Conn::Single(manager) => pipe.query_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => pipe.query_async(&mut cluster.clone()).await?,
        };
        let now = seconds * 1_000_000 + micros;
        Ok(until.filter(|until| *until > now).map(|until| until - now))
    }

    /// Reads raw states for `/quotas`: TATs of rolling buckets (fixed ones report their hash).
    pub async fn peek_tats(&self, keys: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            let value: Option<String> = match &*conn {
                Conn::Single(manager) => {
                    redis::cmd("GET").arg(key).query_async(&mut manager.clone()).await.unwrap_or(None)
                }
                Conn::Cluster(cluster) => {
                    redis::cmd("GET").arg(key).query_async(&mut cluster.clone()).await.unwrap_or(None)
                }
            };
            values.push(value.and_then(|text| text.parse().ok()));
        }
        Ok(values)
    }

    /// Reads raw states for `/quotas`: a rolling bucket's TAT (a string), a fixed bucket's two
    /// most recent window counts (a hash).
    pub async fn peek_states(&self, keys: &[String]) -> Result<Vec<super::gcra::State>, StoreError> {
        use super::gcra::State;
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        async fn query<T: redis::FromRedisValue>(conn: &Conn, command: &redis::Cmd) -> redis::RedisResult<T> {
            match conn {
                Conn::Single(manager) => command.query_async(&mut manager.clone()).await,
                Conn::Cluster(cluster) => command.query_async(&mut cluster.clone()).await,
            }
        }
        let mut states = Vec::with_capacity(keys.len());
        for key in keys {
            let kind: String = query(&conn, redis::cmd("TYPE").arg(key)).await?;
            let state = match kind.as_str() {
                "string" => {
                    let text: Option<String> = query(&conn, redis::cmd("GET").arg(key)).await?;
                    text.and_then(|text| text.parse().ok()).map_or(State::Empty, State::Tat)
                }
                "hash" => {
                    let fields: Vec<(String, i64)> = query(&conn, redis::cmd("HGETALL").arg(key)).await?;
                    let mut counts: Vec<(Micros, i64)> =
                        fields.into_iter().filter_map(|(start, count)| Some((start.parse().ok()?, count))).collect();
                    counts.sort_unstable_by_key(|count| std::cmp::Reverse(count.0));
                    match counts.as_slice() {
                        [] => State::Empty,
                        [first] => State::Counts { first: *first, second: (0, 0) },
                        [first, second, ..] => State::Counts { first: *first, second: *second },
                    }
                }
                _ => State::Empty,
            };
            states.push(state);
        }
        Ok(states)
    }

    /// Redis `TIME` in microseconds (for `/quotas`, so reported times match the script's).
    pub async fn time(&self) -> Result<Micros, StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let (seconds, micros): (i64, i64) = match &*conn {
            Conn::Single(manager) => redis::cmd("TIME").query_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => redis::cmd("TIME").query_async(&mut cluster.clone()).await?,
        };
        Ok(seconds * 1_000_000 + micros)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let _: String = match &*conn {
            Conn::Single(manager) => redis::cmd("PING").query_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => redis::cmd("PING").query_async(&mut cluster.clone()).await?,
        };
        Ok(())
    }

    /// Announces this replica and refreshes the live replica count.
    pub async fn heartbeat(&self) -> Result<u64, StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let key = format!("{}:replicas", self.settings.key_prefix);
        let window_ms = u64::try_from(self.settings.heartbeat.as_millis() * 5).unwrap_or(u64::MAX);
        let mut invocation = self.heartbeat.prepare_invoke();
        invocation.key(&key).arg(&self.replica_id).arg(window_ms);
        let count: u64 = match &*conn {
            Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => invocation.invoke_async(&mut cluster.clone()).await?,
        };
        self.replicas.store(count.max(1), Ordering::Relaxed);
        Ok(count)
    }

    /// Removes this replica from the live set (at shutdown), so the others' shares grow at once.
    pub async fn leave(&self) {
        let Some(conn) = self.conn.load_full() else { return };
        let key = format!("{}:replicas", self.settings.key_prefix);
        let mut command = redis::cmd("ZREM");
        command.arg(&key).arg(&self.replica_id);
        let _: Result<i64, _> = match &*conn {
            Conn::Single(manager) => command.query_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => command.query_async(&mut cluster.clone()).await,
        };
    }

    /// The last known number of live replicas (at least 1).
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }
}

/// `redis+cluster://a:1,b:2` (or `rediss+cluster://`) to node URLs.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return None;
    };
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.split('/').next().unwrap_or(hosts);
    Some(
        hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| format!("{scheme}://{credentials}{host}"))
            .collect(),
    )
}

fn parse_reply(reply: &[i64], quotas: usize, cost: i64) -> Option<(Decision, i64)> {
    let standings_end = 3 + 2 * quotas;
    let charged = match reply.len() {
        len if len == standings_end => cost,
        len if len == standings_end + 1 => reply[standings_end].max(cost),
        _ => return None,
    };
    let standings =
        reply[3..standings_end].chunks(2).map(|pair| Standing { remaining: pair[0], reset_in: pair[1] }).collect();
    let limiting = usize::try_from(reply[2]).ok()?;
    Some(match reply[0] {
        1 => (Decision::Allowed { wait: reply[1], standings }, charged),
        2 => (Decision::Paused { remaining: reply[1], standings }, 0),
        _ => (Decision::Rejected { retry_after: reply[1], limiting, standings }, 0),
    })
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "sluice".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls() {
        assert_eq!(
            cluster_nodes("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            Some(vec!["redis://127.0.0.1:7000".to_string(), "redis://127.0.0.1:7001".to_string()])
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://:pw@a:1,b:2/0"),
            Some(vec!["rediss://:pw@a:1".to_string(), "rediss://:pw@b:2".to_string()])
        );
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379/0"), None);
    }
}
