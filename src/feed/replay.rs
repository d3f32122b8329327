//! Invalidations that a Redis Cluster failover lost, applied again.
//!
//! Redis replicates asynchronously: a master acknowledges an invalidation before its
//! replica has it, and if the master dies then, the promoted replica still holds the old
//! entry and the old stamp. Nobody retries (the write saw its invalidation succeed), so
//! every instance would serve the old entry until its TTL.
//!
//! The change feed's applier keeps what it applied in the last [`REPLAY_WINDOW`] (in
//! memory, at most [`REPLAY_CAP`] targets). With a cluster, every instance watches the
//! cluster's masters (`CLUSTER SHARDS`, every [`WATCH_EVERY`]); when a slot range's master
//! changes, it applies those changes again. Re-applying is cheap where nothing was lost: a
//! stamp already tagged with a change's transaction is left alone
//! (`cache::redis::INVALIDATE_SCRIPT`), so only lost invalidations take effect. If the
//! window overflowed (a bulk write), every entry is dropped instead, as on a truncate.
//!
//! Bound: an entry whose invalidation was lost may be served from the promotion until the
//! next watch sees the new master (≤ [`WATCH_EVERY`] plus one `CLUSTER SHARDS` round trip),
//! provided the lost change was applied within [`REPLAY_WINDOW`] of that moment: the window
//! must exceed the cluster's `cluster-node-timeout` plus its election (15 s by default).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cache::{Invalidation, Target};
use crate::items::service::ItemService;

/// How long applied changes are kept for a replay.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);

/// How many applied targets are kept at most (~100 bytes each).
pub const REPLAY_CAP: usize = 200_000;

/// How often the cluster's masters are read.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// One applied batch: when, what it invalidated, and whether it held a truncate.
type Applied = (Instant, Vec<(Target, Invalidation)>, bool);

/// The changes applied lately, oldest first.
#[derive(Default)]
pub struct Recent {
    batches: VecDeque<Applied>,
    targets: usize,
    /// When a batch was dropped to keep within [`REPLAY_CAP`] before its window ended.
    overflowed: Option<Instant>,
}

impl Recent {
    /// Records a batch the applier has just applied (`truncated`: it held a truncate).
    pub fn applied(&mut self, changed: &[(Target, Invalidation)], truncated: bool) {
        let now = Instant::now();
        self.expire(now);
        self.batches.push_back((now, changed.to_vec(), truncated));
        self.targets += changed.len();
        while self.targets > REPLAY_CAP {
            let Some((_, dropped, _)) = self.batches.pop_front() else {
                break;
            };
            self.targets -= dropped.len();
            self.overflowed = Some(now);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, batch, _)) = self.batches.front() {
            if now.duration_since(*at) <= REPLAY_WINDOW {
                break;
            }
            self.targets -= batch.len();
            self.batches.pop_front();
        }
        if self
            .overflowed
            .is_some_and(|at| now.duration_since(at) > REPLAY_WINDOW)
        {
            self.overflowed = None;
        }
    }

    /// What to apply again: the targets of the window, and whether to drop every entry
    /// (a truncate in the window, or the window overflowed).
    fn replayable(&mut self) -> (Vec<(Target, Invalidation)>, bool) {
        self.expire(Instant::now());
        let flush = self.overflowed.is_some() || self.batches.iter().any(|(_, _, t)| *t);
        let targets = self
            .batches
            .iter()
            .flat_map(|(_, batch, _)| batch.iter().cloned())
            .collect();
        (targets, flush)
    }
}

/// Shared between the applier, which records, and the watcher, which replays.
pub type SharedRecent = Arc<Mutex<Recent>>;

/// With a cluster: watches its masters until `stop`, and replays the recent changes after
/// each change of master.
pub async fn watch_failovers(
    service: ItemService,
    recent: SharedRecent,
    mut stop: watch::Receiver<bool>,
) {
    let mut known: Option<Vec<(i64, String)>> = None;
    // A replay that failed (the new master not answering yet) is tried again each turn.
    let mut owed = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let Ok(masters) = service.cluster_masters().await else {
            continue;
        };
        if masters.is_empty() {
            continue;
        }
        let changed = known.as_ref().is_some_and(|known| *known != masters);
        known = Some(masters);
        if !changed && !owed {
            continue;
        }
        let (targets, flush) = recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replayable();
        tracing::warn!(
            changes = targets.len(),
            flush,
            "redis cluster: a master changed; applying the recent changes again"
        );
        owed = match service.apply_changes(&targets, flush).await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %crate::report::chain(&e), "redis cluster: the replay failed; trying again");
                true
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::model::ItemId;

    fn target(n: i64) -> (Target, Invalidation) {
        (
            Target::Item(ItemId::new(n).unwrap()),
            Invalidation::Write { txid: n, lsn: 0 },
        )
    }

    #[test]
    fn a_replay_holds_the_window_and_flushes_after_an_overflow() {
        let mut recent = Recent::default();
        recent.applied(&[target(1), target(2)], false);
        recent.applied(&[target(3)], false);
        let (targets, flush) = recent.replayable();
        assert_eq!(targets.len(), 3);
        assert!(!flush);

        let bulk: Vec<_> = (0..REPLAY_CAP as i64).map(|n| target(n + 10)).collect();
        recent.applied(&bulk, false);
        let (targets, flush) = recent.replayable();
        assert!(targets.len() <= REPLAY_CAP);
        assert!(flush, "a dropped batch makes the replay drop every entry");
    }
}
