//! Read replicas: which streaming standby, if any, may answer a cache miss (issue 13,
//! contract behaviour 9).
//!
//! A write's invalidation records the WAL position its commit is at (in the write's stamp,
//! `cache::redis`); a reader that noted the stamp may read a replica only if that replica
//! has replayed at least that position, else it reads the primary. So a fill from a
//! replica is never older than an acknowledged write: the stamp argument of
//! `docs/cache-design.md`, with "read after the note" made true on the replica by the
//! replay position. A reader that noted no stamp (nothing written in the stamp's minute)
//! relies on the replica's lag: a replica is read only while it is within
//! `DATABASE_REPLICA_MAX_LAG_MS` (at most 30 s) of the primary.
//!
//! Positions are tracked cheaply, not queried per miss: a background task asks the primary
//! for its position and each replica for its replay position every [`TRACK_EVERY`]. A
//! replica's known position is a lower bound (replay only advances), so a stale reading
//! can only send a reader to the primary, never to a replica that is behind. A replica's
//! lag is the age of the newest primary position it has replayed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::sql_types::Text;
use tokio::sync::watch;

use crate::db::{DbSetupError, PgPool, Pools};
use crate::metrics::{self, ReplicaFallback};

/// A WAL position (`pg_lsn` as a number).
pub type Lsn = u64;

/// How often positions are read: the longest a replica that has caught up goes unused
/// for a freshly written id (10 ms of Postgres time per second per replica).
pub const TRACK_EVERY: Duration = Duration::from_millis(100);
/// The deadline of one tracking query: a replica that does not answer within it counts
/// as down until it does.
const TRACK_TIMEOUT: Duration = Duration::from_secs(1);

/// `16/B374D848` -> its number.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// The replicas of one primary; none when `DATABASE_REPLICA_URL` is unset.
#[derive(Clone, Default)]
pub struct Replicas {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    replicas: Vec<Replica>,
    max_lag: Duration,
    next: AtomicUsize,
    /// Recent primary positions and when they were read, oldest first: a replica's lag is
    /// the age of the newest of them it has replayed.
    primary: Mutex<VecDeque<(Instant, Lsn)>>,
}

/// One replica: its pool and what the tracker last learned of it.
pub struct Replica {
    index: usize,
    pool: Pools,
    replayed: AtomicU64,
    lag_ms: AtomicU64,
    up: AtomicBool,
}

impl Replica {
    pub fn pool(&self) -> &Pools {
        &self.pool
    }

    /// A query failed as an outage: not read again until the tracker hears from it.
    pub fn mark_down(&self) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                replica = self.index,
                "replica unavailable: misses go to the primary"
            );
        }
    }
}

/// How the replicas stand, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// None configured.
    None,
    /// Every replica up and within the lag bound.
    Ok,
    /// One or more down or lagging: their reads go to the primary.
    Degraded,
}

