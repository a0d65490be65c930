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
//! - In a rolling window, a leased token is recorded at the end of its lease's life: it counts
//!   as admitted from its grant until the last moment it could be spent has left the window.
//!   A token dropped unspent therefore stays in the window for `per + margin + lease_ttl`:
//!   that, and the window's margin, is the utilisation leases cost.
//!
//! # Keys
//! `<prefix>:{<upstream>}:<quota><shape>:<scope>`: the hash tag `{<upstream>}` puts all keys of
//! one request in one slot, so the script runs on Redis Cluster too. Each shape has its own type
//! and tag (`@roll` a sorted set, `@rollb` a hash of counters, `@fixed` a hash of windows, none
//! for a paced TAT string), so a reload that changes the shape starts a fresh bucket instead of
//! failing with WRONGTYPE. Every key expires when its state can no longer affect a decision, so
//! idle scopes cost nothing.
//!
//! # Connections that heal
//! A connection that goes silent (a failover that leaves the old address dead, a frozen
//! middlebox) is never trusted again: when a decision, heartbeat or probe fails, the limiter
//! degrades and the probe builds a *new* connection for every attempt, swapping it in once it
//! answers. Sockets carry TCP keepalive and a user timeout so the kernel also gives up on a dead
//! peer within seconds, not the 15 minutes of the default retransmission timeout.
//!
//! # Replicas
//! Each replica writes a heartbeat into a sorted set every `store.heartbeat`; the live count
//! (members seen within five heartbeats) is each replica's divisor for its local share of a quota
//! while Redis is unreachable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::IntoConnectionInfo;

use super::decide::{Decision, Micros, Rule, Standing, State};
use super::rolling::Admissions;
use super::store::{Ask, QuotaStore, SharedStore};
use super::usage::{spent_key, Flush};
use super::window::Counts;
use crate::config::Store;

const DECIDE_SCRIPT: &str = concat!(include_str!("quota.lua"), include_str!("decide.lua"));
const ADOPT_SCRIPT: &str = concat!(include_str!("quota.lua"), include_str!("adopt.lua"));
const MERGE_SCRIPT: &str = concat!(include_str!("quota.lua"), include_str!("merge.lua"));

const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
";

/// Extends a vendor pause (never shortens it). ARGV[1]: how long (us, capped here too, as
/// every path is); ARGV[2]: 1 when the vendor was failing (the mark sticks while it holds).
const PAUSE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local hold = math.min(tonumber(ARGV[1]), tonumber(ARGV[3]))
local until_at = now + hold
local outage = ARGV[2] == '1'
local raw = redis.call('GET', KEYS[1])
if raw then
  local current = tonumber(string.match(raw, '^%d+'))
  if current and current > now then
    local was_outage = string.find(raw, 'o', 1, true) ~= nil
    if until_at <= current and (was_outage or not outage) then return 0 end
    until_at = math.max(until_at, current)
    outage = outage or was_outage
  end
end
if hold <= 0 then return 0 end
local value = string.format('%.0f', until_at)
if outage then value = value .. 'o' end
redis.call('SET', KEYS[1], value, 'PX', math.ceil((until_at - now) / 1000) + 1000)
return 1
";

pub use super::store::{LeaseRequest, StoreError};

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(manager) => command.query_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => command.query_async(&mut cluster.clone()).await,
        }
    }

    async fn pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> redis::RedisResult<T> {
        match self {
            Conn::Single(manager) => pipe.query_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => pipe.query_async(&mut cluster.clone()).await,
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => invocation.invoke_async(&mut cluster.clone()).await,
        }
    }
}

pub struct RedisStore {
    settings: Store,
    conn: ArcSwapOption<Conn>,
    decide: redis::Script,
    adopt: redis::Script,
    merge: redis::Script,
    heartbeat: redis::Script,
    pause: redis::Script,
    replica_id: String,
    /// Names each call's rolling-log members uniquely (with a per-process random part).
    calls: AtomicU64,
    nonce_base: String,
    replicas: AtomicU64,
    /// Connections built so far (the first, and one per healing).
    connections: AtomicU64,
}

