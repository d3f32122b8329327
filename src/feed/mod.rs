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
pub mod replay;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use diesel_async::AsyncPgConnection;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::cache::{Invalidation, Target};
use crate::db::replicas::Lsn;
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
/// Changes read and applied at a time: one query, two Redis script calls (500 ids each,
/// well under a millisecond of Redis time), one delete. Big enough that a million-row
/// update drains in a thousand rounds, small enough that one round's rows (~100 KB) and
/// its Redis calls stay small.
const BATCH: i64 = 1000;
/// How long the applier keeps its role while Redis refuses its changes: past this it lets
/// the role go, so that an instance that reaches Redis (if one does) can apply them.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
/// The deadline of one feed query. A query on a connection whose peer vanished (a
/// partition) would otherwise wait for TCP to notice, holding the role meanwhile; this is
/// above the statement timeout every connection has (5 s).
const QUERY_TIMEOUT: Duration = Duration::from_secs(6);
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
    #[error("a feed query took longer than {0:?}")]
    Timeout(Duration),
}

/// `query` under [`QUERY_TIMEOUT`].
async fn bounded<T>(
    query: impl std::future::Future<Output = diesel::QueryResult<T>>,
) -> Result<T, FeedError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(FeedError::Timeout(QUERY_TIMEOUT)),
    }
}

impl From<diesel::result::Error> for FeedError {
    fn from(e: diesel::result::Error) -> Self {
        FeedError::Query(e)
    }
}

/// The follower's state, shared with `/readyz`: an index into [`FollowerState::ALL`]; and
/// with a Redis Cluster, the changes applied lately, for a replay after a failover
/// ([`replay`]).
#[derive(Clone)]
pub struct Feed {
    state: Arc<AtomicU8>,
    recent: Option<replay::SharedRecent>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            state: Arc::new(AtomicU8::new(index_of(FollowerState::Down))),
            recent: None,
        }
    }
}

fn index_of(state: FollowerState) -> u8 {
    FollowerState::ALL
        .iter()
        .position(|s| *s == state)
        .unwrap_or_default() as u8
}

impl Feed {
    /// A feed that keeps the changes it applies for a replay (with a Redis Cluster).
    pub fn keeping_recent() -> Feed {
        Feed {
            recent: Some(Default::default()),
            ..Feed::default()
        }
    }

    /// The changes applied lately, if kept.
    pub fn recent(&self) -> Option<&replay::SharedRecent> {
        self.recent.as_ref()
    }

    pub fn state(&self) -> FollowerState {
        let index = usize::from(self.state.load(Ordering::Relaxed));
        FollowerState::ALL
            .get(index)
            .copied()
            .unwrap_or(FollowerState::Down)
    }

