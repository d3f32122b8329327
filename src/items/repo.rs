//! Postgres queries on `items`: one function per `query` label of
//! `itemcache_db_query_duration_seconds`, each timed. Knows SQL, not the cache or HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::deadpool::Object;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::db::Pools;
use crate::db::replicas::{Lsn, Replicas, parse_lsn};
use crate::items::model::{Item, ItemId, ItemPatch, NewItem};
use crate::metrics::{self, DbQuery, ReadTarget, ReplicaFallback};
use crate::schema::items;

/// What a failed Postgres operation was caused by; shared (`Arc`) because one load's
/// failure answers every reader coalesced on it.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why a query did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    /// No connection could be had in time, or Postgres could not run the statement for a
    /// while (down, restarting, failing over, overloaded, a statement timeout): retry later.
    #[error("postgres unavailable")]
    Unavailable(#[source] Cause),
    /// Too many Postgres operations are waiting already: shed this one now rather than
    /// queue it until its client gives up.
    #[error("too many postgres operations in flight")]
    Overloaded,
    /// Postgres answered with an error: a bug or a broken schema, not an outage.
    #[error("query failed")]
    Query(#[source] Cause),
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for RepoError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        // Every way of not getting a connection (wait or create timeout, refused, too many
        // clients, the server starting up or shutting down) is an outage.
        RepoError::Unavailable(Arc::new(e))
    }
}

impl From<DieselError> for RepoError {
    fn from(e: DieselError) -> Self {
        if outage(&e) {
            RepoError::Unavailable(Arc::new(e))
        } else {
            RepoError::Query(Arc::new(e))
        }
    }
}

/// Whether a statement failed because Postgres could not serve it for a while, rather than
/// because of the statement.
///
/// diesel-async keeps the SQLSTATE only as a [`DatabaseErrorKind`] for eight codes (here:
/// 25006 `read_only_sql_transaction`, met during a failover) and drops it for the rest, so
/// the others are known by the server's message (English, as Postgres sends them unless
/// `lc_messages` is changed; `docs/cache-design.md` lists that assumption). Connection-time
/// failures (57P03 `cannot_connect_now`, 53300 `too_many_connections`) arrive as pool errors
/// and are outages there.
fn outage(e: &DieselError) -> bool {
    let DieselError::DatabaseError(kind, info) = e else {
        return false;
    };
    match kind {
        DatabaseErrorKind::ClosedConnection
        | DatabaseErrorKind::UnableToSendCommand
        | DatabaseErrorKind::ReadOnlyTransaction => true,
        _ => OUTAGE_MESSAGES
            .iter()
            .any(|(_, start)| info.message().starts_with(start)),
    }
}

/// SQLSTATEs that mean "not now", with the start of the message Postgres sends for each.
const OUTAGE_MESSAGES: &[(&str, &str)] = &[
    // query_canceled: our statement_timeout, or an operator's pg_cancel_backend.
    ("57014", "canceling statement due to"),
    // admin_shutdown (fast shutdown, pg_terminate_backend), crash_shutdown.
    (
        "57P01",
        "terminating connection due to administrator command",
    ),
    (
        "57P02",
        "terminating connection because of crash of another server process",
    ),
    // cannot_connect_now: starting up, shutting down, in recovery.
    ("57P03", "the database system is"),
    // too_many_connections.
    ("53300", "sorry, too many clients already"),
    ("53300", "too many connections for"),
    ("53300", "remaining connection slots are reserved"),
    // lock_not_available (lock_timeout): the row is busy, not broken.
    ("55P03", "canceling statement due to lock timeout"),
];

/// A write's commit: the id of its transaction (`txid_current()`), which the change feed
/// records with each change, and the WAL position its commit is at (`lsn`; with replicas
/// only, 0 without). The cache tags the write's invalidation with both: the feed can tell
/// the change was invalidated already (`cache::redis::INVALIDATE_SCRIPT`), and a reader
/// which replica has replayed it (`db::replicas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub txid: i64,
    pub lsn: Lsn,
}

