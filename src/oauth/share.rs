//! Where replicas meet over a token: nowhere with the memory store (each process keeps its
//! own), Redis with the Redis store (the one `store.url` names, on a connection of the broker's
//! own, so a slow token exchange never queues behind quota decisions).
//!
//! Three keys per credential, beside the limiter's and under the same `{<upstream>}` hash tag
//! (one Redis Cluster slot), with `!` so no quota name can collide with them:
//!
//! - `…:!oauth:<fp>:token`: the current access token, expiring with it (its remaining life is
//!   the key's `PTTL`, so replicas' clocks never matter);
//! - `…:!oauth:<fp>:lock`: held while one replica asks the token endpoint: `SET NX PX`, with a
//!   lease longer than an exchange may take, released only by its owner;
//! - `…:!oauth:<fp>:rotated`: the newest refresh token, when the endpoint rotates them.
//!
//! `<fp>` is a hash of the token URL, grant, scope and audience: two configs asking for
//! different tokens (a rollout changing the scope) never take each other's.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::IntoConnectionInfo;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::rotation::Rotated;
use crate::config::{Store, StoreKind};

/// Releases the lock only if this replica still holds it.
const UNLOCK_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// How long a rotated refresh token is kept without being used.
const ROTATED_TTL: Duration = Duration::from_secs(400 * 86_400);

/// After a failed connect, the next is tried no sooner than this.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// A token another replica obtained, as read from the store.
#[derive(Clone)]
pub struct SharedToken {
    pub value: String,
    /// The lifetime it was issued with.
    pub lifetime: Duration,
    /// What is left of it now.
    pub remaining: Duration,
    pub instance_url: Option<String>,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken").field("remaining", &self.remaining).finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    v: String,
    /// Lifetime in milliseconds.
    life: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inst: Option<String>,
}

/// The store could not be used: the broker carries on alone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShareError {
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Redis did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// The keys of one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub token: String,
    pub lock: String,
    pub rotated: String,
}

impl Keys {
    pub fn new(key_prefix: &str, upstream: &str, fingerprint: &str) -> Self {
        let base = format!("{key_prefix}:{{{upstream}}}:!oauth:{fingerprint}");
        Self { token: format!("{base}:token"), lock: format!("{base}:lock"), rotated: format!("{base}:rotated") }
    }
}

/// Memory (nothing shared) or Redis.
pub enum Share {
    Memory,
    Redis(RedisShare),
}

impl Share {
    pub fn for_store(store: &Store) -> Self {
        match (store.kind, &store.url) {
            (StoreKind::Redis, Some(url)) => Share::Redis(RedisShare::new(url.clone(), store.timeout)),
            _ => Share::Memory,
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Share::Redis(_))
    }

    /// The token other replicas use now, if one is left.
    pub async fn read_token(&self, keys: &Keys) -> Result<Option<SharedToken>, ShareError> {
        let Share::Redis(redis) = self else { return Ok(None) };
        let mut pipe = redis::pipe();
        pipe.atomic().get(&keys.token).pttl(&keys.token);
        let (value, left): (Option<String>, i64) = redis.pipe(&pipe).await?;
        let Some(stored) = value.and_then(|text| serde_json::from_str::<Stored>(&text).ok()) else { return Ok(None) };
        let Ok(left) = u64::try_from(left) else { return Ok(None) };
        Ok(Some(SharedToken {
            value: stored.v,
            lifetime: Duration::from_millis(stored.life),
            remaining: Duration::from_millis(left),
            instance_url: stored.inst,
        }))
    }

