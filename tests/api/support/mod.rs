//! The test harness: private Postgres and Redis for the whole test process, a database
//! and key prefix per test, and the real application on a free port, driven over HTTP.

pub mod proxy;
pub mod servers;
pub mod staleness;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use itemcache::app::Application;
use itemcache::config::Settings;
use reqwest::{Method, Response};
use serde_json::Value;
use tokio::sync::OnceCell;

pub use servers::{PgServer, RedisServer};

/// The template every test database is copied from: migrated once.
const TEMPLATE: &str = "itemcache_template";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A Postgres and a Redis, with the migrated template database, and a streaming standby
/// of the Postgres for the tests that ask for one.
pub struct Backends {
    pub pg: PgServer,
    pub redis: RedisServer,
    pub standby: Option<PgServer>,
}

impl Backends {
    /// The servers shared by every test that does not stop them.
    pub async fn shared() -> Arc<Backends> {
        static SHARED: OnceCell<Arc<Backends>> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async { Arc::new(Backends::start().await) })
            .await
            .clone()
    }

    /// Servers of a test's own, for tests that stop, freeze or kill them.
    pub async fn dedicated() -> Arc<Backends> {
        Arc::new(Backends::start().await)
    }

    /// Servers of a test's own with a streaming standby of the Postgres (made after the
    /// template, so it has it; databases made later reach it by replication).
    pub async fn with_standby() -> Arc<Backends> {
        let mut backends = Backends::start().await;
        // Blocks this test's thread for the base backup (a second or two): nothing else of
        // the test runs yet.
        backends.standby = Some(PgServer::standby_of(&backends.pg));
        Arc::new(backends)
    }

    async fn start() -> Backends {
        let (pg, redis) = tokio::task::spawn_blocking(|| (PgServer::start(), RedisServer::start()))
            .await
            .expect("servers start");
        let backends = Backends {
            pg,
            redis,
            standby: None,
        };
        backends
            .run_sql("postgres", &format!("CREATE DATABASE {TEMPLATE}"))
            .await;
        backends
            .run_sql(
                TEMPLATE,
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
            )
            .await;
        itemcache::db::run_migrations(&backends.pg.url(TEMPLATE))
            .await
            .expect("migrate the template");
        backends
    }

    pub async fn connect(&self, database: &str) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.pg.url(database))
            .await
            .expect("connect to the test postgres")
    }

    pub async fn run_sql(&self, database: &str, sql: &str) {
        let mut conn = self.connect(database).await;
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A fresh database copied from the template.
    pub async fn new_database(&self) -> String {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.run_sql(
            "postgres",
            &format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"),
        )
        .await;
        name
    }
}