    fn set(&self, state: FollowerState) {
        let index = index_of(state);
        if self.state.swap(index, Ordering::Relaxed) != index {
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
        let mut outage = Outage::default();
        loop {
            let result = tokio::select! {
                result = self.follow(&mut backoff, &mut outage) => result,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            self.feed.set(FollowerState::Down);
            if let Err(e) = result {
                outage.started(&e);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            backoff = (backoff * 2).min(RECONNECT.1);
        }
    }

    /// One connection's life, until it fails.
    async fn follow(&self, backoff: &mut Duration, outage: &mut Outage) -> Result<(), FeedError> {
        let mut conn = changes::listen(&self.database_url)
            .await
            .map_err(FeedError::Connect)?;
        *backoff = RECONNECT.0;
        outage.ended();
        let mut applying = false;
        let mut failing_since: Option<Instant> = None;
        loop {
            if !applying && bounded(changes::try_take_role(&mut conn)).await? {
                tracing::info!("change feed: this instance applies the changes");
                applying = true;
            }
            let (wait, woken) = if applying {
                self.feed.set(FollowerState::Applying);
                match self.drain(&mut conn).await? {
                    Drained::Empty => {
                        failing_since = None;
                        (SAFETY_POLL, Wake::OnChange)
                    }
                    Drained::CacheFailed => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > GIVE_UP_AFTER {
                            tracing::warn!(
                                "change feed: Redis refuses the changes; letting another instance apply them"
                            );
                            bounded(changes::give_up_role(&mut conn)).await?;
                            applying = false;
                            failing_since = None;
                            self.feed.set(FollowerState::Standby);
                            // Stand back one turn, so that a standby can take the role.
                            (ROLE_RETRY * 2, Wake::OnTimer)
                        } else {
                            (RETRY_AFTER_FAILURE, Wake::OnTimer)
                        }
                    }
                }
            } else {
                self.feed.set(FollowerState::Standby);
                (ROLE_RETRY, Wake::OnTimer)
            };
            metrics::record_feed_backlog(bounded(changes::backlog(&mut conn)).await?);
            wait_for_changes(&mut conn, wait, woken).await?;
        }
    }

    /// Applies queued changes until none is left or Redis fails.
    async fn drain(&self, conn: &mut AsyncPgConnection) -> Result<Drained, FeedError> {
        loop {
            let batch = bounded(changes::oldest(conn, BATCH)).await?;
            if batch.is_empty() {
                return Ok(Drained::Empty);
            }
            let lsn = batch.iter().map(|c| c.lsn()).max().unwrap_or(Lsn::MAX);
            let changed = targets(&batch, lsn);
            let truncated = batch.iter().any(changes::Change::is_truncate);
            if let Err(e) = self.service.apply_changes(&changed, truncated).await {
                tracing::debug!(error = %crate::report::chain(&e), "change feed: Redis refused the changes; retrying");
                return Ok(Drained::CacheFailed);
            }
            if let Some(recent) = self.feed.recent() {
                recent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .applied(&changed, truncated);
            }
            let now = chrono::Utc::now();
            for change in &batch {
                let lag = (now - change.changed_at).to_std().unwrap_or_default();
                metrics::record_invalidation_lag(InvalidationSource::Feed, lag);
            }
            let seqs: Vec<i64> = batch.iter().map(|c| c.seq).collect();
            bounded(changes::delete(conn, &seqs)).await?;
            metrics::record_feed_applied(batch.len());
            if (batch.len() as i64) < BATCH {
                return Ok(Drained::Empty);
            }
            // A long drain (a bulk update): the backlog as it shrinks, not as it was before.
            metrics::record_feed_backlog(bounded(changes::backlog(conn)).await?);
        }
    }
}

/// What a batch of changes invalidates: each item and each name whose lookup changed, once,
/// tagged with its latest change's transaction (an invalidation after that commit covers
/// the earlier changes too; the batch is in commit-independent `seq` order, so "latest" is
/// the latest recorded, and a later change of the same target comes in this batch or a
/// later one).
///
/// `lsn`: a WAL position at or past every change of the batch's commit (read with it).
fn targets(batch: &[changes::Change], lsn: Lsn) -> Vec<(Target, Invalidation)> {
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
        .map(|(target, xid)| (target, Invalidation::Write { txid: xid, lsn }))
        .collect()
}

/// What ends a wait besides its timer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A notification: the applier, with nothing queued.
    OnChange,
    /// Only the timer: a standby (which does not read the queue), or an applier waiting
    /// out a Redis failure (a notification would only make it fail again sooner).
    OnTimer,
}

/// Waits `wait`, or until a notification if `wake` says so. Notifications that piled up
/// meanwhile are taken at once: one read of the queue covers them all.
async fn wait_for_changes(
    conn: &mut AsyncPgConnection,
    wait: Duration,
    wake: Wake,
) -> Result<(), FeedError> {
    let mut notifications = std::pin::pin!(conn.notifications_stream());
    let timer = tokio::time::sleep(wait);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            note = notifications.next() => match note {
                None => return Err(FeedError::Closed),
                Some(note) => {
                    note?;
                    if wake == Wake::OnChange {
                        break;
                    }
                }
            },
            _ = &mut timer => break,
        }
    }
    while let Some(Some(note)) = notifications.next().now_or_never() {
        note?;
    }
    Ok(())
}

/// Logs an outage of the follower once when it starts and once when it ends.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
}

impl Outage {
    fn started(&mut self, e: &FeedError) {
        if self.since.is_none() {
            tracing::warn!(error = %crate::report::chain(e), "change feed: not following; reconnecting");
            self.since = Some(Instant::now());
        }
    }

    fn ended(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(after = ?since.elapsed(), "change feed: following again");
        }
    }
}
