//! The cache: get, mget, stamps, fill and invalidate, each one Redis round trip under the
//! `REDIS_TIMEOUT_MS` deadline, each timed and its failures counted. It knows entries and
//! keys; *when* to use them is `items::service`'s decision.

pub mod breaker;
pub mod cluster;
pub mod connections;
pub mod invalidation;
pub mod lease;
pub mod near;
pub mod redis;
pub mod refresh;
pub mod singleflight;
pub mod tracking;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::cluster_routing::{RoutingInfo, Slot};
use ::redis::{Script, Value};
use bytes::Bytes;
use rand::Rng;

use crate::cache::breaker::{Breakers, Permit};
use crate::db::replicas::Lsn;
use crate::failpoints;
use crate::items::model::ItemId;
use crate::metrics::{self, CacheOp};
pub use connections::{Conn, Connections, Factory};
pub use lease::{LeaseToken, Polled};
pub use near::Near;
pub use redis::{Cached, Entry, Keys, NameEntry};

/// How long a write's stamp is kept. It must outlive any read in flight when the write
/// happened: a read's load is bounded by a lease wait (1 s, `lease`), the pool wait (2 s),
/// a new connection (3 s), the statement timeout (5 s) and the coalescing linger (0.5 s),
/// about 11.5 s. A minute is
/// well beyond that, and bounds what bulk writes cost Redis: one stamp (~100 bytes) per id
/// written in the last minute (a million-row `UPDATE` through the change feed: ~100 MB
/// for a minute, where a day's TTL would keep it for a day).
pub const STAMP_TTL: Duration = Duration::from_secs(60);

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

/// What a reader noted before reading Postgres: the id's write stamp (empty when the id
/// was never written, or its stamp expired) and the key space's flush token (empty until
/// the first truncate). See [`redis::FILL_SCRIPT`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stamp {
    write: Bytes,
    flush: Bytes,
}

/// Why an id is invalidated: a write (by the id of its transaction, so that the API's
/// invalidation and the change feed's of the same write apply once; see
/// [`redis::INVALIDATE_SCRIPT`]), or an eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// A write: its transaction's id, and the WAL position its commit is at (0 unknown
    /// because no replica needs it; `u64::MAX` unknown because asking failed).
    Write {
        txid: i64,
        lsn: Lsn,
    },
    Eviction,
}

/// What an invalidation is for: an item's entry, or a name's cached lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Item(ItemId),
    Name(String),
}

impl Stamp {
    /// The WAL position of the write this stamp records (`t<txid>:<lsn>:<token>`): a replica
    /// must have replayed it to answer a reader that noted this stamp. 0 for no write (no
    /// stamp, an eviction's).
    pub fn lsn(&self) -> Lsn {
        let Some(rest) = self.write.strip_prefix(b"t") else {
            return 0;
        };
        let mut fields = rest.split(|&b| b == b':');
        let lsn = fields.nth(1).and_then(|hex| std::str::from_utf8(hex).ok());
        // A stamp that does not say is treated as the newest write.
        lsn.and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or(Lsn::MAX)
    }
}

/// How many ids one invalidation script call covers: big batches (the change feed after a
/// bulk UPDATE) are cut so that no script holds Redis for long (500 ids: well under a
/// millisecond of Redis time).
pub const INVALIDATE_CHUNK: usize = 500;

/// How many keys one `SCAN` step asks for when a truncate drops every entry: each step
/// then takes well under a millisecond of Redis time (so it never holds Redis up), and a
/// million keys take a thousand round trips.
const SCAN_COUNT: usize = 1000;

/// How many copies of the flush token (one per slot with a cluster) a truncate replaces at
/// once.
const FLUSH_CONCURRENCY: usize = 256;

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
    flush_script: Script,
    breakers: Arc<Breakers>,
    /// The near cache in front of Redis, when on (`CACHE_L1_MAX_MB`).
    near: Option<Arc<Near>>,
}

/// What a lookup of one id found: a fresh entry in the near cache, or what Redis holds (an
/// entry, fresh or not, or none) with the id's write stamp, read in the same call.
#[derive(Debug)]
pub enum Looked {
    Near(Entry),
    Redis { entry: Option<Entry>, stamp: Stamp },
}

