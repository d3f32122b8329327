//! The change feed's SQL: the `item_changes` queue that the migration's triggers fill, read
//! and emptied by the applier on its own connection. Knows SQL, not Redis.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db;
use crate::db::replicas::{Lsn, parse_lsn};

/// The channel the triggers `NOTIFY` on.
pub const CHANNEL: &str = "itemcache_changes";

/// The advisory lock whose holder applies the feed to Redis ("itemcach" in ASCII). Advisory
/// locks are per database, so one applier per database.
const APPLIER_LOCK: i64 = 0x6974_656d_6361_6368;

/// One committed change of `items`.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct Change {
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    /// `None` for a truncate.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub item_id: Option<i64>,
    /// `I`, `U`, `D` or `T`.
    #[diesel(sql_type = Text)]
    pub op: String,
    #[diesel(sql_type = Timestamptz)]
    pub changed_at: DateTime<Utc>,
    /// The writing transaction (`txid_current()`).
    #[diesel(sql_type = BigInt)]
    pub xid: i64,
    /// The row's name before the change (updates, deletes).
    #[diesel(sql_type = Nullable<Text>)]
    pub old_name: Option<String>,
    /// The row's name after the change (inserts, updates).
    #[diesel(sql_type = Nullable<Text>)]
    pub new_name: Option<String>,
    /// The primary's WAL insert position when the change was read: at or past its commit
    /// (it was visible, so committed, and its commit record inserted).
    #[diesel(sql_type = Text)]
    pub read_at: String,
}

impl Change {
    pub fn is_truncate(&self) -> bool {
        self.op == "T"
    }

    /// [`Change::read_at`] as a number (the highest if it does not parse: no replica is
    /// then trusted with this change's rows until a later write).
    pub fn lsn(&self) -> Lsn {
        parse_lsn(&self.read_at).unwrap_or(Lsn::MAX)
    }

    /// The names whose lookups this change alters: the name an item got or lost (an
    /// update that kept the name alters none).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let moved = self.old_name != self.new_name;
        [&self.old_name, &self.new_name]
            .into_iter()
            .filter_map(move |name| name.as_deref().filter(|_| moved))
    }
}

/// A dedicated connection (not pooled: it holds the applier's lock and its `LISTEN` for as
/// long as it lives), listening on [`CHANNEL`].
pub async fn listen(database_url: &str) -> Result<AsyncPgConnection, diesel::ConnectionError> {
    let mut conn = tokio::time::timeout(
        db::POOL_CREATE_TIMEOUT,
        db::connect(database_url.to_owned()),
    )
    .await
    .map_err(|_| diesel::ConnectionError::BadConnection("connecting timed out".to_owned()))??;
    // The server notices a vanished follower in ~25 s, not the 2 h default, and so frees
    // the applier's lock for another instance.
    for setup in [
        "SET tcp_keepalives_idle = 10".to_owned(),
        "SET tcp_keepalives_interval = 5".to_owned(),
        "SET tcp_keepalives_count = 3".to_owned(),
        "SET tcp_user_timeout = 25000".to_owned(),
        format!("LISTEN {CHANNEL}"),
    ] {
        diesel::sql_query(setup)
            .execute(&mut conn)
            .await
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    }
    Ok(conn)
}

/// Takes the applier role if nobody holds it; held until the connection closes.
pub async fn try_take_role(conn: &mut AsyncPgConnection) -> diesel::QueryResult<bool> {
    #[derive(diesel::QueryableByName)]
    struct Taken {
        #[diesel(sql_type = Bool)]
        taken: bool,
    }
    let taken: Taken = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS taken")
        .bind::<BigInt, _>(APPLIER_LOCK)
        .get_result(conn)
        .await?;
    Ok(taken.taken)
}

/// Lets the applier role go (another follower may take it).
pub async fn give_up_role(conn: &mut AsyncPgConnection) -> diesel::QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(APPLIER_LOCK)
        .execute(conn)
        .await
        .map(drop)
}

/// The oldest `limit` changes still queued. Every committed change is there until it is
/// deleted, whatever order transactions committed in (a cursor over `seq` would skip a
/// change whose transaction took its number early and committed late).
pub async fn oldest(conn: &mut AsyncPgConnection, limit: i64) -> diesel::QueryResult<Vec<Change>> {
    diesel::sql_query(
        "SELECT seq, item_id, op::text AS op, changed_at, xid, old_name, new_name, \
                pg_current_wal_insert_lsn()::text AS read_at \
         FROM item_changes ORDER BY seq LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await
}

/// Deletes applied changes.
pub async fn delete(conn: &mut AsyncPgConnection, seqs: &[i64]) -> diesel::QueryResult<usize> {
    diesel::sql_query("DELETE FROM item_changes WHERE seq = ANY($1)")
        .bind::<Array<BigInt>, _>(seqs)
        .execute(conn)
        .await
}

/// How many changes are queued, at most: the span of queued sequence numbers (two index
/// lookups, however long the queue; rolled-back numbers inside the span count too).
pub async fn backlog(conn: &mut AsyncPgConnection) -> diesel::QueryResult<u64> {
    #[derive(diesel::QueryableByName)]
    struct Span {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let span: Span = diesel::sql_query(
        "SELECT coalesce(max(seq) - min(seq) + 1, 0)::bigint AS n FROM item_changes",
    )
    .get_result(conn)
    .await?;
    Ok(span.n.max(0) as u64)
}