impl RedisStore {
    /// Creates the store; the connection is made in the background (see [`RedisStore::connect`]).
    pub fn new(settings: Store) -> Arc<Self> {
        let replica_id = format!("{}-{:016x}", hostname(), rand::random::<u64>());
        Arc::new(Self {
            settings,
            conn: ArcSwapOption::empty(),
            decide: redis::Script::new(DECIDE_SCRIPT),
            adopt: redis::Script::new(ADOPT_SCRIPT),
            merge: redis::Script::new(MERGE_SCRIPT),
            heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
            pause: redis::Script::new(PAUSE_SCRIPT),
            replica_id,
            calls: AtomicU64::new(0),
            nonce_base: format!("{:016x}", rand::random::<u64>()),
            replicas: AtomicU64::new(1),
            connections: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &Store {
        &self.settings
    }

    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// How many connections this store has built (the first one, then one per healing).
    pub fn connections_made(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Opens the connection if there is none. Once made, it is kept until [`RedisStore::reconnect`]
    /// replaces it.
    pub async fn connect(&self) -> Result<(), StoreError> {
        if self.is_connected() {
            return Ok(());
        }
        self.reconnect().await
    }

    /// Builds a brand-new connection (single node or cluster) and swaps it in for the old one,
    /// which is dropped: a connection that went silent is never asked again.
    pub async fn reconnect(&self) -> Result<(), StoreError> {
        let conn = self.open().await?;
        self.conn.store(Some(Arc::new(conn)));
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the current connection (it failed): the next use must build a new one.
    pub fn drop_connection(&self) {
        self.conn.store(None);
    }

    async fn open(&self) -> Result<Conn, StoreError> {
        let url = self.settings.url.clone().ok_or(StoreError::NotConnected)?;
        let timeout = self.settings.timeout.max(Duration::from_millis(250));
        let tcp = tcp_settings(timeout);
        let conn = match crate::config::cluster_nodes(&url) {
            Some(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout * 4)
                    .tcp_settings(tcp)
                    .build()?;
                Conn::Cluster(client.get_async_connection().await?)
            }
            None => {
                let info = url.as_str().into_connection_info()?.set_tcp_settings(tcp);
                let client = redis::Client::open(info)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout * 4))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Single(client.get_connection_manager_with_config(config).await?)
            }
        };
        Ok(conn)
    }

    fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        self.conn.load_full().ok_or(StoreError::NotConnected)
    }

    fn nonce(&self) -> String {
        format!("{}{:x}", self.nonce_base, self.calls.fetch_add(1, Ordering::Relaxed))
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
        let conn = self.conn()?;
        let mut invocation = self.decide.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.key(pause_key);
        invocation.arg(max_wait).arg(now_override).arg(rules.len());
        for (rule, cost) in rules {
            rule_args(&mut invocation, rule, *cost);
        }
        invocation.arg(lease.extra.max(0)).arg(lease.lasts.max(0)).arg(self.nonce());
        let reply: Vec<i64> = conn.invoke(&invocation).await?;
        let cost = rules.first().map_or(1, |rule| rule.1);
        parse_reply(&reply, rules.len(), cost).ok_or(StoreError::BadReply)
    }

    /// The vendor says `remaining` are left for the quota `rule` at `key`: where the shared
    /// record believes more, it follows the vendor for the rest of the window. Whether it changed.
    pub async fn adopt(
        &self,
        key: &str,
        rule: &Rule,
        remaining: i64,
        now_override: Micros,
    ) -> Result<bool, StoreError> {
        let conn = self.conn()?;
        let mut invocation = self.adopt.prepare_invoke();
        invocation.key(key).arg(now_override);
        rule_args(&mut invocation, rule, 1);
        invocation.arg(remaining.max(0)).arg(self.nonce());
        let changed: i64 = conn.invoke(&invocation).await?;
        Ok(changed == 1)
    }

    /// Folds a local share's state (what this replica admitted while Redis was away) into the
    /// shared record of `key`. Returns the tokens added.
    pub async fn merge(&self, key: &str, rule: &Rule, state: &State, now_override: Micros) -> Result<i64, StoreError> {
        let pairs: Vec<(Micros, i64)> = match state {
            State::Empty => return Ok(0),
            State::Tat(tat) => vec![(*tat, 0)],
            State::Counts(counts) => vec![counts.first, counts.second],
            State::Admissions(record) => record.entries.clone(),
        };
        let conn = self.conn()?;
        let mut invocation = self.merge.prepare_invoke();
        invocation.key(key).arg(now_override);
        rule_args(&mut invocation, rule, 1);
        invocation.arg(self.nonce());
        for (at, tokens) in pairs {
            invocation.arg(at).arg(tokens);
        }
        Ok(conn.invoke(&invocation).await?)
    }

    /// Extends the vendor pause at `key` to `for_micros` from now in Redis time (never shortens
    /// it: the longest word wins; capped at `max_micros`). `outage`: the vendor was failing.
    pub async fn pause(
        &self,
        key: &str,
        for_micros: Micros,
        outage: bool,
        max_micros: Micros,
    ) -> Result<(), StoreError> {
        let conn = self.conn()?;
        let mut invocation = self.pause.prepare_invoke();
        invocation.key(key).arg(for_micros).arg(u8::from(outage)).arg(max_micros);
        let _: i64 = conn.invoke(&invocation).await?;
        Ok(())
    }

    /// Time left on the vendor pause at `key`, and whether it is an outage, if one is in force
    /// (Redis time).
    pub async fn pause_remaining(&self, key: &str) -> Result<Option<(Micros, bool)>, StoreError> {
        let conn = self.conn()?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("TIME");
        let (raw, (seconds, micros)): (Option<String>, (i64, i64)) = match &*conn {
            Conn::Single(manager) => pipe.query_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => pipe.query_async(&mut cluster.clone()).await?,
        };
        let now = seconds * 1_000_000 + micros;
        Ok(raw
            .and_then(|raw| parse_pause(&raw))
            .filter(|(until, _)| *until > now)
            .map(|(until, outage)| (until - now, outage)))
    }

    /// Reads raw states for `/quotas`: a rolling log (sorted set), rolling counters or fixed
    /// windows (hashes, told apart by the counters' `w` field), a paced TAT (a string).
    pub async fn peek_states(&self, keys: &[String]) -> Result<Vec<State>, StoreError> {
        let conn = self.conn()?;
        let mut states = Vec::with_capacity(keys.len());
        for key in keys {
            let kind: String = conn.query(redis::cmd("TYPE").arg(key)).await?;
            let state = match kind.as_str() {
                "string" => {
                    let text: Option<String> = conn.query(redis::cmd("GET").arg(key)).await?;
                    text.and_then(|text| text.parse().ok()).map_or(State::Empty, State::Tat)
                }
                "zset" => {
                    let tokens: Vec<(String, f64)> =
                        conn.query(redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES")).await?;
                    let mut record = Admissions { width: 1, entries: Vec::new() };
                    for (_, score) in tokens {
                        let at = score as Micros;
                        match record.entries.last_mut() {
                            Some((start, count)) if *start == at => *count += 1,
                            _ => record.entries.push((at, 1)),
                        }
                    }
                    State::Admissions(record)
                }
                "hash" => {
                    let fields: Vec<(String, i64)> = conn.query(redis::cmd("HGETALL").arg(key)).await?;
                    let width = fields.iter().find(|(name, _)| name == "w").map(|(_, width)| *width);
                    let mut counts: Vec<(Micros, i64)> =
                        fields.into_iter().filter_map(|(start, count)| Some((start.parse().ok()?, count))).collect();
                    match width {
                        Some(width) => {
                            counts.sort_unstable();
                            State::Admissions(Admissions { width, entries: counts })
                        }
                        None => {
                            counts.sort_unstable_by_key(|count| std::cmp::Reverse(count.0));
                            match counts.as_slice() {
                                [] => State::Empty,
                                [first] => State::Counts(Counts { first: *first, second: (0, 0) }),
                                [first, second, ..] => State::Counts(Counts { first: *first, second: *second }),
                            }
                        }
                    }
                }
                _ => State::Empty,
            };
            states.push(state);
        }
        Ok(states)
    }

    /// Sends a usage flush (see `usage`): per upstream one pipeline (its keys share the hash
    /// tag, so one Cluster slot) adding each slot's spend by consumer and bumping each scope's
    /// spend counter. Returns the counters' new totals by bucket.
    pub async fn add_usage(&self, flush: &Flush) -> Result<HashMap<String, i64>, StoreError> {
        let conn = self.conn()?;
        let mut totals = HashMap::new();
        for group in &flush.groups {
            let mut pipe = redis::pipe();
            for hash in &group.hashes {
                for (consumer, milli) in &hash.deltas {
                    pipe.cmd("HINCRBY").arg(&hash.key).arg(&**consumer).arg(*milli).ignore();
                }
                pipe.cmd("PEXPIREAT").arg(&hash.key).arg(hash.expires_ms).ignore();
            }
            for (bucket, ttl_ms, delta) in &group.counters {
                let key = spent_key(bucket);
                pipe.cmd("INCRBY").arg(&key).arg(*delta);
                pipe.cmd("PEXPIRE").arg(&key).arg(*ttl_ms).ignore();
            }
            let values: Vec<i64> = conn.pipeline(&pipe).await?;
            if values.len() != group.counters.len() {
                return Err(StoreError::BadReply);
            }
            for ((bucket, _, _), total) in group.counters.iter().zip(values) {
                totals.insert(bucket.clone(), total);
            }
        }
        Ok(totals)
    }

    /// Reads usage slot hashes (see `usage`), each group of keys sharing a hash tag in one
    /// pipeline: each key's spend by consumer (milli-tokens).
    pub async fn read_usage(&self, groups: &[Vec<String>]) -> Result<Vec<Vec<Vec<(String, i64)>>>, StoreError> {
        let conn = self.conn()?;
        let mut out = Vec::with_capacity(groups.len());
        for keys in groups {
            if keys.is_empty() {
                out.push(Vec::new());
                continue;
            }
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("HGETALL").arg(key);
            }
            let hashes: Vec<Vec<(String, i64)>> = conn.pipeline(&pipe).await?;
            if hashes.len() != keys.len() {
                return Err(StoreError::BadReply);
            }
            out.push(hashes);
        }
        Ok(out)
    }

    /// Redis `TIME` in microseconds (for `/quotas`, so reported times match the script's).
    pub async fn time(&self) -> Result<Micros, StoreError> {
        let (seconds, micros): (i64, i64) = self.conn()?.query(&redis::cmd("TIME")).await?;
        Ok(seconds * 1_000_000 + micros)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.conn()?.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// Announces this replica and refreshes the live replica count.
    pub async fn heartbeat(&self) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        let key = format!("{}:replicas", self.settings.key_prefix);
        let window_ms = u64::try_from(self.settings.heartbeat.as_millis() * 5).unwrap_or(u64::MAX);
        let mut invocation = self.heartbeat.prepare_invoke();
        invocation.key(&key).arg(&self.replica_id).arg(window_ms);
        let count: u64 = conn.invoke(&invocation).await?;
        self.replicas.store(count.max(1), Ordering::Relaxed);
        Ok(count)
    }

    /// Removes this replica from the live set (at shutdown), so the others' shares grow at once.
    pub async fn leave(&self) {
        let Ok(conn) = self.conn() else { return };
        let key = format!("{}:replicas", self.settings.key_prefix);
        let mut command = redis::cmd("ZREM");
        command.arg(&key).arg(&self.replica_id);
        let _: Result<i64, _> = conn.query(&command).await;
    }

    /// The last known number of live replicas (at least 1).
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }
}

