//! Cache-aside orchestration: the one place that decides HIT, MISS, STALE or BYPASS, and
//! that every write invalidates the cache after its commit.
//!
//! Read: Redis first; a fresh entry answers. Otherwise the reader notes the id's write
//! stamp, and one load per id per instance (singleflight) reads Postgres and fills only if
//! the stamp is unchanged (see `docs/cache-design.md`). A reader joins another's load only
//! if both noted the same stamp: a load that began before a write never answers a read
//! that began after it. Redis failing or slow: answer from Postgres,
//! `BYPASS`. Postgres failing: an entry past freshness beats a 503, `STALE`.

mod by_name;
mod fleet;

pub use crate::cache::refresh::Verdict as Refresh;
pub use by_name::{CACHED_NAME_PAGE, NamePage};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::cache::invalidation::Pending;
use crate::cache::refresh::{Policy, Verdict};
use crate::cache::singleflight::Flights;
use crate::cache::{
    Cache, CacheError, Cached, Entry, Fill, Invalidation, LeaseToken, Looked, Stamp, Target,
};
use crate::config::{CacheMode, Settings};
use crate::db::replicas;
use crate::failpoints;
use crate::items::model::{Item, ItemId, ItemJson, ItemPatch, NewItem};
use crate::items::repo::{Commit, ItemRepo, RepoError, WriteOutcome};
use crate::metrics::{self, CacheStatus, InvalidationSource};
use crate::verify::Verifier;

/// What the service could not do. `http/errors.rs` turns each into a status and a code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("item not found")]
    NotFound,
    #[error("the item is at another version")]
    VersionConflict,
    #[error("postgres is unavailable")]
    DatabaseUnavailable(#[source] RepoError),
    #[error("too many postgres operations in flight")]
    Overloaded,
    #[error("database error")]
    Database(#[source] RepoError),
    /// A load gave no answer for a key it was given (an item, a name): a bug.
    #[error("no answer was loaded for {0}")]
    Unanswered(String),
}

impl From<RepoError> for ServiceError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Unavailable(_) => ServiceError::DatabaseUnavailable(e),
            RepoError::Overloaded => ServiceError::Overloaded,
            RepoError::Query(_) => ServiceError::Database(e),
        }
    }
}

/// Where the time of a read went: `Server-Timing`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub cache: Duration,
    pub db: Option<Duration>,
}

/// A read's answer and where it came from.
#[derive(Debug, Clone)]
pub struct Lookup<T> {
    pub value: T,
    pub status: CacheStatus,
    pub timing: Timing,
    /// For a hit: how the entry stood (`Cache-Status`); default otherwise.
    pub freshness: Freshness,
}

/// A hit's entry: how long it stays fresh (negative: past freshness, served while it is
/// revalidated), and whether this hit started a background refresh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freshness {
    pub ttl_ms: Option<i64>,
    pub refresh: Option<Verdict>,
    /// Served from the near cache (`cache::near`), not from Redis.
    pub near: bool,
}

impl<T> Lookup<T> {
    fn new(value: T, status: CacheStatus, cache: Duration, db: Option<Duration>) -> Lookup<T> {
        Lookup {
            value,
            status,
            timing: Timing { cache, db },
            freshness: Freshness::default(),
        }
    }
}

/// A batch read's answer: found items in request order, and the ids that do not exist.
#[derive(Debug, Clone)]
pub struct Batch {
    pub items: Vec<ItemJson>,
    pub missing: Vec<ItemId>,
}

/// A keyset page of the listing: `next_after_id` is `None` on the last page.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(
    description = "A page, by id: pass `next_after_id` as `after_id` for the next page; \
        `null` on the last.",
    example = json!({"items": [], "next_after_id": null})
)]
pub struct Page {
    pub items: Vec<Item>,
    #[schema(required = true, minimum = 1)]
    pub next_after_id: Option<i64>,
}

