//! The cache: get, mget, lease, fill and invalidate, each one Redis round trip under the
//! `REDIS_TIMEOUT_MS` deadline, each timed and its failures counted. It knows entries and
//! keys; *when* to use them is `items::service`'s decision.

pub mod redis;
pub mod singleflight;

use std::time::{Duration, Instant};

use ::redis::{Script, Value};
use bytes::Bytes;
use rand::Rng;

use crate::items::model::ItemId;
use crate::metrics::{self, CacheOp};
pub use redis::{Cached, Connections, Entry, Keys};

/// How long a reader's lease to fill an entry lasts. Longer than any Postgres read we
/// would wait for (pool wait 2 s + query); a lease left by a reader that died only stops
/// others from *filling* for this long, they still answer from Postgres.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// Why Redis did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no redis connection")]
    NoConnection,
    #[error("redis error: {0}")]
    Redis(String),
}

/// A reader's right to fill one entry; see [`redis::FILL_SCRIPT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: ItemId,
    token: String,
}

/// One entry to store under a lease.
#[derive(Debug)]
pub struct Fill {
    pub lease: Lease,
    pub entry: Entry,
    pub ttl: Duration,
}

#[derive(Clone)]
pub struct Cache {
    conns: Connections,
    keys: Keys,
    timeout: Duration,
    fill_script: Script,
}

impl Cache {
    pub fn new(conns: Connections, key_prefix: &str, timeout: Duration) -> Cache {
        Cache {
            conns,
            keys: Keys::new(key_prefix),
            timeout,
            fill_script: Script::new(redis::FILL_SCRIPT),
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
            other => Err(CacheError::Redis(format!(
                "unexpected MGET reply {other:?}"
            ))),
        }
    }

    /// Takes the fill lease of each id where no other reader holds one (`SET NX`, one
    /// pipelined round trip). `None` where another reader is filling: read, don't fill.
    pub async fn lease(&self, ids: &[ItemId]) -> Result<Vec<Option<Lease>>, CacheError> {
        let mut pipe = ::redis::pipe();
        let leases: Vec<Lease> = ids
            .iter()
            .map(|&id| Lease {
                id,
                token: format!("{:016x}", rand::rng().random::<u64>()),
            })
            .collect();
        for lease in &leases {
            pipe.cmd("SET")
                .arg(self.keys.lease(lease.id))
                .arg(&lease.token)
                .arg("NX")
                .arg("PX")
                .arg(LEASE_TTL.as_millis() as u64);
        }
        let replies: Vec<Value> = self.run_pipe(CacheOp::Set, &pipe).await?;
        Ok(leases
            .into_iter()
            .zip(replies)
            .map(|(lease, reply)| matches!(reply, Value::Okay).then_some(lease))
            .collect())
    }

    /// Stores each entry whose lease still stands, in one script call. Returns how many
    /// were stored; the others were invalidated by a write since their lease was taken.
    pub async fn fill(&self, fills: &[Fill]) -> Result<usize, CacheError> {
        if fills.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.fill_script.prepare_invoke();
        for fill in fills {
            invocation
                .key(self.keys.entry(fill.lease.id))
                .key(self.keys.lease(fill.lease.id))
                .arg(&fill.lease.token)
                .arg(fill.entry.encode())
                .arg(fill.ttl.as_millis().max(1) as u64);
        }
        let started = Instant::now();
        let result = match self.conns.lend() {
            None => Err(CacheError::NoConnection),
            Some(mut lent) => {
                let outcome = tokio::time::timeout(
                    self.timeout,
                    invocation.invoke_async::<Vec<i64>>(&mut lent.conn),
                )
                .await;
                self.settle(&lent, outcome)
            }
        };
        self.account(CacheOp::Set, started, &result);
        Ok(result?.iter().filter(|&&filled| filled == 1).count())
    }

    /// Deletes the entry and any fill lease of `id`: the next read goes to Postgres, and a
    /// reader that read before the write can no longer fill.
    pub async fn invalidate(&self, id: ItemId) -> Result<(), CacheError> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(self.keys.entry(id)).arg(self.keys.lease(id));
        self.run(CacheOp::Delete, &cmd).await.map(drop)
    }

    /// `PING`, for `/readyz`.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let cmd = ::redis::cmd("PING");
        self.run(CacheOp::Get, &cmd).await.map(drop)
    }

    async fn run(&self, op: CacheOp, cmd: &::redis::Cmd) -> Result<Value, CacheError> {
        let started = Instant::now();
        let result = match self.conns.lend() {
            None => Err(CacheError::NoConnection),
            Some(mut lent) => {
                let outcome =
                    tokio::time::timeout(self.timeout, cmd.query_async::<Value>(&mut lent.conn))
                        .await;
                self.settle(&lent, outcome)
            }
        };
        self.account(op, started, &result);
        result
    }

    async fn run_pipe(
        &self,
        op: CacheOp,
        pipe: &::redis::Pipeline,
    ) -> Result<Vec<Value>, CacheError> {
        let started = Instant::now();
        let result = match self.conns.lend() {
            None => Err(CacheError::NoConnection),
            Some(mut lent) => {
                let outcome = tokio::time::timeout(
                    self.timeout,
                    pipe.query_async::<Vec<Value>>(&mut lent.conn),
                )
                .await;
                self.settle(&lent, outcome)
            }
        };
        self.account(op, started, &result);
        result
    }

    /// Turns a deadline-bounded Redis result into ours; a connection that failed or hung
    /// is replaced, since a frozen peer would otherwise hang every command sent on it.
    fn settle<T>(
        &self,
        lent: &redis::Lent<'_>,
        outcome: Result<::redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, CacheError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.conns.discard(lent);
                }
                Err(CacheError::Redis(e.to_string()))
            }
            Err(_) => {
                self.conns.discard(lent);
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
