//! Failed invalidations, retried until Redis takes them (contract behaviour 5).
//!
//! A write whose invalidation fails is still acknowledged (Postgres is the truth), and its
//! id (and the names whose lookups it changed) go here. Until the invalidation lands, reads
//! of them on this instance do not trust the cache (they read Postgres and do not fill),
//! and a background task retries every [`RETRY_EVERY`]. This is the fast path: the change
//! feed has every write durably and applies it too, from any instance (`feed`).
//! `docs/cache-design.md` gives the bounds.
//!
//! Each queued id carries the generation of the latest write that queued it. A retry that
//! lands clears the id only if no write queued it again while the retry was in flight:
//!
//! ```text
//!   retry                               writer
//!   takes (7, gen 1)
//!   invalidate 7 -> ok (new stamp s2)
//!                                       UPDATE 7; COMMIT; invalidate 7 -> fails
//!                                       queue (7, gen 2)
//!   clear 7 if still gen 1 -> kept      (the next pass invalidates after the 2nd write)
//! ```
//!
//! Without the generation, the retry would clear the id that the second write queued, and
//! a reader that noted s2 before the second write's commit could fill the old row.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cache::{Invalidation, Target};
use crate::items::model::ItemId;
use crate::metrics::{self, InvalidationSource};

/// How often pending invalidations are retried: often enough that a recovered Redis is
/// cleaned within a fraction of a second, rarely enough to cost nothing while it is down
/// (the circuit breaker refuses the calls without a network round trip).
pub const RETRY_EVERY: Duration = Duration::from_millis(200);

#[derive(Default)]
pub struct Pending {
    queued: Mutex<Queued>,
    /// How many ids are pending: reads check this one atomic, and the map only when it
    /// is not zero (it is zero but during Redis outages).
    count: AtomicUsize,
}

#[derive(Clone, Copy)]
struct Queue {
    generation: u64,
    cause: Invalidation,
    since: Instant,
}

#[derive(Default)]
struct Queued {
    /// Each pending id: the generation and cause of the latest write that queued it, and
    /// when the oldest write not yet invalidated committed (the lag metric's start).
    ids: HashMap<Target, Queue>,
    next_generation: u64,
}

impl Pending {
    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `id` for a write whose invalidation failed; a later write of an id already
    /// queued gives it a new generation.
    pub fn add(&self, target: Target, cause: Invalidation, committed: Instant) {
        let mut queued = self.queued();
        queued.next_generation += 1;
        let generation = queued.next_generation;
        let since = queued
            .ids
            .get(&target)
            .map_or(committed, |q| q.since.min(committed));
        queued.ids.insert(
            target,
            Queue {
                generation,
                cause,
                since,
            },
        );
        self.count.store(queued.ids.len(), Ordering::Release);
    }

    /// Whether a write of `target` has not reached Redis yet.
    pub fn contains(&self, target: &Target) -> bool {
        self.count.load(Ordering::Acquire) != 0 && self.queued().ids.contains_key(target)
    }

    /// Whether a write of any of `ids` has not reached Redis yet.
    pub fn any_of(&self, ids: &[ItemId]) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let queued = self.queued();
        ids.iter()
            .any(|&id| queued.ids.contains_key(&Target::Item(id)))
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One pass: runs `invalidate` for every pending id until one fails (Redis is still
    /// not answering; the next pass tries again). An id is cleared only if no write
    /// queued it again meanwhile. Returns how many were cleared.
    pub async fn retry<F, Fut, E>(&self, invalidate: F) -> usize
    where
        F: Fn(Target, Invalidation) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        if self.is_empty() {
            return 0;
        }
        let snapshot: Vec<(Target, Queue)> = self
            .queued()
            .ids
            .iter()
            .map(|(target, &q)| (target.clone(), q))
            .collect();
        let mut cleared = 0;
        for (target, taken) in snapshot {
            if invalidate(target.clone(), taken.cause).await.is_err() {
                break;
            }
            let mut queued = self.queued();
            if queued
                .ids
                .get(&target)
                .is_some_and(|q| q.generation == taken.generation)
            {
                queued.ids.remove(&target);
                cleared += 1;
                metrics::record_invalidation_lag(InvalidationSource::Api, taken.since.elapsed());
            }
            self.count.store(queued.ids.len(), Ordering::Release);
        }
        if cleared > 0 && self.is_empty() {
            tracing::info!(cleared, "pending cache invalidations applied");
        }
        cleared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: i64) -> Target {
        Target::Item(ItemId::new(n).expect("a valid id"))
    }

    /// The interleaving in the module docs, forced: a second write of id 7 fails to
    /// invalidate while the retry of the first is in flight.
    #[tokio::test]
    async fn a_write_queued_during_a_retry_stays_queued() {
        let pending = Pending::default();
        pending.add(item(7), Invalidation::Eviction, Instant::now());
        pending.add(item(8), Invalidation::Eviction, Instant::now());
        let cleared = pending
            .retry(|n, _| {
                if n == item(7) {
                    // The second write's invalidation failed just now.
                    pending.add(item(7), Invalidation::Eviction, Instant::now());
                }
                async { Ok::<(), ()>(()) }
            })
            .await;
        assert_eq!(cleared, 1, "only id 8 is cleared");
        assert!(
            pending.contains(&item(7)),
            "the second write's invalidation is still owed"
        );
        assert!(!pending.contains(&item(8)));
        assert_eq!(pending.len(), 1);

        let cleared = pending.retry(|_, _| async { Ok::<(), ()>(()) }).await;
        assert_eq!((cleared, pending.len()), (1, 0));
    }

    #[tokio::test]
    async fn a_failed_retry_keeps_the_id() {
        let pending = Pending::default();
        pending.add(item(3), Invalidation::Eviction, Instant::now());
        let cleared = pending.retry(|_, _| async { Err::<(), ()>(()) }).await;
        assert_eq!(cleared, 0);
        assert!(pending.contains(&item(3)));
    }
}