impl QuotaStore for RedisStore {
    async fn decide(&self, ask: Ask<'_>) -> Result<(Decision, i64), StoreError> {
        // Redis decides in its own time (`TIME`), whatever the caller's clock says.
        self.decide_leasing(ask.keys, ask.pause_key, ask.rules, ask.max_wait, 0, ask.lease).await
    }

    async fn pause(&self, key: &str, hold: Micros, outage: bool, _now: Micros) -> Result<(), StoreError> {
        let cap = i64::try_from(super::MAX_PAUSE.as_micros()).unwrap_or(i64::MAX);
        RedisStore::pause(self, key, hold, outage, cap).await
    }

    async fn pause_remaining(&self, key: &str, _now: Micros) -> Result<Option<(Micros, bool)>, StoreError> {
        RedisStore::pause_remaining(self, key).await
    }

    async fn adopt(&self, key: &str, rule: &Rule, remaining: i64, _now: Micros) -> Result<bool, StoreError> {
        RedisStore::adopt(self, key, rule, remaining, 0).await
    }

    async fn peek(&self, keys: &[String], _now: Micros) -> Result<Vec<State>, StoreError> {
        self.peek_states(keys).await
    }
}

impl SharedStore for RedisStore {
    async fn reconnect(&self) -> Result<(), StoreError> {
        RedisStore::reconnect(self).await
    }

