//! The cache: get, mget, stamps, fill and invalidate, each one Redis round trip under the
//! `REDIS_TIMEOUT_MS` deadline, each timed and its failures counted. It knows entries and
//! keys; *when* to use them is `items::service`'s decision.

pub mod breaker;
pub mod connections;
pub mod invalidation;
pub mod redis;
pub mod singleflight;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{Script, Value};
use bytes::Bytes;
use rand::Rng;

use crate::cache::breaker::{Breaker, Permit};
use crate::items::model::ItemId;
use crate::metrics::{self, CacheOp};
pub use connections::Connections;
pub use redis::{Cached, Entry, Keys};

/// How long a write's stamp is kept. It must outlive any read in flight when the write
/// happened (reads take seconds at most: pool and Redis deadlines bound them); a day is
/// far beyond that and costs one small key per id written that day.
pub const STAMP_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why Redis did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no redis connection")]
    NoConnection,
    #[error("redis is failing: circuit open")]
    CircuitOpen,
    #[error("redis error")]
    Redis(#[source] Arc<::redis::RedisError>),
    /// Redis answered, but not with what the command returns (another program's key, a
    /// proxy in between).
    #[error("unexpected reply to {0}")]
    UnexpectedReply(&'static str),
}

/// The write stamp a reader noted before reading Postgres; empty when the id was never
/// written (or its stamp expired). See [`redis::FILL_SCRIPT`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stamp(Bytes);

/// One entry to store if the id's stamp is still the one noted.
#[derive(Debug)]
pub struct Fill {
    pub id: ItemId,
    pub noted: Stamp,
    pub entry: Entry,
    pub ttl: Duration,
}

#[derive(Clone)]
pub struct Cache {
    conns: Connections,
    keys: Keys,
    timeout: Duration,
    fill_script: Script,
    invalidate_script: Script,
    breaker: Arc<Breaker>,
}

impl Cache {
    pub fn new(conns: Connections, key_prefix: &str, timeout: Duration) -> Cache {
        Cache {
            conns,
            keys: Keys::new(key_prefix),
            timeout,
            fill_script: Script::new(redis::FILL_SCRIPT),
            invalidate_script: Script::new(redis::INVALIDATE_SCRIPT),
            breaker: Arc::new(Breaker::default()),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn connections(&self) -> &Connections {
        &self.conns
    }

    /// The entry for `id`, if any (fresh or not: the caller decides).
    pub async fn get(&self, id: ItemId) -> Result<Option<Entry>, CacheError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.keys.entry(id));
        let value = self.run(CacheOp::Get, &cmd).await?;
        Ok(entry_of(value))
    }

    /// The entries for `ids`, in order: one `MGET`.
    pub async fn mget(&self, ids: &[ItemId]) -> Result<Vec<Option<Entry>>, CacheError> {
        let mut cmd = ::redis::cmd("MGET");
        for &id in ids {
            cmd.arg(self.keys.entry(id));
        }
        match self.run(CacheOp::Mget, &cmd).await? {
            Value::Array(values) if values.len() == ids.len() => {
                Ok(values.into_iter().map(entry_of).collect())
            }
            _ => Err(CacheError::UnexpectedReply("MGET")),
        }
    }

    /// The current write stamps of `ids`, in order: one `MGET`. Taken before reading
    /// Postgres, so that a fill can prove no write came in between.
    pub async fn stamps(&self, ids: &[ItemId]) -> Result<Vec<Stamp>, CacheError> {
        let mut cmd = ::redis::cmd("MGET");
        for &id in ids {
            cmd.arg(self.keys.stamp(id));
        }
        match self.run(CacheOp::Mget, &cmd).await? {
            Value::Array(values) if values.len() == ids.len() => Ok(values
                .into_iter()
                .map(|v| match v {
                    Value::BulkString(raw) => Stamp(Bytes::from(raw)),
                    _ => Stamp::default(),
                })
                .collect()),
            _ => Err(CacheError::UnexpectedReply("MGET")),
        }
    }

    /// Stores each entry whose stamp is unchanged, in one script call. Returns how many
    /// were stored; the others were written since their stamp was noted.
    pub async fn fill(&self, fills: &[Fill]) -> Result<usize, CacheError> {
        if fills.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.fill_script.prepare_invoke();
        for fill in fills {
            invocation
                .key(self.keys.entry(fill.id))
                .key(self.keys.stamp(fill.id))
                .arg(fill.noted.0.as_ref())
                .arg(fill.entry.encode())
                .arg(fill.ttl.as_millis().max(1) as u64);
        }
        let filled: Vec<i64> = self.invoke(CacheOp::Set, &invocation).await?;
        Ok(filled.iter().filter(|&&f| f == 1).count())
    }

    /// After a write's commit: a new stamp for `id` and its entry deleted, atomically. The
    /// next read goes to Postgres, and a reader that read before the write cannot fill.
    pub async fn invalidate(&self, id: ItemId) -> Result<(), CacheError> {
        let stamp = format!("{:016x}", rand::rng().random::<u64>());
        let mut invocation = self.invalidate_script.prepare_invoke();
        invocation
            .key(self.keys.entry(id))
            .key(self.keys.stamp(id))
            .arg(stamp)
            .arg(STAMP_TTL.as_millis() as u64);
        self.invoke::<i64>(CacheOp::Delete, &invocation)
            .await
            .map(drop)
    }

    /// `PING`, for `/readyz`: its own `op` label, and outside the circuit breaker, so that
    /// a readiness probe neither counts as a read nor opens (or closes) the circuit.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let cmd = ::redis::cmd("PING");
        let started = Instant::now();
        let result = self
            .send(|mut conn| async move { cmd.query_async::<Value>(&mut conn).await })
            .await;
        self.account(CacheOp::Ping, started, &result);
        result.map(drop)
    }

    /// Whether the circuit breaker has stopped sending calls to Redis.
    pub fn is_circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    async fn run(&self, op: CacheOp, cmd: &::redis::Cmd) -> Result<Value, CacheError> {
        self.call(op, |mut conn| async move {
            cmd.query_async::<Value>(&mut conn).await
        })
        .await
    }

    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        op: CacheOp,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, CacheError> {
        self.call(op, |mut conn| async move {
            invocation.invoke_async::<T>(&mut conn).await
        })
        .await
    }

    /// One Redis call: through the breaker, timed and counted.
    async fn call<T, F, Fut>(&self, op: CacheOp, send: F) -> Result<T, CacheError>
    where
        F: FnOnce(::redis::aio::MultiplexedConnection) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let permit = self.breaker.permit();
        if permit == Permit::Refused {
            metrics::record_cache_error(op);
            return Err(CacheError::CircuitOpen);
        }
        let started = Instant::now();
        let result = self.send(send).await;
        match &result {
            Ok(_) => self.breaker.succeeded(permit),
            Err(_) => self.breaker.failed(permit),
        }
        self.account(op, started, &result);
        result
    }

    /// Sends on a lent connection under the deadline. A connection that failed or hung is
    /// replaced, since a frozen peer would otherwise hang every command sent on it.
    async fn send<T, F, Fut>(&self, send: F) -> Result<T, CacheError>
    where
        F: FnOnce(::redis::aio::MultiplexedConnection) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let Some((conn, lent)) = self.conns.lend() else {
            return Err(CacheError::NoConnection);
        };
        match tokio::time::timeout(self.timeout, send(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.conns.discard(&lent);
                }
                Err(CacheError::Redis(Arc::new(e)))
            }
            Err(_) => {
                self.conns.discard(&lent);
                Err(CacheError::Timeout(self.timeout))
            }
        }
    }

    fn account<T>(&self, op: CacheOp, started: Instant, result: &Result<T, CacheError>) {
        metrics::record_cache_op(op, started.elapsed());
        if result.is_err() {
            metrics::record_cache_error(op);
        }
    }
}

fn entry_of(value: Value) -> Option<Entry> {
    match value {
        Value::BulkString(raw) => Entry::decode(Bytes::from(raw)),
        _ => None,
    }
}