/// How long a finished load stays joinable by readers that noted the same write stamp:
/// long enough to cover a reader that missed the cache just before the load filled it,
/// short next to the stamp's lifetime (a minute). Loads without stamps, and failed loads,
/// never linger.
const LINGER: Duration = Duration::from_millis(500);

/// One id's answer from Postgres, shared by every coalesced reader.
type Loaded = Result<Option<ItemJson>, ServiceError>;

/// The write stamps a reader noted before loading; `None` when it will not fill.
type Noted = Option<HashMap<ItemId, Stamp>>;

/// What a load in flight is tagged with; a reader joins only a load with its own tag.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tag {
    /// The write stamp the load's leader noted: a reader that noted the same stamp knows
    /// that no write came between the leader's note and its own.
    Stamped(Stamp),
    /// A load that will not fill (cache off, Redis failing), numbered so that no other
    /// reader joins it: without a stamp a reader cannot tell whether the load began
    /// before a write that another instance acknowledged before this reader started.
    Unstamped(u64),
}

/// What makes a load needless (`fleet`): an entry in the cache fresh until after this
/// (Unix ms). For a miss, now: any fresh entry answers it. For a background refresh, the
/// freshness of the entry its hit saw: only a renewed entry answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outdated(i64);

/// Cache TTLs, from the settings.
#[derive(Debug, Clone)]
struct Ttls {
    fresh: Duration,
    jitter: f64,
    negative: Duration,
    stale: Duration,
}

impl Ttls {
    /// Fresh TTL drawn from `fresh × (1 ± jitter)`, so entries filled together (after a
    /// deploy, a flush) do not all expire in the same second and stampede Postgres.
    fn fresh(&self) -> Duration {
        if self.jitter == 0.0 {
            return self.fresh;
        }
        let factor = rand::rng().random_range(1.0 - self.jitter..=1.0 + self.jitter);
        self.fresh.mul_f64(factor).max(Duration::from_millis(1))
    }
}

#[derive(Clone)]
pub struct ItemService {
    inner: Arc<Inner>,
}

struct Inner {
    repo: ItemRepo,
    cache: Cache,
    mode: CacheMode,
    ttls: Ttls,
    /// Loads in flight, tagged (see [`Tag`]).
    flights: Flights<ItemId, Tag, Loaded>,
    /// Loads of names' first pages in flight (`by_name`), tagged the same way.
    name_flights: Flights<String, Tag, by_name::LoadedIds>,
    /// Numbers unstamped loads.
    unstamped: AtomicU64,
    /// When hits refresh their entries in the background (`cache::refresh`).
    refresh: Policy,
    /// Ids being refreshed in the background: one refresh per id at a time.
    refreshing: Mutex<HashSet<ItemId>>,
    /// Re-checks a sample of hits against Postgres (`verify`).
    verifier: Verifier,
    /// Ids whose invalidation has not reached Redis yet: their cache entries are not
    /// trusted on this instance.
    pending: Pending,
}

impl ItemService {
    pub fn new(repo: ItemRepo, cache: Cache, settings: &Settings) -> ItemService {
        ItemService {
            inner: Arc::new(Inner {
                repo,
                cache,
                mode: settings.cache_mode,
                ttls: Ttls {
                    fresh: settings.cache_ttl,
                    jitter: settings.cache_ttl_jitter,
                    negative: settings.cache_negative_ttl,
                    stale: settings.cache_stale,
                },
                flights: Flights::new(LINGER, |tag, answer| {
                    matches!(tag, Tag::Stamped(_)) && answer.is_ok()
                }),
                name_flights: Flights::new(LINGER, |tag, answer| {
                    matches!(tag, Tag::Stamped(_)) && answer.is_ok()
                }),
                unstamped: AtomicU64::new(0),
                refresh: Policy {
                    stale_while_revalidate: settings.cache_swr,
                },
                refreshing: Mutex::new(HashSet::new()),
                verifier: Verifier::new(settings.cache_verify_sample),
                pending: Pending::default(),
            }),
        }
    }

