//! Postgres: the diesel-async connection pools and the embedded migrations.
//!
//! The binary links no libpq: migrations run through diesel-async's
//! `AsyncConnectionWrapper` on a blocking thread, which works on any runtime.
//!
//! ## Where connections live
//! A Postgres connection is two halves: the client the pool lends, and a driver task that
//! writes queries and reads replies, spawned on whatever runtime made the connection. The
//! pool makes connections lazily, inside the request that first needs one, so left alone
//! the drivers would run on the actix workers, each on the worker that happened to need a
//! new connection. On a graceful stop actix ends an idle worker's runtime first, and with it
//! the drivers of connections that a busy worker is still using: an in-flight read then
//! failed with 503. So every shared connection is made on the main runtime, which outlives
//! every worker, and its driver runs there; a worker's own connections (`pools`) are made
//! on it and used by it alone.

pub mod pools;
pub mod replicas;

pub use pools::Pools;

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type PgPool = Pool<AsyncPgConnection>;

/// How long a request waits for a pooled connection, or for a new one to be made, before
/// it gives up: an exhausted or unreachable Postgres must answer 503, never hang.
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(2);
pub const POOL_CREATE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a statement may run: a lock or a runaway query must not hold a connection
/// (and a client) forever. Set on every connection; far above any query of ours.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    #[error("could not build the Postgres pool")]
    Pool(#[source] diesel_async::pooled_connection::deadpool::BuildError),
    #[error("could not connect to Postgres to migrate")]
    Connect(#[source] diesel::ConnectionError),
    #[error("migrations failed")]
    Migrate(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A pool of `size` connections at most, every wait bounded. `on_main`: its connections
/// are made on the main runtime (call it there; see the module docs), else on the runtime
/// of the task that needs a new one (an HTTP worker's own, `pools`).
pub fn pool(database_url: &str, size: usize, on_main: bool) -> Result<PgPool, DbSetupError> {
    let mut config = ManagerConfig::default();
    // `Verified` (the default) sends a query on every checkout: one more round trip on
    // every miss. A dead connection fails its first real query instead, which the repo
    // classifies as "unavailable", and the pool drops it.
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = if on_main {
        let main = tokio::runtime::Handle::current();
        Box::new(move |url| {
            let made = main.spawn(connect(url.to_owned()));
            Box::pin(async move {
                made.await.unwrap_or_else(|e| {
                    Err(diesel::ConnectionError::BadConnection(format!(
                        "connecting was cancelled: {e}"
                    )))
                })
            })
        })
    } else {
        Box::new(|url| Box::pin(connect(url.to_owned())))
    };
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(POOL_CREATE_TIMEOUT))
        .recycle_timeout(Some(POOL_CREATE_TIMEOUT))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(DbSetupError::Pool)
}

/// A new pooled connection, with the statement timeout set.
pub(crate) async fn connect(url: String) -> diesel::ConnectionResult<AsyncPgConnection> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut conn = AsyncPgConnection::establish(&url).await?;
    diesel::sql_query(format!(
        "SET statement_timeout = {}",
        STATEMENT_TIMEOUT.as_millis()
    ))
    .execute(&mut conn)
    .await
    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Applies pending migrations; returns how many ran.
pub async fn run_migrations(database_url: &str) -> Result<usize, DbSetupError> {
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn =
            <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(&url)
                .map_err(DbSetupError::Connect)?;
        conn.run_pending_migrations(MIGRATIONS)
            .map(|applied| applied.len())
            .map_err(DbSetupError::Migrate)
    })
    .await
    .map_err(|e| DbSetupError::Migrate(Box::new(e)))?
}