    /// Publishes a token, to expire with it.
    pub async fn write_token(&self, keys: &Keys, token: &SharedToken) -> Result<(), ShareError> {
        let Share::Redis(redis) = self else { return Ok(()) };
        let stored = Stored { v: token.value.clone(), life: millis(token.lifetime), inst: token.instance_url.clone() };
        let text = serde_json::to_string(&stored).map_err(|error| ShareError::Redis(error.to_string()))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&keys.token).arg(text).arg("PX").arg(millis(token.remaining).max(1));
        redis.query::<()>(&cmd).await
    }

    /// Takes the refresh lock for `lease`; `false` when another replica holds it. The memory
    /// store always grants it (there is no one to share with).
    pub async fn lock(&self, keys: &Keys, owner: &str, lease: Duration) -> Result<bool, ShareError> {
        let Share::Redis(redis) = self else { return Ok(true) };
        let mut cmd = redis::cmd("SET");
        cmd.arg(&keys.lock).arg(owner).arg("NX").arg("PX").arg(millis(lease).max(1));
        let reply: Option<String> = redis.query(&cmd).await?;
        Ok(reply.is_some())
    }

    /// Releases the lock, if `owner` still holds it.
    pub async fn unlock(&self, keys: &Keys, owner: &str) -> Result<(), ShareError> {
        let Share::Redis(redis) = self else { return Ok(()) };
        let mut invocation = redis.unlock.key(&keys.lock);
        invocation.arg(owner);
        redis.invoke::<i64>(&invocation).await.map(drop)
    }

    pub async fn read_rotated(&self, keys: &Keys) -> Result<Option<Rotated>, ShareError> {
        let Share::Redis(redis) = self else { return Ok(None) };
        let mut cmd = redis::cmd("GET");
        cmd.arg(&keys.rotated);
        let value: Option<String> = redis.query(&cmd).await?;
        Ok(value.and_then(|text| serde_json::from_str(&text).ok()))
    }

    pub async fn write_rotated(&self, keys: &Keys, rotated: &Rotated) -> Result<(), ShareError> {
        let Share::Redis(redis) = self else { return Ok(()) };
        let text = serde_json::to_string(rotated).map_err(|error| ShareError::Redis(error.to_string()))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&keys.rotated).arg(text).arg("PX").arg(millis(ROTATED_TTL));
        redis.query::<()>(&cmd).await
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The broker's own Redis connection, opened on first use and rebuilt after a failure.
pub struct RedisShare {
    url: String,
    /// Each command's limit.
    op_timeout: Duration,
    connect_timeout: Duration,
    conn: ArcSwapOption<Conn>,
    /// Serialises connecting; holds when the last attempt failed.
    connecting: tokio::sync::Mutex<Option<Instant>>,
    unlock: redis::Script,
}

impl RedisShare {
    fn new(url: String, store_timeout: Duration) -> Self {
        Self {
            url,
            op_timeout: (store_timeout * 4).max(Duration::from_millis(250)),
            connect_timeout: (store_timeout * 20).max(Duration::from_secs(1)),
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(None),
            unlock: redis::Script::new(UNLOCK_SCRIPT),
        }
    }

    async fn conn(&self) -> Result<Arc<Conn>, ShareError> {
        if let Some(conn) = self.conn.load_full() {
            return Ok(conn);
        }
        let mut failed_at = self.connecting.lock().await;
        if let Some(conn) = self.conn.load_full() {
            return Ok(conn);
        }
        if failed_at.is_some_and(|at| at.elapsed() < RECONNECT_PAUSE) {
            return Err(ShareError::Redis("not connected (the last attempt failed)".into()));
        }
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(Ok(conn)) => {
                let conn = Arc::new(conn);
                self.conn.store(Some(conn.clone()));
                *failed_at = None;
                Ok(conn)
            }
            Ok(Err(error)) => {
                *failed_at = Some(Instant::now());
                Err(ShareError::Redis(error.to_string()))
            }
            Err(_) => {
                *failed_at = Some(Instant::now());
                Err(ShareError::Timeout(self.connect_timeout))
            }
        }
    }

    async fn open(&self) -> redis::RedisResult<Conn> {
        match crate::config::cluster_nodes(&self.url) {
            Some(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.op_timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
            None => {
                let client = redis::Client::open(self.url.as_str().into_connection_info()?)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.op_timeout))
                    .set_number_of_retries(1);
                Ok(Conn::Single(client.get_connection_manager_with_config(config).await?))
            }
        }
    }

    /// Runs one command; a failure drops the connection, so the next use builds a new one.
    async fn bounded<T>(&self, run: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, ShareError> {
        match tokio::time::timeout(self.op_timeout, run).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
                    self.conn.store(None);
                }
                Err(ShareError::Redis(error.to_string()))
            }
            Err(_) => {
                self.conn.store(None);
                Err(ShareError::Timeout(self.op_timeout))
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ShareError> {
        let conn = self.conn().await?;
        self.bounded(async {
            match &*conn {
                Conn::Single(manager) => cmd.query_async(&mut manager.clone()).await,
                Conn::Cluster(cluster) => cmd.query_async(&mut cluster.clone()).await,
            }
        })
        .await
    }

    async fn pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, ShareError> {
        let conn = self.conn().await?;
        self.bounded(async {
            match &*conn {
                Conn::Single(manager) => pipe.query_async(&mut manager.clone()).await,
                Conn::Cluster(cluster) => pipe.query_async(&mut cluster.clone()).await,
            }
        })
        .await
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ShareError> {
        let conn = self.conn().await?;
        self.bounded(async {
            match &*conn {
                Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await,
                Conn::Cluster(cluster) => invocation.invoke_async(&mut cluster.clone()).await,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_beside_the_limiters_in_one_slot() {
        let keys = Keys::new("sluice", "hubspot", "ab12");
        assert_eq!(keys.token, "sluice:{hubspot}:!oauth:ab12:token");
        assert_eq!(keys.lock, "sluice:{hubspot}:!oauth:ab12:lock");
        assert_eq!(keys.rotated, "sluice:{hubspot}:!oauth:ab12:rotated");
    }
}
