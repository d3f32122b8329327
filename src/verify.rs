//! The live staleness checker ("nines of consistency", in the spirit of Meta's Polaris and
//! Uber's Cache Inspector): a sample of hits (`CACHE_VERIFY_SAMPLE`) is re-checked against
//! Postgres off the request path, and the share found stale is exported.
//!
//! A hit served version `v` of an id. The check reads the row's version on the primary and
//! how long ago that version was written (the database's own clock on both ends). Equal:
//! consistent. Different: a write may simply have raced the check, which is not
//! staleness. It counts as stale only if both hold:
//! 1. the newer version was written before the hit was served: its age exceeds the time
//!    since the hit by more than [`MARGIN`] (the statement's clock precedes its commit by
//!    the transaction's length, which the margin covers for single-statement writes);
//! 2. after [`GRACE`] (beyond the bound for an invalidation to land: the API's at once,
//!    the change feed's within its one-second timer), the cache still holds version `v`:
//!    the entry was not invalidated, and further hits keep serving it.
//!
//! Checks are bounded ([`IN_FLIGHT`] at a time, the rest skipped), so sampling never
//! queues work on Postgres.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Semaphore;

use crate::items::model::ItemId;
use crate::items::service::ItemService;
use crate::metrics::{self, Consistency};

/// How long a write's invalidation may take to land before its old entry counts as stale:
/// the change feed's safety timer (1 s) plus slack.
pub const GRACE: Duration = Duration::from_millis(1500);
/// How much older than the hit the newer version must be to have surely committed before
/// it.
pub const MARGIN: Duration = Duration::from_millis(100);
/// Checks in flight at once; past this, sampled hits are not checked.
const IN_FLIGHT: usize = 8;

/// Samples hits and checks them in the background.
#[derive(Clone)]
pub struct Verifier {
    sample: f64,
    slots: Arc<Semaphore>,
}

impl Verifier {
    pub fn new(sample: f64) -> Verifier {
        Verifier {
            sample,
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }

    /// After a hit that served `served` (a version, or `None` for a cached "not found"):
    /// with probability `CACHE_VERIFY_SAMPLE`, check it in the background.
    pub fn after_hit(&self, service: &ItemService, id: ItemId, served: Option<i64>) {
        if self.sample <= 0.0 || rand::rng().random::<f64>() >= self.sample {
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        let service = service.clone();
        let hit = Instant::now();
        tokio::spawn(async move {
            if let Some(verdict) = check(&service, id, served, hit).await {
                metrics::record_consistency(verdict);
            }
            drop(slot);
        });
    }
}

/// `None` when the check could not be made (Postgres or Redis failing).
async fn check(
    service: &ItemService,
    id: ItemId,
    served: Option<i64>,
    hit: Instant,
) -> Option<Consistency> {
    let (current, age) = match service.version_in_postgres(id).await.ok()? {
        Some((version, age)) => (Some(version), Some(age)),
        // Deleted: its age is unknown (the row is gone), so a mismatch is judged by the
        // cache alone, after the grace.
        None => (None, None),
    };
    if current == served {
        return Some(Consistency::Consistent);
    }
    if age.is_some_and(|age| age <= hit.elapsed() + MARGIN) {
        // Written after the hit (or too close to it to tell): a race, not staleness.
        return Some(Consistency::Consistent);
    }
    tokio::time::sleep(GRACE).await;
    let still = service.cached_version(id).await.ok()?;
    if still == Some(served) {
        metrics::record_staleness_age(age.unwrap_or_default() + GRACE);
        tracing::warn!(item.id = %id, ?served, ?current, "stale cache entry found by the consistency checker");
        Some(Consistency::Stale)
    } else {
        Some(Consistency::Consistent)
    }
}