impl Cache {
    pub fn new(conns: Connections, keys: Keys, timeout: Duration) -> Cache {
        Cache {
            conns,
            keys,
            timeout,
            fill_script: Script::new(redis::FILL_SCRIPT),
            invalidate_script: Script::new(redis::INVALIDATE_SCRIPT),
            flush_script: Script::new(redis::FLUSH_SCRIPT),
            breakers: Arc::new(Breakers::default()),
            near: None,
        }
    }

    /// Puts the near cache in front of Redis (its invalidations come from
    /// `tracking::follow`, which the application runs).
    pub fn with_near(mut self, near: Arc<Near>) -> Cache {
        self.near = Some(near);
        self
    }

    /// An item's entry: from the near cache if it holds a fresh one, else from Redis with
    /// the id's write stamp (and a fresh entry from Redis is stored in the near cache,
    /// unless an invalidation of the id came during the read).
    pub async fn lookup(&self, id: ItemId) -> Result<Looked, CacheError> {
        let Some(near) = self.near.as_ref().filter(|near| near.is_live()) else {
            let (entry, stamp) = self.get(id).await?;
            return Ok(Looked::Redis { entry, stamp });
        };
        let now = now_ms();
        if let Some(entry) = near.get(id, now) {
            return Ok(Looked::Near(entry));
        }
        let ticket = near.admit(id, now).then(|| near.ticket(id));
        let got = self.get(id).await;
        if let (Ok((Some(entry), _)), Some(ticket)) = (&got, ticket)
            && entry.is_fresh(now_ms())
        {
            failpoints::pause(failpoints::BEFORE_NEAR_STORE, || self.keys.entry(id)).await;
            ticket.store(entry);
        }
        let (entry, stamp) = got?;
        Ok(Looked::Redis { entry, stamp })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn connections(&self) -> &Connections {
        &self.conns
    }

    /// The entry for `id`, if any (fresh or not: the caller decides), and the id's write
    /// stamp with the flush token, in one `MGET` (op `get`: one id's lookup): a miss notes
    /// that stamp before it loads, so it costs no second round trip. Read with the entry,
    /// the stamp is noted earlier than a separate call would note it, which only makes the
    /// fill's check stricter. With a cluster the three keys share the id's slot.
    pub async fn get(&self, id: ItemId) -> Result<(Option<Entry>, Stamp), CacheError> {
        let keys = &self.keys;
        let (raw, stamp) = self
            .entry_and_stamp(keys.entry(id), keys.stamp(id), keys.flush_for_item(id))
            .await?;
        Ok((raw.and_then(Entry::decode), stamp))
    }

    /// A name's cached lookup, if any (fresh or not), and the name's write stamp: one
    /// `MGET`, as [`Cache::get`].
    pub async fn get_name(&self, name: &str) -> Result<(Option<NameEntry>, Stamp), CacheError> {
        let keys = &self.keys;
        let (raw, stamp) = self
            .entry_and_stamp(
                keys.name_entry(name),
                keys.name_stamp(name),
                keys.flush_for_name(name),
            )
            .await?;
        Ok((raw.and_then(|raw| NameEntry::decode(&raw)), stamp))
    }

    /// An entry's raw bytes (if any) and its stamp with the flush token: one `MGET`.
    async fn entry_and_stamp(
        &self,
        entry: String,
        stamp: String,
        flush: String,
    ) -> Result<(Option<Bytes>, Stamp), CacheError> {
        let slot = self.slot_of(|| entry.clone());
        let mut cmd = ::redis::cmd("MGET");
        cmd.arg(entry).arg(stamp).arg(flush);
        match self.run_in(CacheOp::Get, slot, &cmd).await? {
            Value::Array(values) if values.len() == 3 => {
                let mut values = values.into_iter();
                let raw = match values.next() {
                    Some(Value::BulkString(raw)) => Some(Bytes::from(raw)),
                    _ => None,
                };
                let write = bytes_of(values.next());
                let flush = bytes_of(values.next());
                Ok((raw, Stamp { write, flush }))
            }
            _ => Err(CacheError::UnexpectedReply("MGET")),
        }
    }

    /// The entries for `ids`, in order: those the near cache holds fresh, and one `MGET` for
    /// the rest (fresh ones then stored in the near cache, as in [`Cache::lookup`]).
    pub async fn mget(&self, ids: &[ItemId]) -> Result<Vec<Option<Entry>>, CacheError> {
        let Some(near) = self.near.as_ref().filter(|near| near.is_live()) else {
            return self.mget_redis(ids).await;
        };
        let mut found: Vec<Option<Entry>> = vec![None; ids.len()];
        let mut ask = Vec::with_capacity(ids.len());
        let now = now_ms();
        for (i, &id) in ids.iter().enumerate() {
            match near.get(id, now) {
                Some(entry) => found[i] = Some(entry),
                None => ask.push((i, near.admit(id, now).then(|| near.ticket(id)))),
            }
        }
        if ask.is_empty() {
            return Ok(found);
        }
        let asked: Vec<ItemId> = ask.iter().map(|&(i, _)| ids[i]).collect();
        // On an error the tickets are dropped, which frees them.
        let entries = self.mget_redis(&asked).await?;
        let now = now_ms();
        for ((i, ticket), entry) in ask.into_iter().zip(entries) {
            if let (Some(ticket), Some(entry)) = (ticket, &entry)
                && entry.is_fresh(now)
            {
                ticket.store(entry);
            }
            found[i] = entry;
        }
        Ok(found)
    }

    /// The entries for `ids` in Redis, in order: one `MGET`.
    async fn mget_redis(&self, ids: &[ItemId]) -> Result<Vec<Option<Entry>>, CacheError> {
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

    /// The current write stamps of `ids`, in order, with the flush token: one `MGET`.
    /// Taken before reading Postgres, so that a fill can prove no write came in between.
    pub async fn stamps(&self, ids: &[ItemId]) -> Result<Vec<Stamp>, CacheError> {
        self.stamps_of(
            ids.iter()
                .map(|&id| (self.keys.stamp(id), self.keys.flush_for_item(id)))
                .collect(),
        )
        .await
    }

    /// Stamps with their flush tokens: with one Redis, the stamps and the one token; with a
    /// cluster, each stamp with its slot's token (`MGET` split by slot in redis-rs).
    async fn stamps_of(&self, keys: Vec<(String, String)>) -> Result<Vec<Stamp>, CacheError> {
        let count = keys.len();
        let per_slot = self.keys.is_cluster();
        let mut cmd = ::redis::cmd("MGET");
        for (stamp, _) in &keys {
            cmd.arg(stamp);
        }
        match (per_slot, keys.first()) {
            (true, _) => {
                for (_, flush) in &keys {
                    cmd.arg(flush);
                }
            }
            (false, Some((_, flush))) => {
                cmd.arg(flush);
            }
            (false, None) => return Ok(Vec::new()),
        }
        match self.run(CacheOp::Mget, &cmd).await? {
            Value::Array(mut values)
                if values.len() == count + if per_slot { count } else { 1 } =>
            {
                let flushes: Vec<Bytes> = if per_slot {
                    values
                        .split_off(count)
                        .into_iter()
                        .map(|v| bytes_of(Some(v)))
                        .collect()
                } else {
                    vec![bytes_of(values.pop()); count]
                };
                Ok(values
                    .into_iter()
                    .zip(flushes)
                    .map(|(v, flush)| Stamp {
                        write: bytes_of(Some(v)),
                        flush,
                    })
                    .collect())
            }
            _ => Err(CacheError::UnexpectedReply("MGET")),
        }
    }

    /// Stores a name's lookup if its stamp is still the one noted (see
    /// [`redis::FILL_SCRIPT`]); true if stored.
    pub async fn fill_name(
        &self,
        name: &str,
        noted: &Stamp,
        entry: &NameEntry,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let mut invocation = self.fill_script.prepare_invoke();
        invocation
            .key(self.keys.flush_for_name(name))
            .key(self.keys.name_entry(name))
            .key(self.keys.name_stamp(name))
            .key(self.keys.name_lease(name))
            .arg(noted.write.as_ref())
            .arg(noted.flush.as_ref())
            .arg(entry.encode())
            .arg(ttl.as_millis().max(1) as u64)
            .arg("");
        let slot = self.slot_of(|| self.keys.name_entry(name));
        let filled: Vec<i64> = self.invoke(CacheOp::Set, slot, &invocation).await?;
        Ok(filled.first() == Some(&1))
    }

    /// Stores each entry whose stamp is unchanged, in one script call (one per slot with a
    /// cluster), and releases `lease` on their ids (`lease`). Returns how many were stored;
    /// the others were written since their stamp was noted.
    pub async fn fill(
        &self,
        fills: &[Fill],
        lease: Option<&LeaseToken>,
    ) -> Result<usize, CacheError> {
        if fills.is_empty() {
            return Ok(0);
        }
        let filled = self
            .per_slot(
                fills,
                |fill| self.keys.entry(fill.id),
                |group| async move {
                    let mut invocation = self.fill_script.prepare_invoke();
                    invocation.key(self.keys.flush_for_item(group[0].id));
                    for fill in &group {
                        invocation
                            .key(self.keys.entry(fill.id))
                            .key(self.keys.stamp(fill.id))
                            .key(self.keys.lease(fill.id))
                            .arg(fill.noted.write.as_ref())
                            .arg(fill.noted.flush.as_ref())
                            .arg(fill.entry.encode())
                            .arg(fill.ttl.as_millis().max(1) as u64)
                            .arg(lease.map_or("", LeaseToken::as_str));
                    }
                    let slot = self.slot_of(|| self.keys.entry(group[0].id));
                    self.invoke::<Vec<i64>>(CacheOp::Set, slot, &invocation)
                        .await
                },
            )
            .await?;
        Ok(filled.iter().filter(|&&f| f == 1).count())
    }

    /// After a write's commit: a new stamp for `id` and its entry deleted, atomically. The
    /// next read goes to Postgres, and a reader that read before the write cannot fill.
    pub async fn invalidate(&self, id: ItemId, cause: Invalidation) -> Result<(), CacheError> {
        self.invalidate_many(CacheOp::Delete, &[(Target::Item(id), cause)])
            .await
    }

    /// [`Cache::invalidate`] for many items and names: one script call per
    /// [`INVALIDATE_CHUNK`] of them, counted as `op`.
    pub async fn invalidate_many(
        &self,
        op: CacheOp,
        targets: &[(Target, Invalidation)],
    ) -> Result<(), CacheError> {
        let result = self.invalidate_in_redis(op, targets).await;
        // After the Redis invalidation (whatever came of it): a read on this instance that
        // got the old entry from Redis before it can no longer store it here, and one that
        // stored it already loses it, before the write is acknowledged.
        if let Some(near) = &self.near {
            for (target, _) in targets {
                if let Target::Item(id) = target {
                    near.invalidate(*id);
                }
            }
        }
        result
    }

    async fn invalidate_in_redis(
        &self,
        op: CacheOp,
        targets: &[(Target, Invalidation)],
    ) -> Result<(), CacheError> {
        for chunk in targets.chunks(INVALIDATE_CHUNK) {
            self.per_slot(
                chunk,
                |(target, _)| self.target_keys(target).0,
                |group| async move {
                    let mut invocation = self.invalidate_script.prepare_invoke();
                    invocation.arg(STAMP_TTL.as_millis() as u64);
                    for (target, cause) in &group {
                        let random = rand::rng().random::<u64>();
                        let (tag, stamp) = match cause {
                            Invalidation::Write { txid, lsn } => {
                                (format!("t{txid}"), format!("t{txid}:{lsn:x}:{random:016x}"))
                            }
                            Invalidation::Eviction => (String::new(), format!("{random:016x}")),
                        };
                        let (entry, stamp_key, lease) = self.target_keys(target);
                        invocation
                            .key(entry)
                            .key(stamp_key)
                            .key(lease)
                            .arg(tag)
                            .arg(stamp);
                    }
                    let slot = self.slot_of(|| self.target_keys(&group[0].0).0);
                    self.invoke::<i64>(op, slot, &invocation).await?;
                    Ok(vec![(); group.len()])
                },
            )
            .await?;
        }
        Ok(())
    }

    /// A target's entry, stamp and lease keys.
    fn target_keys(&self, target: &Target) -> (String, String, String) {
        match target {
            Target::Item(id) => (
                self.keys.entry(*id),
                self.keys.stamp(*id),
                self.keys.lease(*id),
            ),
            Target::Name(name) => (
                self.keys.name_entry(name),
                self.keys.name_stamp(name),
                self.keys.name_lease(name),
            ),
        }
    }

    /// Runs `call` once per slot group of `items` (one group of all with one Redis; see
    /// `cluster`), the groups concurrently; `call` answers one value per item of its group,
    /// and the answers come back in `items`' order.
    async fn per_slot<'a, T, R, F, Fut>(
        &self,
        items: &'a [T],
        key_of: impl Fn(&T) -> String,
        call: F,
    ) -> Result<Vec<R>, CacheError>
    where
        F: Fn(Vec<&'a T>) -> Fut,
        Fut: Future<Output = Result<Vec<R>, CacheError>>,
    {
        let groups = cluster::slot_groups(&self.keys, items.len(), |i| key_of(&items[i]));
        if let [_] = groups.as_slice() {
            let answers = call(items.iter().collect()).await?;
            return if answers.len() == items.len() {
                Ok(answers)
            } else {
                Err(CacheError::UnexpectedReply("script"))
            };
        }
        let calls = groups
            .iter()
            .map(|group| call(group.iter().map(|&i| &items[i]).collect()));
        let answers = futures_util::future::join_all(calls).await;
        let mut ordered: Vec<Option<R>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        for (group, answer) in groups.iter().zip(answers) {
            let answer = answer?;
            if answer.len() != group.len() {
                return Err(CacheError::UnexpectedReply("script"));
            }
            for (&i, value) in group.iter().zip(answer) {
                ordered[i] = Some(value);
            }
        }
        ordered
            .into_iter()
            .map(|value| value.ok_or(CacheError::UnexpectedReply("script")))
            .collect()
    }

    /// After a truncate: a new flush token (so no reader that noted the old one fills),
    /// then every entry of the key space deleted, `SCAN` step by step. Entries are served
    /// until the scan reaches them: the scan's duration bounds that (see
    /// `docs/cache-design.md`).
    pub async fn flush_entries(&self) -> Result<usize, CacheError> {
        // Every copy of the token (one per slot with a cluster), a few hundred at a time.
        let flush_keys = self.keys.flush_keys();
        for chunk in flush_keys.chunks(FLUSH_CONCURRENCY) {
            let replaces = chunk.iter().map(|key| async move {
                let mut replace = self.flush_script.prepare_invoke();
                replace
                    .key(key)
                    .arg(format!("{:016x}", rand::rng().random::<u64>()));
                self.invoke::<i64>(CacheOp::Feed, self.slot_of(|| key.clone()), &replace)
                    .await
            });
            for replaced in futures_util::future::join_all(replaces).await {
                replaced?;
            }
        }
        if let Some(near) = &self.near {
            near.flush();
        }
        let mut deleted = 0;
        for pattern in self.keys.entry_patterns() {
            deleted += if self.keys.is_cluster() {
                self.unlink_matching_on_masters(&pattern).await?
            } else {
                self.unlink_matching(&pattern, None).await?
            };
        }
        Ok(deleted)
    }

    /// `SCAN MATCH pattern` and `UNLINK` what it finds, step by step; on one master of a
    /// cluster when `node` says which.
    async fn unlink_matching(
        &self,
        pattern: &str,
        node: Option<&RoutingInfo>,
    ) -> Result<usize, CacheError> {
        let mut cursor = 0u64;
        let mut deleted = 0;
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let reply = match node {
                Some(node) => self.run_on(CacheOp::Delete, &scan, node).await?,
                None => self.run(CacheOp::Delete, &scan).await?,
            };
            let (next, keys): (u64, Vec<String>) = match reply {
                Value::Array(mut reply) if reply.len() == 2 => {
                    let keys = reply.pop();
                    let next = reply.pop();
                    match (next, keys) {
                        (Some(next), Some(keys)) => (
                            ::redis::from_redis_value(next)
                                .map_err(|_| CacheError::UnexpectedReply("SCAN"))?,
                            ::redis::from_redis_value(keys)
                                .map_err(|_| CacheError::UnexpectedReply("SCAN"))?,
                        ),
                        _ => return Err(CacheError::UnexpectedReply("SCAN")),
                    }
                }
                _ => return Err(CacheError::UnexpectedReply("SCAN")),
            };
            if !keys.is_empty() {
                deleted += keys.len();
                // With a cluster, one node's keys span many slots: one `UNLINK` per slot.
                self.per_slot(&keys, Clone::clone, |group| async move {
                    let mut unlink = ::redis::cmd("UNLINK");
                    unlink.arg(&group);
                    let slot = self.slot_of(|| group[0].clone());
                    self.run_in(CacheOp::Feed, slot, &unlink).await?;
                    Ok(vec![(); group.len()])
                })
                .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The cluster's masters: `(first slot, node id)` of each shard, sorted; `None` while a
    /// shard has no healthy master (a failover in progress). Outside the circuit breaker.
    pub async fn cluster_masters(&self) -> Result<Option<Vec<(i64, String)>>, CacheError> {
        let shards = self
            .topology(&::redis::cmd("CLUSTER").arg("SHARDS").to_owned(), None)
            .await?;
        self.breakers.set_shards(cluster::shard_ranges(&shards));
        Ok(cluster::masters(&shards))
    }

    /// After a failover: every connection is renewed, so that none routes a moved slot to
    /// the old master (a frozen one would time every call out until then).
    pub fn follow_failover(&self) {
        self.conns.renew();
    }

    /// Settings of the cluster (`CONFIG GET`, asked of one master), as name → value.
    pub async fn cluster_config(
        &self,
        names: &[&str],
    ) -> Result<std::collections::HashMap<String, String>, CacheError> {
        let shards = self
            .topology(&::redis::cmd("CLUSTER").arg("SHARDS").to_owned(), None)
            .await?;
        let master = cluster::master_routes(&shards).into_iter().next();
        let mut get = ::redis::cmd("CONFIG");
        get.arg("GET").arg(names);
        let reply = self.topology(&get, master.as_ref()).await?;
        Ok(cluster::config_values(reply))
    }

    /// A topology command (on `node`, or where redis-rs routes it): timed and counted as
    /// `topology`, outside the circuit breaker like [`Cache::ping`].
    async fn topology(
        &self,
        cmd: &::redis::Cmd,
        node: Option<&RoutingInfo>,
    ) -> Result<Value, CacheError> {
        let started = Instant::now();
        let result = self
            .send(|conn| async move {
                match (conn, node) {
                    (Conn::Cluster(mut conn), Some(node)) => {
                        conn.route_command(cmd.clone(), node.clone()).await
                    }
                    (mut conn, _) => cmd.query_async::<Value>(&mut conn).await,
                }
            })
            .await;
        self.account(CacheOp::Topology, started, &result);
        result
    }

    /// [`Cache::unlink_matching`] on every master of the cluster (`SCAN` sees one node).
    async fn unlink_matching_on_masters(&self, pattern: &str) -> Result<usize, CacheError> {
        let shards = self
            .run(
                CacheOp::Feed,
                &::redis::cmd("CLUSTER").arg("SHARDS").to_owned(),
            )
            .await?;
        let mut deleted = 0;
        for master in cluster::master_routes(&shards) {
            deleted += self.unlink_matching(pattern, Some(&master)).await?;
        }
        Ok(deleted)
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

    /// With a cluster, the slot of a call whose keys all share `key`'s slot: the call then
    /// goes through that slot's shard's breaker. `None` with one Redis (`key` not built).
    fn slot_of(&self, key: impl FnOnce() -> String) -> Option<Slot> {
        self.keys.is_cluster().then(|| Slot::for_key(key()))
    }

    /// A command over keys in many slots (or with one Redis): through the whole breaker.
    async fn run(&self, op: CacheOp, cmd: &::redis::Cmd) -> Result<Value, CacheError> {
        self.run_in(op, None, cmd).await
    }

    /// A command whose keys are all in `slot` (see [`Cache::slot_of`]).
    async fn run_in(
        &self,
        op: CacheOp,
        slot: Option<Slot>,
        cmd: &::redis::Cmd,
    ) -> Result<Value, CacheError> {
        self.call(op, slot, |mut conn| async move {
            cmd.query_async::<Value>(&mut conn).await
        })
        .await
    }

    /// A command sent to one node of the cluster.
    async fn run_on(
        &self,
        op: CacheOp,
        cmd: &::redis::Cmd,
        node: &RoutingInfo,
    ) -> Result<Value, CacheError> {
        self.call(op, None, |conn| async move {
            match conn {
                Conn::Cluster(mut conn) => conn.route_command(cmd.clone(), node.clone()).await,
                Conn::Single(mut conn) => cmd.query_async::<Value>(&mut conn).await,
            }
        })
        .await
    }

    /// A script over keys in `slot` (with a cluster a script's keys share one slot).
    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        op: CacheOp,
        slot: Option<Slot>,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, CacheError> {
        self.call(op, slot, |mut conn| async move {
            invocation.invoke_async::<T>(&mut conn).await
        })
        .await
    }

    /// One Redis call: through the breaker (`slot`'s shard's with a cluster, else the
    /// whole one), timed and counted.
    async fn call<T, F, Fut>(
        &self,
        op: CacheOp,
        slot: Option<Slot>,
        send: F,
    ) -> Result<T, CacheError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let shard = self.breakers.of_slot(slot);
        let breaker = shard.as_deref().unwrap_or(self.breakers.whole());
        let permit = breaker.permit();
        if permit == Permit::Refused {
            metrics::record_cache_error(op);
            return Err(CacheError::CircuitOpen);
        }
        let started = Instant::now();
        let result = self.send(send).await;
        match &result {
            Ok(_) => breaker.succeeded(permit),
            Err(_) => breaker.failed(permit),
        }
        self.account(op, started, &result);
        result
    }

    /// Sends on a lent connection under the deadline. A connection that failed or hung is
    /// replaced, since a frozen peer would otherwise hang every command sent on it; except
    /// a cluster connection that timed out: it holds one connection per node, and a frozen
    /// master must not take the other shards' slots down with it (redis-rs replaces that
    /// node's own connection). A failover is followed by renewing every connection
    /// (`Cache::follow_failover`), since one that timed out may still route to the old
    /// master.
    async fn send<T, F, Fut>(&self, send: F) -> Result<T, CacheError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let Some((conn, lent)) = self.conns.lend() else {
            return Err(CacheError::NoConnection);
        };
        let cluster = matches!(conn, Conn::Cluster(_));
        let (timed_out, broken, error) = match tokio::time::timeout(self.timeout, send(conn)).await
        {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis call failed");
                let timed_out = e.is_timeout();
                let broken = !timed_out
                    && (e.is_io_error()
                        || e.is_connection_dropped()
                        || e.is_unrecoverable_error()
                        || e.is_cluster_error());
                (timed_out, broken, CacheError::Redis(Arc::new(e)))
            }
            Err(_) => (true, false, CacheError::Timeout(self.timeout)),
        };
        if broken || (timed_out && !cluster) {
            self.conns.discard(&lent);
        }
        Err(error)
    }

    fn account<T>(&self, op: CacheOp, started: Instant, result: &Result<T, CacheError>) {
        metrics::record_cache_op(op, started.elapsed());
        if result.is_err() {
            metrics::record_cache_error(op);
        }
    }
}

/// A bulk string's bytes; empty for anything else (nil: no such key).
fn bytes_of(value: Option<Value>) -> Bytes {
    match value {
        Some(Value::BulkString(raw)) => Bytes::from(raw),
        _ => Bytes::new(),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn entry_of(value: Value) -> Option<Entry> {
    match value {
        Value::BulkString(raw) => Entry::decode(Bytes::from(raw)),
        _ => None,
    }
}
