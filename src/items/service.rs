//! Cache-aside orchestration: the one place that decides HIT, MISS, STALE or BYPASS, and
//! that every write invalidates the cache after its commit.
//!
//! Read: Redis first; a fresh entry answers. Otherwise the reader notes the id's write
//! stamp, and one load per id per instance (singleflight) reads Postgres and fills only if
//! the stamp is unchanged (see `docs/cache-design.md`). A reader joins another's load only
//! if both noted the same stamp: a load that began before a write never answers a read
//! that began after it. Redis failing or slow: answer from Postgres,
//! `BYPASS`. Postgres failing: an entry past freshness beats a 503, `STALE`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::cache::invalidation::Pending;
use crate::cache::singleflight::Flights;
use crate::cache::{Cache, Cached, Entry, Fill, Stamp};
use crate::config::{CacheMode, Settings};
use crate::failpoints;
use crate::items::model::{Item, ItemId, ItemJson, ItemPatch, NewItem};
use crate::items::repo::{ItemRepo, RepoError, WriteOutcome};
use crate::metrics::{self, CacheStatus};

/// What the service could not do. `http/errors.rs` turns each into a status and a code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("item not found")]
    NotFound,
    #[error("the item is at another version")]
    VersionConflict,
    #[error("postgres is unavailable: {0}")]
    DatabaseUnavailable(String),
    #[error("too many postgres operations in flight")]
    Overloaded,
    #[error("database error: {0}")]
    Database(String),
}

impl From<RepoError> for ServiceError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Unavailable(cause) => ServiceError::DatabaseUnavailable(cause),
            RepoError::Overloaded => ServiceError::Overloaded,
            RepoError::Query(cause) => ServiceError::Database(cause),
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
}

/// A batch read's answer: found items in request order, and the ids that do not exist.
#[derive(Debug, Clone)]
pub struct Batch {
    pub items: Vec<ItemJson>,
    pub missing: Vec<ItemId>,
}

/// A keyset page of the listing: `next_after_id` is `None` on the last page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Page {
    pub items: Vec<Item>,
    pub next_after_id: Option<i64>,
}

/// How long a finished load stays joinable by readers that noted the same write stamp:
/// long enough to cover a reader that missed the cache just before the load filled it,
/// short next to the stamp's lifetime (a day). Loads without stamps, and failed loads,
/// never linger.
const LINGER: Duration = Duration::from_millis(500);

/// One id's answer from Postgres, shared by every coalesced reader.
type Loaded = Result<Option<ItemJson>, ServiceError>;

