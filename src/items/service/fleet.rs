//! Loads under the fleet's leases (`cache::lease`): of all instances sharing the Redis,
//! one loads a cold id and fills it; the others wait for that fill and answer from it.
//!
//! Why an answer taken from the entry is as new as the reader needs: the entry was stored
//! by a stamp-checked fill, and every write acknowledged before this reader started had
//! deleted the entry and replaced the stamp before its acknowledgement; an entry present
//! after that was filled from a read that began after the stamp was replaced, so it shows
//! the write (`docs/cache-design.md`, "Across the fleet: leases").

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{ItemService, Loaded, Outdated, item_of, now_ms};
use crate::cache::lease::LEASE_WAIT;
use crate::cache::{CacheError, LeaseToken, Stamp};
use crate::items::model::ItemId;
use crate::metrics::{self, LeaseOutcome};

/// Leases a load holds until its fill releases them; dropped earlier (the load cancelled),
/// it releases them in the background.
struct Held {
    service: ItemService,
    ids: Vec<ItemId>,
    token: LeaseToken,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let (service, ids, token) = (
            self.service.clone(),
            std::mem::take(&mut self.ids),
            self.token.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = service.inner.cache.release_leases(&ids, &token).await;
            });
        }
    }
}

/// The first poll for another instance's fill comes this soon (a load of one row takes
/// about a millisecond); each next one twice as late, up to [`POLL_MAX`].
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(25);

impl ItemService {
    /// With a Redis Cluster, its masters now: `(first slot, node id)` of each shard, sorted
    /// (`feed::replay` compares them to see a failover); `None` during a failover.
    pub async fn cluster_masters(&self) -> Result<Option<Vec<(i64, String)>>, CacheError> {
        self.inner.cache.cluster_masters().await
    }

    /// With a Redis Cluster, after a failover: see [`crate::cache::Cache::follow_failover`].
    pub fn follow_failover(&self) {
        self.inner.cache.follow_failover();
    }

    /// With a Redis Cluster, some of its settings (`CONFIG GET`).
    pub async fn cluster_config(
        &self,
        names: &[&str],
    ) -> Result<std::collections::HashMap<String, String>, CacheError> {
        self.inner.cache.cluster_config(names).await
    }

    /// Takes the leases on `ids` that are free, loads and fills those, and meanwhile waits
    /// for the fills of the others; ids whose wait ends without a fill are loaded here too.
    /// Redis failing: every id is loaded here, as without leases.
    pub(super) async fn load_under_leases(
        &self,
        ids: Vec<ItemId>,
        noted: &HashMap<ItemId, Stamp>,
        outdated: Outdated,
    ) -> HashMap<ItemId, Loaded> {
        let token = LeaseToken::new();
        let taken = match self
            .inner
            .cache
            .acquire_leases(&ids, &token, outdated.0)
            .await
        {
            Ok(taken) => taken,
            Err(_) => {
                // Redis failing: load as without leases. The script may still have taken
                // some (a reply lost to the deadline, a cluster's slot that answered): the
                // fill releases those that carry this token.
                metrics::record_leases(LeaseOutcome::GaveUp, ids.len());
                return self.read_and_fill(ids, Some(noted), Some(&token)).await;
            }
        };
        let (mine, theirs): (Vec<ItemId>, Vec<ItemId>) = {
            let mut mine = Vec::new();
            let mut theirs = Vec::new();
            for (id, taken) in ids.into_iter().zip(taken) {
                if taken { &mut mine } else { &mut theirs }.push(id);
            }
            (mine, theirs)
        };
        metrics::record_leases(LeaseOutcome::Acquired, mine.len());
        // If this load is dropped before its fill (its readers went away), the leases are
        // released at once rather than left to expire under other instances' waiters.
        let mut held = Held {
            service: self.clone(),
            ids: mine.clone(),
            token: token.clone(),
        };
        let load_mine = async {
            if mine.is_empty() {
                HashMap::new()
            } else {
                self.read_and_fill(mine, Some(noted), Some(&token)).await
            }
        };
        let (mut answers, (waited, left)) =
            tokio::join!(load_mine, self.wait_for_fills(theirs, outdated));
        // Released by the fill (or by the failed read).
        held.ids.clear();
        answers.extend(waited);
        if !left.is_empty() {
            answers.extend(self.read_and_fill(left, Some(noted), None).await);
        }
        answers
    }

    /// Polls the entries and leases of `ids` (held by other loads) until each is filled,
    /// its lease is gone, or [`LEASE_WAIT`] has passed. Returns the answers the fills gave,
    /// and the ids left to load.
    async fn wait_for_fills(
        &self,
        mut ids: Vec<ItemId>,
        outdated: Outdated,
    ) -> (HashMap<ItemId, Loaded>, Vec<ItemId>) {
        let mut answers = HashMap::new();
        let mut left = Vec::new();
        let deadline = Instant::now() + LEASE_WAIT;
        let mut pause = POLL_FIRST;
        while !ids.is_empty() {
            if Instant::now() + pause > deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
            let Ok(polled) = self.inner.cache.poll_leased(&ids).await else {
                break;
            };
            let now = now_ms();
            let mut waiting = Vec::with_capacity(ids.len());
            for (id, polled) in ids.into_iter().zip(polled) {
                match polled.entry {
                    Some(entry) if entry.is_fresh(now) && entry.fresh_until_ms > outdated.0 => {
                        answers.insert(id, Ok(item_of(entry)));
                    }
                    _ if polled.leased => waiting.push(id),
                    _ => left.push(id),
                }
            }
            ids = waiting;
        }
        metrics::record_leases(LeaseOutcome::Filled, answers.len());
        metrics::record_leases(LeaseOutcome::Released, left.len());
        metrics::record_leases(LeaseOutcome::GaveUp, ids.len());
        if !answers.is_empty() {
            metrics::record_coalesced(answers.len());
        }
        left.extend(ids);
        (answers, left)
    }
}