    /// Refreshes `id`'s entry off the request path, once at a time per id: notes its stamp,
    /// then loads it through the flights (a miss of the same id joins it) and fills it if
    /// no write came in between, like any miss.
    /// `seen_until`: the freshness of the entry the hit saw. A refresh that finds the entry
    /// renewed already (another refresh, here or on another instance) loads nothing: its
    /// lease is refused and its wait answers from the renewed entry (`fleet`).
    fn refresh_in_background(&self, id: ItemId, seen_until: i64) {
        let first = self
            .inner
            .refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if !first {
            return;
        }
        let service = self.clone();
        tokio::spawn(async move {
            // Not the answer of a load that finished a moment ago (a lingering flight): the
            // point is a newer one.
            service.inner.flights.forget(&id);
            let (noted, _) = service.note_if(true, &[id]).await;
            if noted.is_some() {
                service.load(&[id], noted, Outdated(seen_until)).await;
            }
            service
                .inner
                .refreshing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// Whether the cache may answer for `ids`: it is on, and no write of any of them is
    /// still waiting for its invalidation to reach Redis.
    fn trusts_cache(&self, ids: &[ItemId]) -> bool {
        self.inner.mode == CacheMode::Enabled && !self.inner.pending.any_of(ids)
    }

    /// Cache-aside read of one item. `value: None` is a "not found", cached like an item.
    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn get(&self, id: ItemId) -> Result<Lookup<Option<ItemJson>>, ServiceError> {
        if !self.trusts_cache(&[id]) {
            return self.load_one(id, None, Duration::ZERO).await;
        }
        let started = Instant::now();
        let cached = self.inner.cache.lookup(id).await;
        let cache_time = started.elapsed();
        // The stamp Redis gave with the entry; none from the near cache.
        let (entry, stamp) = match cached {
            // Redis down or past its deadline (counted in cache/): answer from Postgres.
            Err(_) => return self.load_one(id, None, cache_time).await,
            Ok(Looked::Redis { entry: None, stamp }) => {
                return self
                    .load_one(id, Some((None, Some(stamp))), cache_time)
                    .await;
            }
            Ok(Looked::Redis {
                entry: Some(entry),
                stamp,
            }) => (entry, Some(stamp)),
            Ok(Looked::Near(entry)) => (entry, None),
        };
        let now = now_ms();
        let verdict = self.inner.refresh.judge(&entry, now);
        if verdict == Verdict::Expired {
            return self
                .load_one(id, Some((Some(entry), stamp)), cache_time)
                .await;
        }
        // Fresh, or close to expiry or just past it: a hit; the last two refresh the entry
        // in the background (cache::refresh).
        if verdict != Verdict::Fresh {
            self.refresh_in_background(id, entry.fresh_until_ms);
        }
        metrics::record_lookups(CacheStatus::Hit, 1);
        let served = match &entry.value {
            Cached::Item(item) => Some(item.version),
            Cached::NotFound => None,
        };
        self.inner.verifier.after_hit(self, id, served);
        let freshness = Freshness {
            ttl_ms: Some(entry.fresh_until_ms - now),
            refresh: (verdict != Verdict::Fresh).then_some(verdict),
            near: stamp.is_none(), // only the near cache answers without a stamp
        };
        let mut lookup = Lookup::new(item_of(entry), CacheStatus::Hit, cache_time, None);
        lookup.freshness = freshness;
        Ok(lookup)
    }

    /// Loads one id through the flights. `looked`: what the cache had for it, and the write
    /// stamp Redis gave with it (`None`: the cache was not read, so the load does not fill;
    /// no stamp: the entry came from the near cache, and the stamp is noted now).
    async fn load_one(
        &self,
        id: ItemId,
        looked: Option<(Option<Entry>, Option<Stamp>)>,
        cache_time: Duration,
    ) -> Result<Lookup<Option<ItemJson>>, ServiceError> {
        let started = Instant::now();
        let cache_read = looked.is_some();
        let (stale, stamp) = looked.unwrap_or_default();
        let (noted, status) = match stamp {
            Some(stamp) => (Some(HashMap::from([(id, stamp)])), CacheStatus::Miss),
            None => self.note_if(cache_read, &[id]).await,
        };
        let mut loaded = self.load(&[id], noted, Outdated(now_ms())).await;
        let db = Some(started.elapsed());
        let (value, status) = settle(answer(&mut loaded, id), stale, status)?;
        metrics::record_lookups(status, 1);
        Ok(Lookup::new(value, status, cache_time, db))
    }

    /// Notes the write stamps of `ids` before a load, if the cache was read: the load then
    /// fills, and its answer is a `MISS`. Otherwise, or if Redis failed just now, the load
    /// reads without filling: `BYPASS`.
    async fn note_if(&self, cache_read: bool, ids: &[ItemId]) -> (Noted, CacheStatus) {
        if !cache_read {
            return (None, CacheStatus::Bypass);
        }
        match self.inner.cache.stamps(ids).await {
            Ok(stamps) => (
                Some(ids.iter().copied().zip(stamps).collect()),
                CacheStatus::Miss,
            ),
            Err(_) => (None, CacheStatus::Bypass),
        }
    }

    /// Batch read: `ids` distinct, answered in their order. One `MGET` for all ids and at
    /// most one Postgres query for all that were not fresh in the cache.
    #[tracing::instrument(skip_all, fields(item.count = ids.len()))]
    pub async fn get_many(&self, ids: &[ItemId]) -> Result<Lookup<Batch>, ServiceError> {
        let started = Instant::now();
        let cached = if self.trusts_cache(ids) {
            self.inner.cache.mget(ids).await.ok()
        } else {
            None
        };
        let cache_time = started.elapsed();

        // Fresh entries answer; every other id is loaded, with its stale entry if any.
        let mut answers: HashMap<ItemId, Option<ItemJson>> = HashMap::with_capacity(ids.len());
        let mut stale: HashMap<ItemId, Entry> = HashMap::new();
        let mut to_load = Vec::new();
        let now = now_ms();
        let cache_read = cached.is_some();
        let mut entries = cached.map(Vec::into_iter);
        for &id in ids {
            let entry = entries.as_mut().and_then(Iterator::next).flatten();
            let verdict = entry
                .as_ref()
                .map(|entry| self.inner.refresh.judge(entry, now));
            match (entry, verdict) {
                (Some(entry), Some(verdict)) if verdict != Verdict::Expired => {
                    if verdict != Verdict::Fresh {
                        self.refresh_in_background(id, entry.fresh_until_ms);
                    }
                    answers.insert(id, item_of(entry));
                }
                (other, _) => {
                    to_load.push(id);
                    if let Some(entry) = other {
                        stale.insert(id, entry);
                    }
                }
            }
        }
        let mut statuses = Statuses::default();
        statuses.add(CacheStatus::Hit, answers.len());

        let mut db = None;
        if !to_load.is_empty() {
            let started = Instant::now();
            let (noted, status) = self.note_if(cache_read, &to_load).await;
            let mut loaded = self.load(&to_load, noted, Outdated(now)).await;
            db = Some(started.elapsed());
            for id in to_load {
                let (value, status) = settle(answer(&mut loaded, id), stale.remove(&id), status)?;
                statuses.add(status, 1);
                answers.insert(id, value);
            }
        }
        statuses.record();
        let batch = batch_of(ids, answers);
        Ok(Lookup::new(batch, statuses.batch(), cache_time, db))
    }

    /// Loads `ids` from Postgres, coalesced with concurrent loads of the same ids.
    ///
    /// A reader joins another's load only if both noted the same write stamp: then no
    /// write came between the leader's note and ours, so the leader's read is at least as
    /// new as any write acknowledged before we started.
    async fn load(
        &self,
        ids: &[ItemId],
        noted: Noted,
        outdated: Outdated,
    ) -> HashMap<ItemId, Loaded> {
        let noted = noted.as_ref();
        let unstamped = self.inner.unstamped.fetch_add(1, Ordering::Relaxed);
        let tag = |id: &ItemId| match noted.and_then(|n| n.get(id)) {
            Some(stamp) => Tag::Stamped(stamp.clone()),
            None => Tag::Unstamped(unstamped),
        };
        let landed = self
            .inner
            .flights
            .run(ids, tag, |keys| self.load_and_fill(keys, noted, outdated))
            .await;
        if landed.coalesced > 0 {
            metrics::record_coalesced(landed.coalesced);
        }
        landed.values
    }

    /// The leader's work: read Postgres, then fill each id whose stamp is unchanged. With
    /// stamps noted, under the fleet's leases (`fleet`): another instance's load of an id
    /// may answer instead. Every id gets an answer.
    async fn load_and_fill(
        &self,
        ids: Vec<ItemId>,
        noted: Option<&HashMap<ItemId, Stamp>>,
        outdated: Outdated,
    ) -> HashMap<ItemId, Loaded> {
        match noted {
            Some(noted) => self.load_under_leases(ids, noted, outdated).await,
            None => self.read_and_fill(ids, None, None).await,
        }
    }

    /// Reads `ids` from Postgres, then (with stamps noted) fills each id whose stamp is
    /// unchanged, releasing `lease` on them. Every id gets an answer.
    async fn read_and_fill(
        &self,
        ids: Vec<ItemId>,
        noted: Option<&HashMap<ItemId, Stamp>>,
        lease: Option<&LeaseToken>,
    ) -> HashMap<ItemId, Loaded> {
        let inner = &self.inner;
        // With the stamps noted, a replica that has replayed the newest of them may answer.
        let at_least = noted.map(|n| {
            ids.iter()
                .filter_map(|id| n.get(id))
                .map(Stamp::lsn)
                .max()
                .unwrap_or(0)
        });
        let started = Instant::now();
        let rows = match ids.as_slice() {
            [id] => inner
                .repo
                .get_item(*id, at_least)
                .await
                .map(|row| row.into_iter().collect()),
            _ => inner.repo.get_items(&ids, at_least).await,
        };
        // How long the load took: early refresh (cache::refresh) starts that much sooner.
        // Rounded up: a sub-millisecond read kept as 0 would switch early refresh off.
        let load_ms =
            u32::try_from(started.elapsed().as_micros().div_ceil(1000)).unwrap_or(u32::MAX);
        let rows: Vec<Item> = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let error = ServiceError::from(e);
                tracing::debug!(error = %error, "postgres read failed");
                if let Some(lease) = lease {
                    // Readers on other instances need not wait for a fill that will not come.
                    let _ = inner.cache.release_leases(&ids, lease).await;
                }
                return ids.into_iter().map(|id| (id, Err(error.clone()))).collect();
            }
        };
        let mut found: HashMap<ItemId, ItemJson> = rows
            .iter()
            .filter_map(|item| ItemId::new(item.id).map(|id| (id, ItemJson::from_item(item))))
            .collect();
        if let Some(noted) = noted {
            failpoints::pause(failpoints::BEFORE_FILL, || inner.cache.keys().entry(ids[0])).await;
            self.fill(&ids, noted, &found, load_ms, lease).await;
        }
        ids.into_iter()
            .map(|id| (id, Ok(found.remove(&id))))
            .collect()
    }

    async fn fill(
        &self,
        ids: &[ItemId],
        noted: &HashMap<ItemId, Stamp>,
        found: &HashMap<ItemId, ItemJson>,
        load_ms: u32,
        lease: Option<&LeaseToken>,
    ) {
        let ttls = &self.inner.ttls;
        let now = now_ms();
        let fills: Vec<Fill> = ids
            .iter()
            .filter_map(|id| Some((*id, noted.get(id)?.clone())))
            .map(|(id, noted)| {
                let (value, fresh, keep) = match found.get(&id) {
                    Some(item) => {
                        let fresh = ttls.fresh();
                        (Cached::Item(item.clone()), fresh, fresh + ttls.stale)
                    }
                    None => (Cached::NotFound, ttls.negative, ttls.negative),
                };
                Fill {
                    id,
                    noted,
                    entry: Entry {
                        value,
                        fresh_until_ms: now + fresh.as_millis() as i64,
                        load_ms,
                    },
                    ttl: keep,
                }
            })
            .collect();
        // A failed fill only costs a later miss; it is counted in cache/.
        if let Err(e) = self.inner.cache.fill(&fills, lease).await {
            tracing::debug!(error = %e, "cache fill failed");
        }
    }

    /// Keyset listing straight from Postgres (listings are not cached). One row more than
    /// asked tells whether another page exists, so the last page says so.
    #[tracing::instrument(skip_all)]
    pub async fn list(&self, after_id: i64, limit: i64) -> Result<Page, ServiceError> {
        let mut items = self.inner.repo.list_items(after_id, limit + 1).await?;
        let more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        let next_after_id = if more {
            items.last().map(|item| item.id)
        } else {
            None
        };
        Ok(Page {
            items,
            next_after_id,
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn create(&self, new: &NewItem) -> Result<Item, ServiceError> {
        let (item, commit) = self.inner.repo.insert_item(new).await?;
        let committed = Instant::now();
        // A "not found" for this id may be cached (someone read it before it existed), and
        // the name's lookup gains it.
        if let Some(id) = ItemId::new(item.id) {
            let targets = vec![Target::Item(id), Target::Name(item.name.clone())];
            self.invalidate(targets, written_by(commit), committed)
                .await;
        }
        Ok(item)
    }

    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn update(
        &self,
        id: ItemId,
        patch: &ItemPatch,
        expected: Option<&[i64]>,
    ) -> Result<Item, ServiceError> {
        let outcome = self.inner.repo.update_item(id, patch, expected).await?;
        let committed = Instant::now();
        let updated = written(outcome)?;
        let mut targets = vec![Target::Item(id)];
        // A rename moves the item from one name's lookup to another's.
        if let Some(old) = updated.old_name {
            targets.push(Target::Name(old));
            targets.push(Target::Name(updated.item.name.clone()));
        }
        self.invalidate(targets, written_by(updated.commit), committed)
            .await;
        Ok(updated.item)
    }

    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn delete(&self, id: ItemId, expected: Option<&[i64]>) -> Result<(), ServiceError> {
        let outcome = self.inner.repo.delete_item(id, expected).await?;
        let committed = Instant::now();
        let deleted = written(outcome)?;
        let targets = vec![Target::Item(id), Target::Name(deleted.name)];
        self.invalidate(targets, written_by(deleted.commit), committed)
            .await;
        Ok(())
    }

    /// `DELETE /cache/items/{id}`: drops the entry, leaves Postgres alone.
    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn evict(&self, id: ItemId) {
        self.invalidate(
            vec![Target::Item(id)],
            Invalidation::Eviction,
            Instant::now(),
        )
        .await;
    }

    /// After a commit: new readers on this instance start new loads, and in Redis each
    /// target gets a new stamp and loses its entry (one script call), so the next read goes
    /// to Postgres and a reader that read before the commit cannot fill.
    /// `committed`: when the write committed, for the lag metric (writes only).
    async fn invalidate(&self, targets: Vec<Target>, cause: Invalidation, committed: Instant) {
        self.forget_loads(&targets);
        let pairs: Vec<(Target, Invalidation)> =
            targets.iter().map(|t| (t.clone(), cause)).collect();
        match self
            .inner
            .cache
            .invalidate_many(metrics::CacheOp::Delete, &pairs)
            .await
        {
            Ok(()) => {
                if let Invalidation::Write { .. } = cause {
                    metrics::record_invalidation_lag(InvalidationSource::Api, committed.elapsed());
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cache invalidation failed; queued for retry");
                for target in targets {
                    self.inner.pending.add(target, cause, committed);
                }
            }
        }
    }

    /// After a write of `targets`: a load in flight began before it, so it must not
    /// answer later readers.
    fn forget_loads(&self, targets: &[Target]) {
        for target in targets {
            match target {
                Target::Item(id) => self.inner.flights.forget(id),
                Target::Name(name) => self.inner.name_flights.forget(name),
            }
        }
    }

    /// Applies changes seen in the change feed (`feed`): the same invalidation as the
    /// API's writes, for `changed`, and for a truncate every entry of the key space. An error
    /// leaves the changes to be applied again (the feed keeps them until this succeeds).
    pub async fn apply_changes(
        &self,
        changed: &[(Target, Invalidation)],
        truncated: bool,
    ) -> Result<(), CacheError> {
        if truncated {
            self.inner.flights.forget_all();
            self.inner.name_flights.forget_all();
            self.inner.cache.flush_entries().await?;
        }
        let targets: Vec<Target> = changed.iter().map(|(t, _)| t.clone()).collect();
        self.forget_loads(&targets);
        self.inner
            .cache
            .invalidate_many(metrics::CacheOp::Feed, changed)
            .await
    }

    /// Retries the invalidations that failed; called periodically by the application.
    pub async fn retry_invalidations(&self) -> usize {
        let cache = &self.inner.cache;
        self.inner
            .pending
            .retry(|target, cause| async move {
                cache
                    .invalidate_many(metrics::CacheOp::Delete, &[(target, cause)])
                    .await
            })
            .await
    }

    /// How many invalidations wait for Redis.
    pub fn pending_invalidations(&self) -> usize {
        self.inner.pending.len()
    }

    /// The row's version on the primary and how long ago it was written (`verify`);
    /// `None` if the row is gone.
    pub(crate) async fn version_in_postgres(
        &self,
        id: ItemId,
    ) -> Result<Option<(i64, Duration)>, RepoError> {
        self.inner.repo.version_and_age(id).await
    }

    /// What the cache holds for `id` (`verify`): `None` no entry, `Some(None)` a cached
    /// "not found", `Some(Some(v))` version `v`.
    pub(crate) async fn cached_version(
        &self,
        id: ItemId,
    ) -> Result<Option<Option<i64>>, CacheError> {
        Ok(self
            .inner
            .cache
            .get(id)
            .await?
            .0
            .map(|entry| match entry.value {
                Cached::Item(item) => Some(item.version),
                Cached::NotFound => None,
            }))
    }

    /// `SELECT 1` on a pooled connection, for `/readyz`.
    pub async fn ping_postgres(&self) -> Result<(), RepoError> {
        self.inner.repo.ping().await
    }

    /// `PING` to Redis, for `/readyz`; outside the read metrics and the circuit breaker.
    pub async fn ping_redis(&self) -> Result<(), CacheError> {
        self.inner.cache.ping().await
    }

    /// How the connection pools are used, for the pool gauges.
    pub fn pool_usage(&self) -> PoolUsage {
        let status = self.inner.repo.pool().status();
        let (idle, in_use) = self.inner.cache.connections().usage();
        PoolUsage {
            postgres: Usage {
                idle: status.available,
                in_use: status.size.saturating_sub(status.available),
                waiting: status.waiting,
            },
            redis: Usage {
                idle,
                in_use,
                waiting: 0,
            },
        }
    }

    /// Tracks the replicas' replay positions until the stop (`db::replicas`).
    pub fn track_replicas(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let repo = &self.inner.repo;
        repo.replicas().clone().track(repo.pool().clone(), stop)
    }

    /// How the replicas stand, for `/readyz`.
    pub fn replica_health(&self) -> replicas::Health {
        self.inner.repo.replicas().health()
    }

    /// Closes the Postgres pool, at shutdown.
    pub fn close(&self) {
        self.inner.repo.pool().close();
    }
}

/// Connections of one pool: idle, lent out, and requests waiting for one.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub idle: usize,
    pub in_use: usize,
    pub waiting: usize,
}

/// Both pools' [`Usage`].
#[derive(Debug, Clone, Copy)]
pub struct PoolUsage {
    pub postgres: Usage,
    pub redis: Usage,
}

/// The invalidation of a write that committed as `commit`.
fn written_by(commit: Commit) -> Invalidation {
    Invalidation::Write {
        txid: commit.txid,
        lsn: commit.lsn,
    }
}

fn written<T>(outcome: WriteOutcome<T>) -> Result<T, ServiceError> {
    match outcome {
        WriteOutcome::Done(value) => Ok(value),
        WriteOutcome::NotFound => Err(ServiceError::NotFound),
        WriteOutcome::VersionConflict => Err(ServiceError::VersionConflict),
    }
}

fn item_of(entry: Entry) -> Option<ItemJson> {
    match entry.value {
        Cached::Item(item) => Some(item),
        Cached::NotFound => None,
    }
}

/// One id's answer out of a load's answers. Every load answers every id it was given
/// (`load_and_fill` does, and the flights hand each key's answer on), so a missing one is
/// a bug, answered as such rather than as a plausible "not found".
fn answer(loaded: &mut HashMap<ItemId, Loaded>, id: ItemId) -> Loaded {
    loaded
        .remove(&id)
        .unwrap_or_else(|| Err(ServiceError::Unanswered(format!("item {id}"))))
}

/// A loaded answer against the entry the cache still had for the id: with Postgres down or
/// shedding, an entry within `CACHE_STALE_SECS` beats a 503 (`STALE`).
fn settle(
    loaded: Loaded,
    stale: Option<Entry>,
    status: CacheStatus,
) -> Result<(Option<ItemJson>, CacheStatus), ServiceError> {
    match (loaded, stale) {
        (Ok(value), _) => Ok((value, status)),
        (Err(ServiceError::DatabaseUnavailable(_) | ServiceError::Overloaded), Some(entry)) => {
            Ok((item_of(entry), CacheStatus::Stale))
        }
        (Err(e), _) => Err(e),
    }
}

/// How many ids of a batch were answered each way.
#[derive(Default)]
struct Statuses {
    hit: usize,
    miss: usize,
    stale: usize,
    bypass: usize,
}

impl Statuses {
    fn add(&mut self, status: CacheStatus, n: usize) {
        match status {
            CacheStatus::Hit => self.hit += n,
            CacheStatus::Miss => self.miss += n,
            CacheStatus::Stale => self.stale += n,
            CacheStatus::Bypass => self.bypass += n,
        }
    }

    /// One lookup counted per id.
    fn record(&self) {
        metrics::record_lookups(CacheStatus::Hit, self.hit);
        metrics::record_lookups(CacheStatus::Miss, self.miss);
        metrics::record_lookups(CacheStatus::Stale, self.stale);
        metrics::record_lookups(CacheStatus::Bypass, self.bypass);
    }

    /// The batch's `X-Cache`: `BYPASS` if the cache was not used for some id (not read,
    /// or its load could not fill), else `MISS` if any id was read from Postgres, else
    /// `STALE` if any entry was served stale, else `HIT`.
    fn batch(&self) -> CacheStatus {
        if self.bypass > 0 {
            CacheStatus::Bypass
        } else if self.miss > 0 {
            CacheStatus::Miss
        } else if self.stale > 0 {
            CacheStatus::Stale
        } else {
            CacheStatus::Hit
        }
    }
}

/// The found items in request order, and the ids that do not exist.
fn batch_of(ids: &[ItemId], mut answers: HashMap<ItemId, Option<ItemJson>>) -> Batch {
    let mut batch = Batch {
        items: Vec::with_capacity(ids.len()),
        missing: Vec::new(),
    };
    for &id in ids {
        match answers.remove(&id).flatten() {
            Some(item) => batch.items.push(item),
            None => batch.missing.push(id),
        }
    }
    batch
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