/// The write stamps a reader noted before loading; `None` when it will not fill.
type Noted = Option<HashMap<ItemId, Stamp>>;

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
    /// Loads in flight, tagged with the write stamp their leader noted (`None` for loads
    /// that do not fill: cache disabled or failing).
    flights: Flights<ItemId, Option<Stamp>, Loaded>,
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
                flights: Flights::new(LINGER, |noted, answer| noted.is_some() && answer.is_ok()),
                pending: Pending::default(),
            }),
        }
    }

    pub fn repo(&self) -> &ItemRepo {
        &self.inner.repo
    }

    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// Cache-aside read of one item. `value: None` is a "not found", cached like an item.
    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn get(&self, id: ItemId) -> Result<Lookup<Option<ItemJson>>, ServiceError> {
        let inner = &self.inner;
        // Cache off, or a write of this id not yet invalidated in Redis: do not trust it.
        if inner.mode == CacheMode::Disabled || inner.pending.contains(id) {
            return self
                .load_one(id, None, CacheStatus::Bypass, Duration::ZERO)
                .await;
        }
        let started = Instant::now();
        let cached = inner.cache.get(id).await;
        let cache_time = started.elapsed();
        match cached {
            // Redis down or past its deadline (counted in cache/): answer from Postgres.
            Err(_) => {
                self.load_one(id, None, CacheStatus::Bypass, cache_time)
                    .await
            }
            Ok(Some(entry)) if entry.is_fresh(now_ms()) => {
                metrics::record_lookups(CacheStatus::Hit, 1);
                Ok(Lookup {
                    value: item_of(entry),
                    status: CacheStatus::Hit,
                    timing: Timing {
                        cache: cache_time,
                        db: None,
                    },
                })
            }
            Ok(stale) => {
                self.load_one(id, stale, CacheStatus::Miss, cache_time)
                    .await
            }
        }
    }

    /// The write stamps of `ids`, noted before a load; `None` if Redis failed just now
    /// (the load then reads without filling).
    async fn note_stamps(&self, ids: &[ItemId]) -> Noted {
        let stamps = self.inner.cache.stamps(ids).await.ok()?;
        Some(ids.iter().copied().zip(stamps).collect())
    }

    /// Loads one id through the flights; falls back to `stale` if Postgres is down.
    async fn load_one(
        &self,
        id: ItemId,
        stale: Option<Entry>,
        status: CacheStatus,
        cache_time: Duration,
    ) -> Result<Lookup<Option<ItemJson>>, ServiceError> {
        let started = Instant::now();
        let noted = match status {
            CacheStatus::Miss => self.note_stamps(&[id]).await,
            _ => None,
        };
        let mut loaded = self.load(&[id], noted).await;
        let db = Some(started.elapsed());
        let result = loaded.remove(&id).unwrap_or(Err(ServiceError::NotFound));
        let (value, status) = match (result, stale) {
            (Ok(value), _) => (value, status),
            // Postgres is down or shedding: an entry within CACHE_STALE_SECS beats a 503.
            (Err(ServiceError::DatabaseUnavailable(_) | ServiceError::Overloaded), Some(entry)) => {
                (item_of(entry), CacheStatus::Stale)
            }
            (Err(e), _) => return Err(e),
        };
        metrics::record_lookups(status, 1);
        Ok(Lookup {
            value,
            status,
            timing: Timing {
                cache: cache_time,
                db,
            },
        })
    }

    /// Batch read: `ids` distinct, answered in their order. One `MGET` for all ids and at
    /// most one Postgres query for all that were not fresh in the cache.
    #[tracing::instrument(skip_all, fields(item.count = ids.len()))]
    pub async fn get_many(&self, ids: &[ItemId]) -> Result<Lookup<Batch>, ServiceError> {
        let inner = &self.inner;
        let started = Instant::now();
        // Cache off, or a write of one of these ids not yet invalidated in Redis: do not
        // trust it for any of them.
        let trusted = inner.mode == CacheMode::Enabled && !inner.pending.any_of(ids);
        let cached = if trusted {
            inner.cache.mget(ids).await.ok()
        } else {
            None
        };
        let cache_time = started.elapsed();
        let Some(cached) = cached else {
            // Cache disabled, or Redis failed: every id from Postgres.
            let started = Instant::now();
            let mut loaded = self.load(ids, None).await;
            let db = Some(started.elapsed());
            let mut answers = Vec::with_capacity(ids.len());
            for id in ids {
                answers.push(loaded.remove(id).unwrap_or(Ok(None))?);
            }
            metrics::record_lookups(CacheStatus::Bypass, ids.len());
            return Ok(Lookup {
                value: batch_of(ids, answers),
                status: CacheStatus::Bypass,
                timing: Timing {
                    cache: cache_time,
                    db,
                },
            });
        };

        let now = now_ms();
        let mut answers: Vec<Option<Option<ItemJson>>> = Vec::with_capacity(ids.len());
        let mut stale: HashMap<ItemId, Entry> = HashMap::new();
        let mut to_load = Vec::new();
        for (&id, entry) in ids.iter().zip(cached) {
            match entry {
                Some(entry) if entry.is_fresh(now) => answers.push(Some(item_of(entry))),
                other => {
                    answers.push(None);
                    to_load.push(id);
                    if let Some(entry) = other {
                        stale.insert(id, entry);
                    }
                }
            }
        }
        let hits = ids.len() - to_load.len();
        metrics::record_lookups(CacheStatus::Hit, hits);
        if to_load.is_empty() {
            return Ok(Lookup {
                value: batch_of(ids, answers.into_iter().flatten().collect()),
                status: CacheStatus::Hit,
                timing: Timing {
                    cache: cache_time,
                    db: None,
                },
            });
        }

        let started = Instant::now();
        let noted = self.note_stamps(&to_load).await;
        let mut loaded = self.load(&to_load, noted).await;
        let db = Some(started.elapsed());
        let (mut misses, mut stales) = (0, 0);
        for (&id, answer) in ids.iter().zip(answers.iter_mut()) {
            if answer.is_some() {
                continue;
            }
            *answer = Some(
                match (loaded.remove(&id).unwrap_or(Ok(None)), stale.remove(&id)) {
                    (Ok(value), _) => {
                        misses += 1;
                        value
                    }
                    (
                        Err(ServiceError::DatabaseUnavailable(_) | ServiceError::Overloaded),
                        Some(entry),
                    ) => {
                        stales += 1;
                        item_of(entry)
                    }
                    (Err(e), _) => return Err(e),
                },
            );
        }
        metrics::record_lookups(CacheStatus::Miss, misses);
        metrics::record_lookups(CacheStatus::Stale, stales);
        let status = if misses > 0 {
            CacheStatus::Miss
        } else {
            CacheStatus::Stale
        };
        Ok(Lookup {
            value: batch_of(ids, answers.into_iter().flatten().collect()),
            status,
            timing: Timing {
                cache: cache_time,
                db,
            },
        })
    }

    /// Loads `ids` from Postgres, coalesced with concurrent loads of the same ids.
    ///
    /// A reader joins another's load only if both noted the same write stamp: then no
    /// write came between the leader's note and ours, so the leader's read is at least as
    /// new as any write acknowledged before we started.
    async fn load(&self, ids: &[ItemId], noted: Noted) -> HashMap<ItemId, Loaded> {
        let noted = noted.as_ref();
        let landed = self
            .inner
            .flights
            .run(
                ids,
                |id| noted.and_then(|n| n.get(id)).cloned(),
                |keys| self.load_and_fill(keys, noted),
            )
            .await;
        if landed.coalesced > 0 {
            metrics::record_coalesced(landed.coalesced);
        }
        landed.values
    }

    /// The leader's work: read Postgres, then fill each id whose stamp is unchanged.
    /// Every id gets an answer.
    async fn load_and_fill(
        &self,
        ids: Vec<ItemId>,
        noted: Option<&HashMap<ItemId, Stamp>>,
    ) -> HashMap<ItemId, Loaded> {
        let inner = &self.inner;
        let rows = match ids.as_slice() {
            [id] => inner
                .repo
                .get_item(*id)
                .await
                .map(|row| row.into_iter().collect()),
            _ => inner.repo.get_items(&ids).await,
        };
        let rows: Vec<Item> = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let error = ServiceError::from(e);
                tracing::debug!(error = %error, "postgres read failed");
                return ids.into_iter().map(|id| (id, Err(error.clone()))).collect();
            }
        };
        let mut found: HashMap<ItemId, ItemJson> = rows
            .iter()
            .filter_map(|item| ItemId::new(item.id).map(|id| (id, ItemJson::from_item(item))))
            .collect();
        if let Some(noted) = noted {
            failpoints::pause(failpoints::BEFORE_FILL, || inner.cache.keys().entry(ids[0])).await;
            self.fill(&ids, noted, &found).await;
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
                    },
                    ttl: keep,
                }
            })
            .collect();
        // A failed fill only costs a later miss; it is counted in cache/.
        if let Err(e) = self.inner.cache.fill(&fills).await {
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
        let item = self.inner.repo.insert_item(new).await?;
        // A "not found" for this id may be cached (someone read it before it existed).
        if let Some(id) = ItemId::new(item.id) {
            self.invalidate(id).await;
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
        let item = written(outcome)?;
        self.invalidate(id).await;
        Ok(item)
    }

    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn delete(&self, id: ItemId, expected: Option<&[i64]>) -> Result<(), ServiceError> {
        let outcome = self.inner.repo.delete_item(id, expected).await?;
        written(outcome)?;
        self.invalidate(id).await;
        Ok(())
    }

    /// `DELETE /cache/items/{id}`: drops the entry, leaves Postgres alone.
    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn evict(&self, id: ItemId) {
        self.invalidate(id).await;
    }

    /// After a commit: new readers on this instance start a new load, and in Redis the
    /// id gets a new stamp and loses its entry, so the next read goes to Postgres and a
    /// reader that read before the commit cannot fill.
    async fn invalidate(&self, id: ItemId) {
        self.inner.flights.forget(&id);
        if let Err(e) = self.inner.cache.invalidate(id).await {
            tracing::debug!(item.id = %id, error = %e, "cache invalidation failed; queued for retry");
            self.inner.pending.add(id);
        }
    }

    /// Retries the invalidations that failed; called periodically by the application.
    pub async fn retry_invalidations(&self) -> usize {
        self.inner.pending.retry(&self.inner.cache).await
    }

    /// How many invalidations wait for Redis.
    pub fn pending_invalidations(&self) -> usize {
        self.inner.pending.len()
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

fn batch_of(ids: &[ItemId], answers: Vec<Option<ItemJson>>) -> Batch {
    let mut batch = Batch {
        items: Vec::with_capacity(ids.len()),
        missing: Vec::new(),
    };
    for (&id, answer) in ids.iter().zip(answers) {
        match answer {
            Some(item) => batch.items.push(item),
            None => batch.missing.push(id),
        }
    }
    batch
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
