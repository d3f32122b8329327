//! Lookups by exact name (`GET /items?name=`, contract §6), cached without ever answering
//! with an old membership after a write's acknowledgement.
//!
//! A name's first page (no `after_id`, the default `limit`) is cached as the list of its
//! ids, under a stamp of its own: every write that moves an item into or out of the name's
//! result (a create, a rename, a delete; through the API or, via the change feed, through
//! any Postgres client) replaces the name's stamp and deletes the list, exactly as item
//! writes do for items (`cache::redis::FILL_SCRIPT`). The items themselves come from their
//! own entries through [`ItemService::get_many`] (one `MGET`, misses in one query), so an
//! item's update shows through both lookups at once and costs the name nothing. Later
//! pages, and other limits, are read from Postgres (`BYPASS`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{ItemService, Lookup, ServiceError, Tag, now_ms};
use crate::cache::{NameEntry, Stamp, Target};
use crate::config::CacheMode;
use crate::failpoints;
use crate::items::model::{ItemId, ItemJson};
use crate::metrics::{self, CacheStatus};

/// The page size whose first page is cached: the listing's default `limit`.
pub const CACHED_NAME_PAGE: i64 = 50;

/// One name's ids from Postgres, shared by every coalesced reader.
pub(super) type LoadedIds = Result<Vec<ItemId>, ServiceError>;

/// A page of a name's items, in id order; `next_after_id` is `None` on the last page.
#[derive(Debug, Clone, Default)]
pub struct NamePage {
    pub items: Vec<ItemJson>,
    pub next_after_id: Option<i64>,
}

