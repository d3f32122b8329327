//! Contract behaviour 9: cache misses read a streaming standby only when it has replayed
//! the write the reader noted, so no read returns a version older than an acknowledged
//! write, whatever the standby's lag; a standby down or lagging sends misses to the
//! primary without errors. The standby is real (`pg_basebackup -R` from the test's own
//! primary); its replay is paused and resumed with `pg_wal_replay_pause()`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde_json::{Value, json};

use crate::support::{Backends, Spawn, TestApp, eventually, staleness};

const SETTLE: Duration = Duration::from_secs(10);

/// An app on its own primary and standby, reading misses from the standby.
async fn app_with_replica() -> TestApp {
    let backends = Backends::with_standby().await;
    let database = backends.new_database().await;
    let standby = backends.standby.as_ref().expect("a standby").port;
    let app = Spawn::default()
        .backends(backends.clone())
        .database(&database)
        .var(
            "DATABASE_REPLICA_URL",
            format!("postgres://postgres@127.0.0.1:{standby}/{database}"),
        )
        .start()
        .await;
    eventually("the replica to be tracked", SETTLE, || async {
        let ready: Value = app.get("/readyz").await.json().await.ok()?;
        (ready["replicas"] == "ok").then_some(())
    })
    .await;
    app
}

async fn on_standby(app: &TestApp) -> AsyncPgConnection {
    let standby = app.backends.standby.as_ref().expect("a standby");
    AsyncPgConnection::establish(&standby.url(&app.database))
        .await
        .expect("connect to the standby")
}

async fn standby_sql(app: &TestApp, sql: &str) {
    let mut conn = on_standby(app).await;
    diesel_async::RunQueryDsl::execute(diesel::sql_query(sql), &mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Reads of `items` the standby has answered (pg_stat_statements counts there too).
async fn standby_reads(app: &TestApp) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Calls {
        #[diesel(sql_type = BigInt)]
        calls: i64,
    }
    let mut conn = on_standby(app).await;
    let calls: Calls = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT coalesce(sum(calls), 0)::bigint AS calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query ILIKE 'SELECT%FROM \"items\"%'",
        ),
        &mut conn,
    )
    .await
    .expect("pg_stat_statements on the standby");
    calls.calls
}

async fn version(app: &TestApp, id: i64) -> i64 {
    let response = app.get_item(id).await;
    assert_eq!(response.status(), 200, "GET /items/{id}");
    response.json::<Value>().await.unwrap()["version"]
        .as_i64()
        .unwrap()
}

/// A miss of `id`: evicted, then read.
async fn miss(app: &TestApp, id: i64) -> i64 {
    assert_eq!(app.evict(id).await.status(), 204);
    version(app, id).await
}

#[tokio::test]
async fn a_paused_standby_never_serves_a_write_it_has_not_replayed() {
    let app = app_with_replica().await;
    let ids = app.insert_items(2).await;
    // Misses go to the standby while it keeps up.
    let before = standby_reads(&app).await;
    eventually("a miss to be read on the standby", SETTLE, || async {
        miss(&app, ids[0]).await;
        (standby_reads(&app).await > before).then_some(())
    })
    .await;

    standby_sql(&app, "SELECT pg_wal_replay_pause()").await;
    // Through the API: every read after the 200 shows it, misses included.
    assert_eq!(
        app.patch_item(ids[0], &json!({"price_cents": 5}))
            .await
            .status(),
        200
    );
    for _ in 0..20 {
        assert_eq!(miss(&app, ids[0]).await, 2);
    }
    // Through psql: once the change feed has applied it, likewise.
    app.sql(&format!(
        "UPDATE items SET price_cents = 6 WHERE id = {}",
        ids[1]
    ))
    .await;
    app.settle_feed().await;
    for _ in 0..20 {
        assert_eq!(miss(&app, ids[1]).await, 2);
    }
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    eprintln!("with replay paused: {ready}");

    standby_sql(&app, "SELECT pg_wal_replay_resume()").await;
    let before = standby_reads(&app).await;
    eventually("misses to go back to the standby", SETTLE, || async {
        assert_eq!(miss(&app, ids[0]).await, 2);
        (standby_reads(&app).await > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_standby_killed_under_load_costs_no_errors() {
    let app = Arc::new(app_with_replica().await);
    let ids = Arc::new(app.insert_items(5).await);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..4)
        .map(|n| {
            let (app, ids, stop, errors, reads) = (
                app.clone(),
                ids.clone(),
                stop.clone(),
                errors.clone(),
                reads.clone(),
            );
            tokio::spawn(async move {
                let mut k = n;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let id = ids[k % ids.len()];
                    app.evict(id).await;
                    let response = app.get_item(id).await;
                    if response.status() != 200 {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "{}: {}",
                            response.status(),
                            response.text().await.unwrap_or_default()
                        );
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.backends.standby.as_ref().expect("a standby").stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    eprintln!(
        "{} reads around the standby's death",
        reads.load(Ordering::Relaxed)
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["replicas"], "degraded", "{ready}");
}

/// The staleness checker (writers through the API and behind its back, evictions forcing
/// misses, readers) with the standby's replay paused and resumed at random: no read returns
/// a version older than one acknowledged before it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_randomly_lagging_standby_no_read_goes_back_in_time() {
    let app = Arc::new(app_with_replica().await);
    let ids = app.insert_items(3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut paused = false;
            let mut n = 7u64;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
                let sql = if paused {
                    "SELECT pg_wal_replay_resume()"
                } else {
                    "SELECT pg_wal_replay_pause()"
                };
                standby_sql(&app, sql).await;
                paused = !paused;
                tokio::time::sleep(Duration::from_millis(100 + (n >> 40) % 500)).await;
            }
            standby_sql(&app, "SELECT pg_wal_replay_resume()").await;
        })
    };
    let report = staleness::check(
        &app,
        std::slice::from_ref(&app.address),
        &ids,
        Duration::from_secs(4),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    toggler.await.unwrap();
    assert!(
        report.reads > 50 && report.writes > 20,
        "the checker did real work: {report:?}"
    );
    assert_eq!(report.stale, 0, "{report:?}");
}