/// `txid_current()` in a `RETURNING` list.
fn txid() -> diesel::expression::SqlLiteral<diesel::sql_types::BigInt> {
    diesel::dsl::sql::<diesel::sql_types::BigInt>("txid_current()")
}

/// An update's result: the row, its transaction, and the name it had before if the update
/// changed it.
#[derive(Debug)]
pub struct Updated {
    pub item: Item,
    pub commit: Commit,
    pub old_name: Option<String>,
}

/// A delete's result: its transaction, and the name the row had.
#[derive(Debug)]
pub struct Deleted {
    pub commit: Commit,
    pub name: String,
}

/// The `UPDATE` of [`ItemRepo::update_item`], on a connection that may be in a transaction.
async fn apply_patch(
    conn: &mut diesel_async::AsyncPgConnection,
    id: ItemId,
    patch: &ItemPatch,
    expected: Option<&[i64]>,
) -> diesel::QueryResult<Option<(Item, i64)>> {
    let target = items::table.filter(items::id.eq(id.get()));
    match expected {
        Some(versions) => {
            diesel::update(target.filter(items::version.eq_any(versions.to_vec())))
                .set(patch)
                .returning((Item::as_returning(), txid()))
                .get_result::<(Item, i64)>(conn)
                .await
        }
        None => {
            diesel::update(target)
                .set(patch)
                .returning((Item::as_returning(), txid()))
                .get_result::<(Item, i64)>(conn)
                .await
        }
    }
    .optional()
}

/// What an update or delete guarded by `If-Match` came to.
#[derive(Debug)]
pub enum WriteOutcome<T> {
    Done(T),
    NotFound,
    /// The row exists at another version than the client expected.
    VersionConflict,
}

/// How many Postgres operations may be in flight (running or waiting for a connection)
/// per pooled connection. Beyond that the service sheds at once: a queue longer than a few
/// rounds of the pool only makes every waiter late.
pub const IN_FLIGHT_PER_CONNECTION: usize = 8;

/// The `items` table.
#[derive(Clone)]
pub struct ItemRepo {
    pool: Arc<Pools>,
    /// Streaming replicas that may answer cache misses (none by default).
    replicas: Replicas,
    gate: Arc<Semaphore>,
    /// Whether the last connection attempt failed: outages are logged when they start
    /// and end, not once per request.
    down: Arc<AtomicBool>,
}