impl Replicas {
    /// Pools for `urls`, `size` connections each (shared and `workers` HTTP workers' own,
    /// `db::pools`).
    pub fn new(
        urls: &[String],
        size: usize,
        workers: usize,
        max_lag: Duration,
    ) -> Result<Replicas, DbSetupError> {
        let replicas = urls
            .iter()
            .enumerate()
            .map(|(index, url)| {
                Ok(Replica {
                    index,
                    pool: Pools::new(url, size, workers)?,
                    replayed: AtomicU64::new(0),
                    lag_ms: AtomicU64::new(u64::MAX),
                    up: AtomicBool::new(false),
                })
            })
            .collect::<Result<Vec<_>, DbSetupError>>()?;
        Ok(Replicas {
            inner: Arc::new(Inner {
                replicas,
                max_lag,
                next: AtomicUsize::new(0),
                primary: Mutex::new(VecDeque::new()),
            }),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.inner.replicas.is_empty()
    }

    /// A replica that has replayed `at_least` and is within the lag bound, in turn; else
    /// why the primary must answer.
    pub fn choose(&self, at_least: Lsn) -> Result<&Replica, ReplicaFallback> {
        let replicas = &self.inner.replicas;
        if replicas.is_empty() {
            return Err(ReplicaFallback::None);
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut why = ReplicaFallback::Down;
        for k in 0..replicas.len() {
            let replica = &replicas[start.wrapping_add(k) % replicas.len()];
            if !replica.up.load(Ordering::Relaxed) {
                continue;
            }
            let lag = Duration::from_millis(replica.lag_ms.load(Ordering::Relaxed));
            if lag > self.inner.max_lag {
                why = ReplicaFallback::Lagging;
                continue;
            }
            if replica.replayed.load(Ordering::Relaxed) < at_least {
                why = ReplicaFallback::Behind;
                continue;
            }
            return Ok(replica);
        }
        Err(why)
    }

    pub fn health(&self) -> Health {
        let replicas = &self.inner.replicas;
        if replicas.is_empty() {
            return Health::None;
        }
        let max_lag = self.inner.max_lag.as_millis() as u64;
        let all_fine = replicas
            .iter()
            .all(|r| r.up.load(Ordering::Relaxed) && r.lag_ms.load(Ordering::Relaxed) <= max_lag);
        if all_fine {
            Health::Ok
        } else {
            Health::Degraded
        }
    }

    /// Reads the positions every [`TRACK_EVERY`] until the stop.
    pub async fn track(self, primary: Arc<Pools>, mut stop: watch::Receiver<bool>) {
        if self.is_empty() {
            return;
        }
        let mut every = tokio::time::interval(TRACK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            self.track_once(primary.shared()).await;
        }
    }

    async fn track_once(&self, primary: &PgPool) {
        let now = Instant::now();
        if let Some(lsn) =
            position(primary, "SELECT pg_current_wal_insert_lsn()::text AS lsn").await
        {
            let mut samples = self.inner.primary.lock().unwrap_or_else(|p| p.into_inner());
            samples.push_back((now, lsn));
            // Keep twice the lag bound: enough to measure any lag up to it.
            while samples
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.inner.max_lag * 2)
            {
                samples.pop_front();
            }
        }
        let replays = self.inner.replicas.iter().map(|replica| async move {
            let replayed = position(
                replica.pool.shared(),
                "SELECT pg_last_wal_replay_lsn()::text AS lsn",
            )
            .await;
            (replica, replayed)
        });
        for (replica, replayed) in futures_util::future::join_all(replays).await {
            match replayed {
                Some(lsn) => {
                    replica.replayed.fetch_max(lsn, Ordering::Relaxed);
                    let lag = self.lag_of(lsn, now);
                    replica
                        .lag_ms
                        .store(lag.as_millis() as u64, Ordering::Relaxed);
                    metrics::record_replica_lag(replica.index, lag);
                    if !replica.up.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            replica = replica.index,
                            "replica answers: misses may be read there"
                        );
                    }
                }
                None => replica.mark_down(),
            }
        }
    }

    /// How far behind a replica that has replayed `replayed` is: the age of the newest
    /// primary position it has reached (none of the recent ones: at least twice the bound).
    fn lag_of(&self, replayed: Lsn, now: Instant) -> Duration {
        let samples = self.inner.primary.lock().unwrap_or_else(|p| p.into_inner());
        match samples.back() {
            None => self.inner.max_lag * 2,
            Some((_, newest)) if replayed >= *newest => Duration::ZERO,
            Some(_) => samples
                .iter()
                .rev()
                .find(|(_, lsn)| *lsn <= replayed)
                .map_or(self.inner.max_lag * 2, |(at, _)| now.duration_since(*at)),
        }
    }
}

/// One position query on a pooled connection; `None` if it did not answer in time.
async fn position(pool: &PgPool, sql: &'static str) -> Option<Lsn> {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Position {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        lsn: Option<String>,
    }
    let query = async {
        let mut conn = pool.get().await.ok()?;
        let row: Position = diesel::sql_query(sql).get_result(&mut conn).await.ok()?;
        row.lsn.as_deref().and_then(parse_lsn)
    };
    tokio::time::timeout(TRACK_TIMEOUT, query)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_as_postgres_writes_them() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert!(parse_lsn("16/B374D848").unwrap() > parse_lsn("15/FFFFFFFF").unwrap());
        for bad in ["", "16", "x/1", "1/y"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }
}
