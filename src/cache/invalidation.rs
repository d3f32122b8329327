//! Failed invalidations, retried until Redis takes them (contract behaviour 5).
//!
//! A write whose invalidation fails is still acknowledged (Postgres is the truth), and its
//! id goes here. Until the invalidation lands, reads of that id on this instance do not
//! trust the cache (they read Postgres and do not fill), and a background task retries
//! every [`RETRY_EVERY`]. What this cannot cover (another instance reading the old entry
//! while this one cannot reach Redis; pending ids lost if this process dies) is bounded
//! by the entry's TTL; `docs/cache-design.md` says more.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::cache::Cache;
use crate::items::model::ItemId;

/// How often pending invalidations are retried: often enough that a recovered Redis is
/// cleaned within a fraction of a second, rarely enough to cost nothing while it is down
/// (the circuit breaker refuses the calls without a network round trip).
pub const RETRY_EVERY: Duration = Duration::from_millis(200);

#[derive(Default)]
pub struct Pending {
    ids: Mutex<HashSet<ItemId>>,
    /// How many ids are pending: reads check this one atomic, and the set only when it
    /// is not zero (it is zero but during Redis outages).
    count: AtomicUsize,
}

impl Pending {
    pub fn add(&self, id: ItemId) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.insert(id) {
            self.count.store(ids.len(), Ordering::Release);
        }
    }

    /// Whether a write of `id` has not reached Redis yet.
    pub fn contains(&self, id: ItemId) -> bool {
        self.count.load(Ordering::Acquire) != 0
            && self
                .ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
    }

    pub fn any_of(&self, ids: &[ItemId]) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let pending = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().any(|id| pending.contains(id))
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One pass: retries every pending invalidation until one fails (Redis is still not
    /// answering; the next pass tries again). Returns how many landed.
    pub async fn retry(&self, cache: &Cache) -> usize {
        if self.is_empty() {
            return 0;
        }
        let ids: Vec<ItemId> = self
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let mut landed = 0;
        for id in ids {
            if cache.invalidate(id).await.is_err() {
                break;
            }
            let mut pending = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            pending.remove(&id);
            self.count.store(pending.len(), Ordering::Release);
            landed += 1;
        }
        if landed > 0 && self.is_empty() {
            tracing::info!(landed, "pending cache invalidations applied");
        }
        landed
    }
}