impl ItemRepo {
    pub fn new(pool: Pools, replicas: Replicas) -> ItemRepo {
        let size = pool.max_size();
        ItemRepo {
            pool: Arc::new(pool),
            replicas,
            gate: Arc::new(Semaphore::new(size * IN_FLIGHT_PER_CONNECTION)),
            down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A connection, and the permit that counts this operation as in flight. Refuses at
    /// once when too many wait already; waits for the pool at most its wait timeout.
    async fn checkout(
        &self,
    ) -> Result<(Object<diesel_async::AsyncPgConnection>, SemaphorePermit<'_>), RepoError> {
        let permit = self.gate.try_acquire().map_err(|_| RepoError::Overloaded)?;
        match self.pool.get().await {
            Ok(conn) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("postgres answers again");
                }
                Ok((conn, permit))
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "postgres unavailable: answering from the cache where possible, 503 otherwise");
                }
                Err(e.into())
            }
        }
    }

    pub fn pool(&self) -> &Arc<Pools> {
        &self.pool
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// A read of a cache miss: on a replica that has replayed `at_least` (the position of
    /// the newest write the reader noted a stamp of) and is within the lag bound, else on
    /// the primary. `None`: the primary (a reader that noted no stamps, so knows of no
    /// position). A replica that fails as an outage is marked down and the read goes on to
    /// the primary at once.
    async fn read<T, F>(
        &self,
        query: DbQuery,
        at_least: Option<Lsn>,
        run: F,
    ) -> Result<T, RepoError>
    where
        F: for<'c> Fn(&'c mut diesel_async::AsyncPgConnection) -> BoxFuture<'c, QueryResult<T>>,
    {
        let started = Instant::now();
        if let Some(at_least) = at_least {
            match self.replicas.choose(at_least) {
                Ok(replica) => {
                    let _in_flight = self.gate.try_acquire().map_err(|_| RepoError::Overloaded)?;
                    let result = match replica.pool().get().await {
                        Ok(mut conn) => run(&mut conn).await.map_err(RepoError::from),
                        Err(e) => Err(RepoError::from(e)),
                    };
                    match result {
                        Ok(value) => {
                            metrics::record_db_query(query, started.elapsed());
                            metrics::record_db_read(ReadTarget::Replica);
                            return Ok(value);
                        }
                        Err(RepoError::Unavailable(_)) => {
                            replica.mark_down();
                            metrics::record_replica_fallback(ReplicaFallback::Down);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(why) => metrics::record_replica_fallback(why),
            }
        }
        let (mut conn, _in_flight) = self.checkout().await?;
        let value = run(&mut conn).await;
        metrics::record_db_query(query, started.elapsed());
        metrics::record_db_read(ReadTarget::Primary);
        Ok(value?)
    }

    /// A write's commit, right after it on its connection: the WAL position is asked for
    /// only when replicas are configured. If that fails, the position is unknown: the
    /// highest, so no replica serves this write's id until a later write stamps it.
    async fn commit(&self, conn: &mut diesel_async::AsyncPgConnection, txid: i64) -> Commit {
        #[derive(diesel::QueryableByName)]
        struct Position {
            #[diesel(sql_type = diesel::sql_types::Text)]
            lsn: String,
        }
        let lsn = if self.replicas.is_empty() {
            0
        } else {
            diesel::sql_query("SELECT pg_current_wal_insert_lsn()::text AS lsn")
                .get_result::<Position>(conn)
                .await
                .ok()
                .and_then(|p| parse_lsn(&p.lsn))
                .unwrap_or(Lsn::MAX)
        };
        Commit { txid, lsn }
    }

    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn get_item(
        &self,
        id: ItemId,
        at_least: Option<Lsn>,
    ) -> Result<Option<Item>, RepoError> {
        self.read(DbQuery::GetItem, at_least, |conn| {
            items::table
                .find(id.get())
                .select(Item::as_select())
                .first(conn)
                .map(OptionalExtension::optional)
                .boxed()
        })
        .await
    }

    /// One `= ANY($1)` query for all ids; the rows come back in no particular order.
    #[tracing::instrument(skip_all, fields(item.count = ids.len()))]
    pub async fn get_items(
        &self,
        ids: &[ItemId],
        at_least: Option<Lsn>,
    ) -> Result<Vec<Item>, RepoError> {
        let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
        self.read(DbQuery::GetItems, at_least, |conn| {
            items::table
                .filter(items::id.eq_any(raw.clone()))
                .select(Item::as_select())
                .load(conn)
                .boxed()
        })
        .await
    }

    /// Keyset page: ids greater than `after`, ascending.
    #[tracing::instrument(skip_all)]
    pub async fn list_items(&self, after: i64, limit: i64) -> Result<Vec<Item>, RepoError> {
        let started = Instant::now();
        let (mut conn, _in_flight) = self.checkout().await?;
        let rows = items::table
            .filter(items::id.gt(after))
            .order(items::id.asc())
            .limit(limit)
            .select(Item::as_select())
            .load(&mut conn)
            .await;
        metrics::record_db_query(DbQuery::ListItems, started.elapsed());
        Ok(rows?)
    }

    /// The ids of the first `limit` items named exactly `name`, ascending (an index-only
    /// scan of `items_name_id`).
    #[tracing::instrument(skip_all)]
    pub async fn ids_by_name(
        &self,
        name: &str,
        limit: i64,
        at_least: Option<Lsn>,
    ) -> Result<Vec<ItemId>, RepoError> {
        let ids = self
            .read(DbQuery::IdsByName, at_least, |conn| {
                items::table
                    .filter(items::name.eq(name.to_owned()))
                    .order(items::id.asc())
                    .limit(limit)
                    .select(items::id)
                    .load::<i64>(conn)
                    .boxed()
            })
            .await?;
        Ok(ids.into_iter().filter_map(ItemId::new).collect())
    }

    /// Keyset page of the items named exactly `name`: ids greater than `after`, ascending.
    #[tracing::instrument(skip_all)]
    pub async fn list_by_name(
        &self,
        name: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Item>, RepoError> {
        let started = Instant::now();
        let (mut conn, _in_flight) = self.checkout().await?;
        let rows = items::table
            .filter(items::name.eq(name))
            .filter(items::id.gt(after))
            .order(items::id.asc())
            .limit(limit)
            .select(Item::as_select())
            .load(&mut conn)
            .await;
        metrics::record_db_query(DbQuery::ListByName, started.elapsed());
        Ok(rows?)
    }

    #[tracing::instrument(skip_all)]
    pub async fn insert_item(&self, new: &NewItem) -> Result<(Item, Commit), RepoError> {
        let started = Instant::now();
        let (mut conn, _in_flight) = self.checkout().await?;
        let item = diesel::insert_into(items::table)
            .values(new)
            .returning((Item::as_returning(), txid()))
            .get_result::<(Item, i64)>(&mut conn)
            .await;
        metrics::record_db_query(DbQuery::InsertItem, started.elapsed());
        let (item, txid) = item?;
        let commit = self.commit(&mut conn, txid).await;
        Ok((item, commit))
    }

    /// Applies `patch` if the row is at one of the `expected` versions (`If-Match`), or
    /// unconditionally without them. The trigger bumps `version` and `updated_at`.
    ///
    /// A rename also returns the name it replaced (lookups by name drop the item from that
    /// name's result): read under the row lock, in the same transaction, so that it is the
    /// name this update changed even when another rename raced it.
    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn update_item(
        &self,
        id: ItemId,
        patch: &ItemPatch,
        expected: Option<&[i64]>,
    ) -> Result<WriteOutcome<Updated>, RepoError> {
        let started = Instant::now();
        let (mut conn, _in_flight) = self.checkout().await?;
        let updated = if patch.name.is_some() {
            conn.transaction(async |conn| {
                let old: Option<String> = items::table
                    .find(id.get())
                    .select(items::name)
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?;
                let Some(old) = old else { return Ok(None) };
                let updated = apply_patch(conn, id, patch, expected).await?;
                Ok::<_, DieselError>(updated.map(|(item, txid)| (item, txid, Some(old))))
            })
            .await
        } else {
            apply_patch(&mut conn, id, patch, expected)
                .await
                .map(|updated| updated.map(|(item, txid)| (item, txid, None)))
        };
        metrics::record_db_query(DbQuery::UpdateItem, started.elapsed());
        match updated? {
            Some((item, txid, old_name)) => Ok(WriteOutcome::Done(Updated {
                old_name: old_name.filter(|old| *old != item.name),
                item,
                commit: self.commit(&mut conn, txid).await,
            })),
            None => Ok(self.why_not_written(&mut conn, id).await?),
        }
    }

    /// Deletes the row if it is at one of the `expected` versions, or unconditionally.
    #[tracing::instrument(skip_all, fields(item.id = %id))]
    pub async fn delete_item(
        &self,
        id: ItemId,
        expected: Option<&[i64]>,
    ) -> Result<WriteOutcome<Deleted>, RepoError> {
        let started = Instant::now();
        let (mut conn, _in_flight) = self.checkout().await?;
        let target = items::table.filter(items::id.eq(id.get()));
        let deleted = match expected {
            Some(versions) => {
                diesel::delete(target.filter(items::version.eq_any(versions.to_vec())))
                    .returning((txid(), items::name))
                    .get_result::<(i64, String)>(&mut conn)
                    .await
            }
            None => {
                diesel::delete(target)
                    .returning((txid(), items::name))
                    .get_result::<(i64, String)>(&mut conn)
                    .await
            }
        }
        .optional();
        metrics::record_db_query(DbQuery::DeleteItem, started.elapsed());
        match deleted? {
            None => Ok(self.why_not_written(&mut conn, id).await?),
            Some((txid, name)) => Ok(WriteOutcome::Done(Deleted {
                commit: self.commit(&mut conn, txid).await,
                name,
            })),
        }
    }

    /// A guarded write touched no row: either the item is gone or its version moved on.
    async fn why_not_written<T>(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        id: ItemId,
    ) -> Result<WriteOutcome<T>, RepoError> {
        let exists: bool = diesel::select(diesel::dsl::exists(items::table.find(id.get())))
            .get_result(conn)
            .await?;
        Ok(if exists {
            WriteOutcome::VersionConflict
        } else {
            WriteOutcome::NotFound
        })
    }

    /// The row's version and the time since it was written, both by the primary's clock
    /// (the consistency checker, `verify`); `None` if the row is gone. Not a `query` label
    /// of its own: it is the checker's, off the request path.
    pub async fn version_and_age(
        &self,
        id: ItemId,
    ) -> Result<Option<(i64, std::time::Duration)>, RepoError> {
        #[derive(diesel::QueryableByName)]
        struct Age {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            version: i64,
            #[diesel(sql_type = diesel::sql_types::Double)]
            age: f64,
        }
        let (mut conn, _in_flight) = self.checkout().await?;
        let row: Option<Age> = diesel::sql_query(
            "SELECT version, extract(epoch FROM clock_timestamp() - updated_at)::float8 AS age \
             FROM items WHERE id = $1",
        )
        .bind::<diesel::sql_types::BigInt, _>(id.get())
        .get_result(&mut conn)
        .await
        .optional()?;
        Ok(row.map(|r| {
            (
                r.version,
                std::time::Duration::from_secs_f64(r.age.max(0.0)),
            )
        }))
    }

    /// `SELECT 1`, for `/readyz`.
    pub async fn ping(&self) -> Result<(), RepoError> {
        let (mut conn, _in_flight) = self.checkout().await?;
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("1"))
            .get_result::<i32>(&mut conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database_error(kind: DatabaseErrorKind, message: &str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn outages_are_told_from_bugs() {
        use DatabaseErrorKind::*;
        let outages = [
            (Unknown, "canceling statement due to statement timeout"),
            (Unknown, "canceling statement due to user request"),
            (Unknown, "canceling statement due to lock timeout"),
            (
                Unknown,
                "terminating connection due to administrator command",
            ),
            (
                Unknown,
                "terminating connection because of crash of another server process",
            ),
            (Unknown, "the database system is starting up"),
            (Unknown, "the database system is shutting down"),
            (Unknown, "the database system is in recovery mode"),
            (Unknown, "sorry, too many clients already"),
            (Unknown, "too many connections for role \"app\""),
            (
                ReadOnlyTransaction,
                "cannot execute UPDATE in a read-only transaction",
            ),
            (
                ClosedConnection,
                "server closed the connection unexpectedly",
            ),
            (UnableToSendCommand, "connection closed"),
        ];
        for (kind, message) in outages {
            let error = RepoError::from(database_error(kind, message));
            assert!(
                matches!(error, RepoError::Unavailable(_)),
                "{message}: {error:?}"
            );
        }
        let bugs = [
            (Unknown, "relation \"items\" does not exist"),
            (Unknown, "syntax error at or near \"SELEC\""),
            (
                UniqueViolation,
                "duplicate key value violates unique constraint",
            ),
            (
                CheckViolation,
                "new row for relation \"items\" violates check constraint",
            ),
            (SerializationFailure, "could not serialize access"),
        ];
        for (kind, message) in bugs {
            let error = RepoError::from(database_error(kind, message));
            assert!(matches!(error, RepoError::Query(_)), "{message}: {error:?}");
        }
        assert!(matches!(
            RepoError::from(DieselError::NotFound),
            RepoError::Query(_)
        ));
    }

    #[test]
    fn every_listed_sqlstate_is_an_outage() {
        for (code, message) in OUTAGE_MESSAGES {
            let error = RepoError::from(database_error(DatabaseErrorKind::Unknown, message));
            assert!(matches!(error, RepoError::Unavailable(_)), "{code}");
        }
    }
}