impl ItemService {
    /// The items named exactly `name` with ids above `after_id`, at most `limit`.
    #[tracing::instrument(skip_all)]
    pub async fn find_by_name(
        &self,
        name: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Lookup<NamePage>, ServiceError> {
        // Postgres text cannot hold NUL: no item has such a name.
        if name.contains('\0') {
            return Ok(Lookup::new(
                NamePage::default(),
                CacheStatus::Bypass,
                Duration::ZERO,
                None,
            ));
        }
        let cacheable = after_id == 0 && limit == CACHED_NAME_PAGE;
        if !cacheable || !self.trusts_name(name) {
            return self
                .name_page_from_postgres(name, after_id, limit, Duration::ZERO)
                .await;
        }
        let started = Instant::now();
        let cached = self.inner.cache.get_name(name).await;
        let cache_time = started.elapsed();
        let started = Instant::now();
        let (ids, status) = match cached {
            // Redis down or past its deadline: answer from Postgres.
            Err(_) => {
                return self
                    .name_page_from_postgres(name, after_id, limit, cache_time)
                    .await;
            }
            Ok((Some(entry), _)) if entry.is_fresh(now_ms()) => (entry.ids, CacheStatus::Hit),
            // The name's stamp came with the lookup: noted before the load.
            Ok((stale, noted)) => {
                match (self.load_name(name, noted).await, stale) {
                    (Ok(ids), _) => (ids, CacheStatus::Miss),
                    // Postgres down or shedding: the list within CACHE_STALE_SECS beats a 503.
                    (
                        Err(ServiceError::DatabaseUnavailable(_) | ServiceError::Overloaded),
                        Some(entry),
                    ) => (entry.ids, CacheStatus::Stale),
                    (Err(e), _) => return Err(e),
                }
            }
        };
        let db = (status != CacheStatus::Hit).then(|| started.elapsed());
        let page = CACHED_NAME_PAGE as usize;
        let next_after_id = (ids.len() > page).then(|| ids[page - 1].get());
        let shown = &ids[..ids.len().min(page)];
        if shown.is_empty() {
            return Ok(Lookup::new(NamePage::default(), status, cache_time, db));
        }
        let items = self.get_many(shown).await?;
        let timing = items.timing;
        let status = worst(status, items.status);
        // A guard, not the mechanism: an item renamed while this lookup ran (its list read
        // before the rename's invalidation, its entry after) is not shown under the old name.
        let items = items
            .value
            .items
            .into_iter()
            .filter(|item| is_named(item, name))
            .collect();
        Ok(Lookup::new(
            NamePage {
                items,
                next_after_id,
            },
            status,
            cache_time + timing.cache,
            Some(db.unwrap_or_default() + timing.db.unwrap_or_default()),
        ))
    }

    /// Whether the cache may answer for `name`: it is on, and no write that changed the
    /// name's result waits for its invalidation to reach Redis.
    fn trusts_name(&self, name: &str) -> bool {
        self.inner.mode == CacheMode::Enabled
            && !self.inner.pending.contains(&Target::Name(name.to_owned()))
    }

    /// A page straight from Postgres, nothing cached.
    async fn name_page_from_postgres(
        &self,
        name: &str,
        after_id: i64,
        limit: i64,
        cache_time: Duration,
    ) -> Result<Lookup<NamePage>, ServiceError> {
        let started = Instant::now();
        let mut rows = self
            .inner
            .repo
            .list_by_name(name, after_id, limit + 1)
            .await?;
        // One row more than asked tells whether another page exists.
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_after_id = if more {
            rows.last().map(|item| item.id)
        } else {
            None
        };
        let items = rows.iter().map(ItemJson::from_item).collect();
        Ok(Lookup::new(
            NamePage {
                items,
                next_after_id,
            },
            CacheStatus::Bypass,
            cache_time,
            Some(started.elapsed()),
        ))
    }

    /// The ids of `name`'s first page (and one more), coalesced with concurrent lookups
    /// that noted the same stamp, as loads of items are.
    async fn load_name(&self, name: &str, noted: Stamp) -> LoadedIds {
        let key = name.to_owned();
        let tag = Tag::Stamped(noted.clone());
        let mut landed = self
            .inner
            .name_flights
            .run(
                std::slice::from_ref(&key),
                |_| tag.clone(),
                |_| self.load_and_fill_name(name, &noted),
            )
            .await;
        if landed.coalesced > 0 {
            metrics::record_coalesced(landed.coalesced);
        }
        landed
            .values
            .remove(&key)
            .unwrap_or_else(|| Err(ServiceError::Unanswered(format!("name {name:?}"))))
    }

    /// The leader's work: read the ids, then store them if the name's stamp is unchanged.
    async fn load_and_fill_name(&self, name: &str, noted: &Stamp) -> HashMap<String, LoadedIds> {
        let loaded = self
            .inner
            .repo
            .ids_by_name(name, CACHED_NAME_PAGE + 1, Some(noted.lsn()))
            .await
            .map_err(ServiceError::from);
        if let Ok(ids) = &loaded {
            let ttls = &self.inner.ttls;
            // An empty list is a "not found": kept as briefly as one.
            let (fresh, keep) = if ids.is_empty() {
                (ttls.negative, ttls.negative)
            } else {
                let fresh = ttls.fresh();
                (fresh, fresh + ttls.stale)
            };
            let entry = NameEntry {
                ids: ids.clone(),
                fresh_until_ms: now_ms() + fresh.as_millis() as i64,
            };
            failpoints::pause(failpoints::BEFORE_FILL, || {
                self.inner.cache.keys().name_entry(name)
            })
            .await;
            // A failed fill only costs a later miss; it is counted in cache/.
            if let Err(e) = self.inner.cache.fill_name(name, noted, &entry, keep).await {
                tracing::debug!(error = %e, "name fill failed");
            }
        }
        HashMap::from([(name.to_owned(), loaded)])
    }
}

/// The status of a lookup made of two: the name's list and its items. As for a batch:
/// `BYPASS` if either did not use the cache, else `MISS`, else `STALE`, else `HIT`.
fn worst(a: CacheStatus, b: CacheStatus) -> CacheStatus {
    let rank = |s: CacheStatus| match s {
        CacheStatus::Hit => 0,
        CacheStatus::Stale => 1,
        CacheStatus::Miss => 2,
        CacheStatus::Bypass => 3,
    };
    if rank(a) >= rank(b) { a } else { b }
}

/// Whether an item's JSON has this exact name (only the name is parsed).
fn is_named(item: &ItemJson, name: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        name: Cow<'a, str>,
    }
    serde_json::from_slice::<Named<'_>>(&item.json).is_ok_and(|named| named.name == name)
}
