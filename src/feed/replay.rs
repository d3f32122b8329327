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

/// How long applied changes are kept for a replay, at least; longer when the cluster's
/// settings let a replica be promoted with older data ([`stalest_promotion`]).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);

/// The longest window kept, whatever the settings say (memory is bounded by [`REPLAY_CAP`]
/// in any case).
const WINDOW_MAX: Duration = Duration::from_secs(3600);

/// How often the cluster's settings are read again.
const SETTINGS_EVERY: Duration = Duration::from_secs(60);

/// A failed replay is tried again after this, then twice as late each time, up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How many applied targets are kept at most (~100 bytes each).
pub const REPLAY_CAP: usize = 200_000;

/// How often the cluster's masters are read.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// One applied batch: when, what it invalidated, and whether it held a truncate.
type Applied = (Instant, Vec<(Target, Invalidation)>, bool);

/// The changes applied lately, oldest first.
pub struct Recent {
    batches: VecDeque<Applied>,
    targets: usize,
    /// When a batch was dropped to keep within [`REPLAY_CAP`] before its window ended.
    overflowed: Option<Instant>,
    window: Duration,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            batches: VecDeque::new(),
            targets: 0,
            overflowed: None,
            window: REPLAY_WINDOW,
        }
    }
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
            if now.duration_since(*at) <= self.window {
                break;
            }
            self.targets -= batch.len();
            self.batches.pop_front();
        }
        if self
            .overflowed
            .is_some_and(|at| now.duration_since(at) > self.window)
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

/// How old the data of a replica that the cluster may promote can be: it takes over only
/// if it heard from its master within `cluster-node-timeout × cluster-replica-validity-factor
/// + repl-ping-replica-period`, and the master is declared failed a node timeout after it
/// died. `None` when unbounded (a factor of 0) or unknown (`CONFIG` refused).
pub fn stalest_promotion(settings: &std::collections::HashMap<String, String>) -> Option<Duration> {
    let number = |name: &str| settings.get(name)?.parse::<u64>().ok();
    let node_timeout = Duration::from_millis(number("cluster-node-timeout")?);
    let factor = number("cluster-replica-validity-factor")?;
    let ping = Duration::from_secs(number("repl-ping-replica-period")?);
    if factor == 0 {
        return None;
    }
    let factor = u32::try_from(factor).ok()?;
    Some(node_timeout.checked_mul(factor.checked_add(1)?)? + ping)
}

/// With a cluster: watches its masters until `stop`, and replays the recent changes after
/// each change of master. When the cluster's settings do not bound how old a promoted
/// replica's data can be within what is kept, every entry is dropped instead.
pub async fn watch_failovers(
    service: ItemService,
    recent: SharedRecent,
    mut stop: watch::Receiver<bool>,
) {
    const SETTINGS: [&str; 3] = [
        "cluster-node-timeout",
        "cluster-replica-validity-factor",
        "repl-ping-replica-period",
    ];
    let mut known: Option<Vec<(i64, String)>> = None;
    // A new reading is acted on when seen twice in a row: nodes answer `CLUSTER SHARDS`
    // from their own view, which may lag another node's by a gossip round.
    let mut candidate: Option<Vec<(i64, String)>> = None;
    // Whether a window of changes covers what a promotion can lose (None: unknown yet).
    let mut covered: Option<bool> = None;
    let mut settings_read: Option<Instant> = None;
    // A replay that failed (the new master not answering yet), and when to try it again.
    let mut owed: Option<(Instant, Duration)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        if settings_read.is_none_or(|at| at.elapsed() > SETTINGS_EVERY) {
            settings_read = Some(Instant::now());
            covered = Some(match service.cluster_config(&SETTINGS).await {
                Ok(settings) => match stalest_promotion(&settings) {
                    Some(stalest) => {
                        let window = (stalest + Duration::from_secs(10)).max(REPLAY_WINDOW);
                        recent.lock().unwrap_or_else(|p| p.into_inner()).window =
                            window.min(WINDOW_MAX);
                        window <= WINDOW_MAX
                    }
                    None => false,
                },
                Err(_) => covered.unwrap_or(false),
            });
        }
        let Ok(Some(masters)) = service.cluster_masters().await else {
            continue;
        };
        let settled = candidate.as_ref() == Some(&masters);
        candidate = Some(masters.clone());
        let changed = settled && known.as_ref().is_some_and(|known| *known != masters);
        if settled {
            known = Some(masters);
        }
        if changed {
            service.follow_failover();
        }
        let retry_due = owed.is_some_and(|(at, _)| Instant::now() >= at);
        if !changed && !retry_due {
            continue;
        }
        let (targets, flush) = recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replayable();
        // Without a bound on what the promoted replica missed, only dropping everything is
        // sure to drop what it should not serve.
        let flush = flush || covered != Some(true);
        tracing::warn!(
            changes = targets.len(),
            flush,
            "redis cluster: a master changed; applying the recent changes again"
        );
        owed = match service.apply_changes(&targets, flush).await {
            Ok(()) => None,
            Err(e) => {
                let wait = owed.map_or(RETRY_MIN, |(_, wait)| (wait * 2).min(RETRY_MAX));
                tracing::warn!(error = %crate::report::chain(&e), retry_in = ?wait, "redis cluster: the replay failed");
                Some((Instant::now() + wait, wait))
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
    fn a_promotion_is_bounded_by_the_clusters_settings() {
        let settings = |factor: &str| {
            [
                ("cluster-node-timeout", "15000"),
                ("cluster-replica-validity-factor", factor),
                ("repl-ping-replica-period", "10"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
        };
        // Redis's defaults: 15 s × (10 + 1) + 10 s.
        assert_eq!(
            stalest_promotion(&settings("10")),
            Some(Duration::from_secs(175))
        );
        assert_eq!(stalest_promotion(&settings("0")), None, "unbounded");
        assert_eq!(stalest_promotion(&Default::default()), None, "unknown");
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