    fn drop_connection(&self) {
        RedisStore::drop_connection(self);
    }

    async fn ping(&self) -> Result<(), StoreError> {
        RedisStore::ping(self).await
    }

    async fn heartbeat(&self) -> Result<u64, StoreError> {
        RedisStore::heartbeat(self).await
    }

    async fn leave(&self) {
        RedisStore::leave(self).await;
    }

    fn replicas(&self) -> u64 {
        RedisStore::replicas(self)
    }

    async fn time(&self) -> Result<Micros, StoreError> {
        RedisStore::time(self).await
    }

    async fn merge(&self, key: &str, rule: &Rule, state: &State) -> Result<i64, StoreError> {
        RedisStore::merge(self, key, rule, state, 0).await
    }
}

/// TCP keepalive and a user timeout: a peer that stops answering is given up on in seconds.
fn tcp_settings(timeout: Duration) -> TcpSettings {
    let keepalive =
        TcpKeepalive::new().with_time(Duration::from_secs(5)).with_interval(Duration::from_secs(1)).with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout((timeout * 20).clamp(Duration::from_secs(2), Duration::from_secs(10)))
}

/// The 7 script arguments of one rule (see `quota.lua`).
fn rule_args(invocation: &mut redis::ScriptInvocation<'_>, rule: &Rule, cost: i64) {
    match rule {
        Rule::Smooth(pace) => {
            invocation.arg(0).arg(cost).arg(pace.interval).arg(pace.tolerance).arg(0).arg(0).arg(0);
        }
        Rule::Fixed { limit, bounds } => {
            invocation.arg(1).arg(cost).arg(*limit).arg(bounds[0]).arg(bounds[1]).arg(bounds[2]).arg(bounds[3]);
        }
        Rule::Rolling(window) => {
            invocation.arg(2).arg(cost).arg(window.limit).arg(window.span).arg(window.width).arg(0).arg(0);
        }
    }
}

/// A pause key's value: `<until>` or `<until>o` (an outage).
fn parse_pause(raw: &str) -> Option<(Micros, bool)> {
    let digits = raw.trim_end_matches('o');
    Some((digits.parse().ok()?, digits.len() != raw.len()))
}

/// `redis+cluster://a:1,b:2` (or `rediss+cluster://`) to node URLs.
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
        2 => (Decision::Paused { remaining: reply[1], outage: reply[2] == 1, standings }, 0),
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
    use crate::config::cluster_nodes;

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

    #[test]
    fn pause_values() {
        assert_eq!(parse_pause("1700000000000000"), Some((1_700_000_000_000_000, false)));
        assert_eq!(parse_pause("1700000000000000o"), Some((1_700_000_000_000_000, true)));
        assert_eq!(parse_pause("garbage"), None);
    }
}
