//! The change feed follower: applies to Redis every committed change of `items`, whoever
//! made it (contract behaviour 7).
//!
//! The migration's triggers record each change in `item_changes`, in the writing
//! transaction, and `NOTIFY` at commit. Every instance runs a follower on a connection of
//! its own that `LISTEN`s. One of them, the holder of a Postgres advisory lock (the
//! applier), on each wake-up and at least every [`SAFETY_POLL`]:
//! 1. reads the oldest queued changes ([`changes::oldest`]),
//! 2. applies them as the API's writes are applied (new stamp and entry deleted, so an
//!    in-flight reader's fill is refused; a truncate drops every entry),
//! 3. only then deletes them.
//!
//! A crash between 2 and 3 applies them again, which is harmless. Redis failing in 2 leaves
//! them queued, retried every [`RETRY_AFTER_FAILURE`]. The others wait as `standby` and try
//! the lock every [`ROLE_RETRY`]: an applier that dies closes its connection, which releases
//! the lock, and another takes over within that. A lost connection (Postgres restarted,
//! the backend terminated) is made again; notifications sent meanwhile are lost, but the
//! queue is not. `docs/cache-design.md` ("The change feed") gives the guarantees and bounds.

pub mod changes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::cache::{Invalidation, Target};
use crate::items::model::ItemId;
use crate::items::service::ItemService;
use crate::metrics::{self, FollowerState, InvalidationSource};

/// The slow timer behind the `NOTIFY`: the queue is read at least this often, so a lost
/// notification costs at most this much lag.
pub const SAFETY_POLL: Duration = Duration::from_secs(1);
/// How often a standby tries to take the applier role: the takeover time when the
/// applier dies.
pub const ROLE_RETRY: Duration = Duration::from_millis(500);
/// How soon changes are applied again after Redis failed them (as the API's retry queue).
pub const RETRY_AFTER_FAILURE: Duration = crate::cache::invalidation::RETRY_EVERY;
/// Changes read and applied at a time: one query, two Redis script calls, one delete.
const BATCH: i64 = 1000;
/// Reconnecting backs off from the first to the second.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Why following stopped for a while.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("could not connect")]
    Connect(#[source] diesel::ConnectionError),
    #[error("a feed query failed")]
    Query(#[source] diesel::result::Error),
    #[error("the connection was closed")]
    Closed,
}

impl From<diesel::result::Error> for FeedError {
    fn from(e: diesel::result::Error) -> Self {
        FeedError::Query(e)
    }
}

/// The follower's state, shared with `/readyz`.
#[derive(Clone, Default)]
pub struct Feed {
    state: Arc<AtomicU8>,
}

impl Feed {
    pub fn state(&self) -> FollowerState {
        match self.state.load(Ordering::Relaxed) {
            1 => FollowerState::Applying,
            2 => FollowerState::Standby,
            _ => FollowerState::Down,
        }
    }

    fn set(&self, state: FollowerState) {
        let code = match state {
            FollowerState::Down => 0,
            FollowerState::Applying => 1,
            FollowerState::Standby => 2,
        };
        if self.state.swap(code, Ordering::Relaxed) != code {
            metrics::record_follower_state(state);
        }
    }
}

/// One instance's follower.
pub struct Follower {
    pub service: ItemService,
    pub database_url: String,
    pub feed: Feed,
}

/// What the last drain came to.
enum Drained {
    /// Nothing left queued.
    Empty,
    /// Redis refused the changes: they stay queued.
    CacheFailed,
}

impl Follower {
    /// Follows until `stop` says so; reconnects after every failure. The stop cancels
    /// whatever is in flight (a query, a wait): shutting down never waits for Postgres.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = RECONNECT.0;
        let mut outage = false;
        loop {
            let result = tokio::select! {
                result = self.follow(&mut backoff) => result,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            self.feed.set(FollowerState::Down);
            if let Err(e) = result
                && !outage
            {
                tracing::warn!(error = %crate::report::chain(&e), "change feed: not following; reconnecting");
                outage = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            backoff = (backoff * 2).min(RECONNECT.1);
        }
    }

    /// One connection's life, until it fails.
    async fn follow(&self, backoff: &mut Duration) -> Result<(), FeedError> {
        let mut conn = changes::listen(&self.database_url)
            .await
            .map_err(FeedError::Connect)?;
        *backoff = RECONNECT.0;
        let mut applying = false;
        loop {
            if !applying && changes::try_take_role(&mut conn).await? {
                tracing::info!("change feed: this instance applies the changes");
                applying = true;
            }
            let wait = if applying {
                self.feed.set(FollowerState::Applying);
                match self.drain(&mut conn).await? {
                    Drained::Empty => SAFETY_POLL,
                    Drained::CacheFailed => RETRY_AFTER_FAILURE,
                }
            } else {
                self.feed.set(FollowerState::Standby);
                ROLE_RETRY
            };
            metrics::record_feed_backlog(changes::backlog(&mut conn).await?);
            wait_for_changes(&mut conn, wait).await?;
        }
    }

    /// Applies queued changes until none is left or Redis fails.
    async fn drain(&self, conn: &mut AsyncPgConnection) -> Result<Drained, FeedError> {
        loop {
            let batch = changes::oldest(conn, BATCH).await?;
            if batch.is_empty() {
                return Ok(Drained::Empty);
            }
            let changed = targets(&batch);
            let truncated = batch.iter().any(changes::Change::is_truncate);
            if let Err(e) = self.service.apply_changes(&changed, truncated).await {
                tracing::debug!(error = %crate::report::chain(&e), "change feed: Redis refused the changes; retrying");
                return Ok(Drained::CacheFailed);
            }
            let now = chrono::Utc::now();
            for change in &batch {
                let lag = (now - change.changed_at).to_std().unwrap_or_default();
                metrics::record_invalidation_lag(InvalidationSource::Feed, lag);
            }
            let seqs: Vec<i64> = batch.iter().map(|c| c.seq).collect();
            changes::delete(conn, &seqs).await?;
            metrics::record_feed_applied(batch.len());
            if (batch.len() as i64) < BATCH {
                return Ok(Drained::Empty);
            }
        }
    }
}

/// What a batch of changes invalidates: each item and each name whose lookup changed, once,
/// tagged with its latest change's transaction (an invalidation after that commit covers
/// the earlier changes too; the batch is in commit-independent `seq` order, so "latest" is
/// the latest recorded, and a later change of the same target comes in this batch or a
/// later one).
fn targets(batch: &[changes::Change]) -> Vec<(Target, Invalidation)> {
    let mut latest: BTreeMap<Target, i64> = BTreeMap::new();
    for change in batch {
        if let Some(id) = change.item_id.and_then(ItemId::new) {
            latest.insert(Target::Item(id), change.xid);
        }
        for name in change.names() {
            latest.insert(Target::Name(name.to_owned()), change.xid);
        }
    }
    latest
        .into_iter()
        .map(|(target, xid)| (target, Invalidation::Write(xid)))
        .collect()
}

/// Waits for a notification or `wait`. Notifications that piled up meanwhile are taken at
/// once: one read of the queue covers them all.
async fn wait_for_changes(conn: &mut AsyncPgConnection, wait: Duration) -> Result<(), FeedError> {
    let mut notifications = std::pin::pin!(conn.notifications_stream());
    tokio::select! {
        note = notifications.next() => match note {
            None => return Err(FeedError::Closed),
            Some(note) => {
                note?;
            }
        },
        _ = tokio::time::sleep(wait) => {}
    }
    while let Some(Some(note)) = notifications.next().now_or_never() {
        note?;
    }
    Ok(())
}