/// Runs `args` (a command and its arguments) on `conn`; returns its reply.
pub async fn command<T: redis::FromRedisValue>(
    conn: &mut impl redis::aio::ConnectionLike,
    args: &[&str],
) -> T {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// How to configure one test's application.
#[derive(Default)]
pub struct Spawn {
    backends: Option<Arc<Backends>>,
    database: Option<String>,
    vars: HashMap<String, String>,
}

impl Spawn {
    /// Sets a configuration variable (the contract's names).
    pub fn var(mut self, name: &str, value: impl ToString) -> Spawn {
        self.vars.insert(name.to_owned(), value.to_string());
        self
    }

    /// Entries fresh for exactly `fresh_secs` (no jitter), then served while they are
    /// revalidated for `swr_secs` (0: they expire at once).
    pub fn ttl(self, fresh_secs: u64, swr_secs: u64) -> Spawn {
        self.var("CACHE_TTL_SECS", fresh_secs)
            .var("CACHE_TTL_JITTER", 0)
            .var("CACHE_SWR_SECS", swr_secs)
    }

    pub fn backends(mut self, backends: Arc<Backends>) -> Spawn {
        self.backends = Some(backends);
        self
    }

    /// Uses this (migrated) database instead of a new one: another instance of the same
    /// deployment, or a database the test made.
    pub fn database(mut self, name: &str) -> Spawn {
        self.database = Some(name.to_owned());
        self
    }

    pub async fn start(self) -> TestApp {
        let backends = match self.backends {
            Some(b) => b,
            None => Backends::shared().await,
        };
        let database = match self.database {
            Some(name) => name,
            None => backends.new_database().await,
        };
        let prefix = format!(
            "t{}_{}:",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        TestApp::start(backends, database, prefix, self.vars).await
    }
}

/// A running application, its database and key prefix, and an HTTP client.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub database: String,
    pub prefix: String,
    pub backends: Arc<Backends>,
    pub client: reqwest::Client,
    vars: HashMap<String, String>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An app with the shared servers and default settings.
pub async fn spawn_app() -> TestApp {
    Spawn::default().start().await
}

impl TestApp {
    async fn start(
        backends: Arc<Backends>,
        database: String,
        prefix: String,
        vars: HashMap<String, String>,
    ) -> TestApp {
        let mut all: HashMap<String, String> = [
            ("DATABASE_URL", backends.pg.url(&database)),
            ("REDIS_URL", backends.redis.url()),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("CACHE_KEY_PREFIX", prefix.clone()),
            ("DB_POOL_SIZE", "8".to_owned()),
            ("REDIS_POOL_SIZE", "4".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        all.extend(vars.clone());
        if all.contains_key("REDIS_CLUSTER_NODES") {
            // A cluster is reached through its seeds; REDIS_URL with it is refused.
            all.remove("REDIS_URL");
        }
        let settings = Settings::from_vars(all).expect("valid test settings");
        itemcache::telemetry::init(settings.log_format, &settings.log_filter);

        // The application runs on a thread and runtime of its own, so it outlives nothing
        // and nothing of the test's runtime outlives it; dropping the TestApp stops it.
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("app runtime");
            runtime.block_on(async move {
                let app = match Application::build(settings).await {
                    Ok(app) => app,
                    Err(e) => {
                        let _ = port_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = port_tx.send(Ok(app.port()));
                let shutdown = async move {
                    let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                };
                let _ = app.run_until_stopped(shutdown).await;
            });
        });
        let port = port_rx.await.expect("app thread").expect("app builds");
        TestApp {
            address: format!("http://127.0.0.1:{port}"),
            port,
            database,
            prefix,
            backends,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            vars,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Another instance on the same database and Redis key prefix (a second replica).
    pub async fn another_instance(&self) -> TestApp {
        TestApp::start(
            self.backends.clone(),
            self.database.clone(),
            self.prefix.clone(),
            self.vars.clone(),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn request(&self, method: Method, path: &str) -> Response {
        self.client
            .request(method, self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path).await
    }

    pub async fn get_item(&self, id: i64) -> Response {
        self.get(&format!("/items/{id}")).await
    }

    pub async fn post_item(&self, body: &Value) -> Response {
        self.client
            .post(self.url("/items"))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn patch_item(&self, id: i64, body: &Value) -> Response {
        self.client
            .patch(self.url(&format!("/items/{id}")))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn delete_item(&self, id: i64) -> Response {
        self.request(Method::DELETE, &format!("/items/{id}")).await
    }

    pub async fn evict(&self, id: i64) -> Response {
        self.request(Method::DELETE, &format!("/cache/items/{id}"))
            .await
    }

    /// Creates an item through the API and returns its JSON.
    pub async fn create_item(&self, name: &str, price_cents: i64) -> Value {
        let response = self
            .post_item(&serde_json::json!({"name": name, "price_cents": price_cents}))
            .await;
        assert_eq!(response.status(), 201, "create {name}");
        response.json().await.expect("item json")
    }

    /// Inserts `count` items straight into Postgres (no cache involved) and waits until the
    /// change feed has applied the inserts, so that a test starts from a settled cache;
    /// returns their ids.
    pub async fn insert_items(&self, count: i64) -> Vec<i64> {
        let ids = self.insert_items_unsettled(count).await;
        self.settle_feed().await;
        ids
    }

    /// Waits until the change feed has applied every change made so far.
    pub async fn settle_feed(&self) {
        #[derive(diesel::QueryableByName)]
        struct Queued {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let mut conn = self.backends.connect(&self.database).await;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let queued: Queued = diesel::sql_query("SELECT count(*) AS n FROM item_changes")
                .get_result(&mut conn)
                .await
                .expect("count queued changes");
            if queued.n == 0 {
                return;
            }
            assert!(
                Instant::now() < until,
                "the change feed left {} changes unapplied",
                queued.n
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`TestApp::insert_items`] without waiting for the change feed.
    pub async fn insert_items_unsettled(&self, count: i64) -> Vec<i64> {
        let mut conn = self.backends.connect(&self.database).await;
        #[derive(diesel::QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        let rows: Vec<Id> = diesel::sql_query(
            "INSERT INTO items (name, price_cents) SELECT 'item ' || n, n FROM generate_series(1, $1) n RETURNING id",
        )
        .bind::<BigInt, _>(count)
        .load(&mut conn)
        .await
        .expect("insert items");
        rows.into_iter().map(|r| r.id).collect()
    }

    /// A connection holding `items` locked (`ACCESS EXCLUSIVE`, in an open transaction):
    /// every read waits until it runs `COMMIT`.
    pub async fn lock_items(&self) -> AsyncPgConnection {
        let mut conn = self.backends.connect(&self.database).await;
        for sql in ["BEGIN", "LOCK TABLE items IN ACCESS EXCLUSIVE MODE"] {
            diesel::sql_query(sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        conn
    }

    /// Runs SQL against this test's database (behind the service's back).
    pub async fn sql(&self, sql: &str) {
        self.backends.run_sql(&self.database, sql).await;
    }

    /// Statements run against `items` in this test's database, by pg_stat_statements.
    pub async fn item_queries(&self) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Calls {
            #[diesel(sql_type = BigInt)]
            calls: i64,
        }
        let mut conn = self.backends.connect(&self.database).await;
        let calls: Calls = diesel::sql_query(
            "SELECT coalesce(sum(calls), 0)::bigint AS calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query ILIKE 'SELECT%FROM \"items\"%'",
        )
        .get_result(&mut conn)
        .await
        .expect("pg_stat_statements");
        calls.calls
    }

    /// Runs one command on the test's Redis (as the default user); returns its reply.
    pub async fn redis_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.backends.redis.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        command(&mut conn, args).await
    }

    /// The raw Redis value of `key` (under this test's prefix).
    pub async fn redis_get(&self, key: &str) -> Option<Vec<u8>> {
        let client = redis::Client::open(self.backends.redis.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .expect("GET")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The response's header as a string ("" when absent).
pub fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Asserts that `response` is an RFC 9457 problem document with `status` and `code` (and
/// every member the contract names); returns the document for further checks.
pub async fn assert_problem(response: Response, status: u16, code: &str) -> Value {
    let got_status = response.status().as_u16();
    let content_type = header(&response, "content-type");
    let text = response.text().await.expect("a body");
    assert_eq!(got_status, status, "status; body: {text}");
    assert_eq!(content_type, "application/problem+json", "body: {text}");
    let problem: Value = serde_json::from_str(&text).expect("the problem is JSON");
    assert_eq!(problem["code"], code, "{problem}");
    assert_eq!(problem["status"], status, "{problem}");
    for member in ["type", "title", "detail"] {
        assert!(problem[member].is_string(), "{member} in {problem}");
    }
    problem
}
