//! Contract behaviour 7: writes made by any Postgres client (here: plain SQL behind the
//! service's back, as psql would) are invalidated through the change feed, and none is
//! skipped across failures: the listener's connection killed, Postgres restarted, Redis
//! frozen, the applying instance killed.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use serde_json::Value;

use crate::cache_races::reader_paused_before_fill;
use crate::support::servers::{free_port, wait_for_port};
use crate::support::{Backends, Spawn, TestApp, eventually, header, spawn_app};

/// The feed applies a change within milliseconds of its commit (a `NOTIFY` wakes it); the
/// slow timer behind it reads the queue every second. Beyond that, a busy 2-core machine.
const APPLIED_WITHIN: Duration = Duration::from_secs(5);

async fn version(app: &TestApp, id: i64) -> Option<i64> {
    let response = app.get_item(id).await;
    match response.status().as_u16() {
        200 => Some(
            response.json::<Value>().await.unwrap()["version"]
                .as_i64()
                .unwrap(),
        ),
        404 => None,
        other => panic!("GET /items/{id}: {other}"),
    }
}

/// Reads `id` until it shows `expected` (a version, or `None` for 404).
async fn until_version(app: &TestApp, id: i64, expected: Option<i64>) {
    eventually(
        &format!("item {id} at {expected:?}"),
        APPLIED_WITHIN,
        || async { (version(app, id).await == expected).then_some(()) },
    )
    .await;
}

/// Reads `id` twice: a miss, then a hit (so its entry is in Redis).
async fn cache_it(app: &TestApp, id: i64) {
    app.get_item(id).await;
    assert_eq!(
        header(&app.get_item(id).await, "x-cache"),
        "HIT",
        "item {id} cached"
    );
}

async fn queued_changes(app: &TestApp) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = app.backends.connect(&app.database).await;
    let count: Count = diesel::sql_query("SELECT count(*) AS n FROM item_changes")
        .get_result(&mut conn)
        .await
        .unwrap();
    count.n
}

async fn until_applying(app: &TestApp) {
    eventually(
        "this instance to apply the feed",
        APPLIED_WITHIN,
        || async {
            let ready: Value = app.get("/readyz").await.json().await.unwrap();
            (ready["change_feed"] == "applying").then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn updates_deletes_inserts_and_truncates_from_psql_are_invalidated() {
    let app = spawn_app().await;
    let ids = app.insert_items(3).await;
    for &id in &ids {
        cache_it(&app, id).await;
    }
    let absent = ids[2] + 1000;
    assert_eq!(version(&app, absent).await, None);
    assert_eq!(
        header(&app.get_item(absent).await, "x-cache"),
        "HIT",
        "a cached not-found"
    );

    app.sql(&format!(
        "UPDATE items SET price_cents = 7 WHERE id = {}",
        ids[0]
    ))
    .await;
    until_version(&app, ids[0], Some(2)).await;

    app.sql(&format!("DELETE FROM items WHERE id = {}", ids[1]))
        .await;
    until_version(&app, ids[1], None).await;

    app.sql(&format!(
        "INSERT INTO items (id, name) OVERRIDING SYSTEM VALUE VALUES ({absent}, 'late')"
    ))
    .await;
    until_version(&app, absent, Some(1)).await;

    cache_it(&app, ids[2]).await;
    app.sql("TRUNCATE items").await;
    until_version(&app, ids[2], None).await;
    until_version(&app, absent, None).await;
    assert_eq!(
        queued_changes(&app).await,
        0,
        "every change applied and deleted"
    );
}

/// An API write is in the feed too; the feed finds its invalidation already applied (the
/// stamp carries the write's transaction) and leaves the entry filled since alone.
#[tokio::test]
async fn an_api_write_costs_one_miss_not_two() {
    let app = spawn_app().await;
    let id = app.create_item("once", 1).await["id"].as_i64().unwrap();
    let stamp = app.redis_get(&format!("stamp:{id}")).await;
    assert!(
        stamp.as_ref().is_some_and(|s| s.starts_with(b"t")),
        "the API's stamp carries its transaction: {stamp:?}"
    );
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
    eventually("the feed to apply the create", APPLIED_WITHIN, || async {
        (queued_changes(&app).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        app.redis_get(&format!("stamp:{id}")).await,
        stamp,
        "the feed found the write invalidated and left it alone"
    );
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
}

/// A reader paused between its Postgres read and its fill across a `TRUNCATE`: the flush
/// token it noted has been replaced, so it cannot store the row the truncate removed.
#[tokio::test]
async fn a_fill_from_before_a_truncate_is_refused() {
    let app = Arc::new(spawn_app().await);
    let id = app.insert_items(1).await[0];
    let (armed, reader) = reader_paused_before_fill(&app, id).await;
    app.sql("TRUNCATE items").await;
    app.settle_feed().await;
    armed.release();
    assert_eq!(
        reader.await.unwrap().status(),
        200,
        "it read before the truncate"
    );
    assert_eq!(
        app.redis_get(&format!("item:{id}")).await,
        None,
        "the fill was refused"
    );
    assert_eq!(version(&app, id).await, None);
}

/// A client allowed to write `items` and nothing else, with a search_path without the
/// table's schema: its write succeeds and is recorded (the trigger runs as its definer).
#[tokio::test]
async fn a_restricted_client_s_writes_are_recorded_too() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    cache_it(&app, id).await;
    let role = format!("writer_{}", app.database);
    app.sql(&format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    ))
    .await;
    app.sql(&format!("GRANT SELECT, UPDATE ON items TO {role}"))
        .await;
    let url = app
        .backends
        .pg
        .url(&app.database)
        .replace("postgres@", &format!("{role}@"));
    let mut conn =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url)
            .await
            .unwrap();
    diesel::sql_query("SET search_path = pg_catalog")
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query(format!(
        "UPDATE public.items SET price_cents = 2 WHERE id = {id}"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    until_version(&app, id, Some(2)).await;
}

/// A reader paused between its Postgres read and its fill while a psql write commits and
/// the feed applies it: the fill is refused, as for an API write.
#[tokio::test]
async fn a_fill_from_before_a_psql_write_is_refused() {
    let app = Arc::new(spawn_app().await);
    let id = app.insert_items(1).await[0];
    let (armed, reader) = reader_paused_before_fill(&app, id).await;
    app.sql(&format!("UPDATE items SET price_cents = 9 WHERE id = {id}"))
        .await;
    eventually("the feed to apply the update", APPLIED_WITHIN, || async {
        (queued_changes(&app).await == 0).then_some(())
    })
    .await;
    armed.release();
    let old = reader.await.unwrap();
    assert_eq!(old.json::<Value>().await.unwrap()["version"], 1);
    assert_eq!(
        app.redis_get(&format!("item:{id}")).await,
        None,
        "the fill was refused"
    );
    assert_eq!(version(&app, id).await, Some(2));
}

/// The applier's connection terminated again and again while psql writes stream in: every
/// write is applied in the end.
#[tokio::test]
async fn the_listener_killed_during_a_stream_of_writes_loses_none() {
    let app = spawn_app().await;
    let ids = app.insert_items(5).await;
    for &id in &ids {
        cache_it(&app, id).await;
    }
    for round in 0..10 {
        let id = ids[round % ids.len()];
        app.sql(&format!(
            "UPDATE items SET price_cents = {round} WHERE id = {id}"
        ))
        .await;
        if round % 3 == 0 {
            app.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .await;
        }
    }
    // 10 updates over 5 ids: each at version 3.
    for &id in &ids {
        until_version(&app, id, Some(3)).await;
    }
    until_applying(&app).await;
}

#[tokio::test]
async fn changes_made_while_redis_is_frozen_are_applied_when_it_thaws() {
    let app = Spawn::default()
        .backends(Backends::dedicated().await)
        .var("REDIS_TIMEOUT_MS", 100)
        .start()
        .await;
    let ids = app.insert_items(3).await;
    for &id in &ids {
        cache_it(&app, id).await;
    }
    app.backends.redis.freeze();
    app.sql("UPDATE items SET price_cents = price_cents + 1")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        queued_changes(&app).await,
        3,
        "kept while Redis cannot take them"
    );
    app.backends.redis.thaw();
    for &id in &ids {
        until_version(&app, id, Some(2)).await;
    }
}

#[tokio::test]
async fn changes_made_while_postgres_restarts_are_applied() {
    let app = spawn_app_with_own_servers().await;
    let id = app.insert_items(1).await[0];
    cache_it(&app, id).await;
    app.backends.pg.stop();
    app.backends.pg.start_again();
    app.sql(&format!("UPDATE items SET price_cents = 5 WHERE id = {id}"))
        .await;
    until_version(&app, id, Some(2)).await;
}

async fn spawn_app_with_own_servers() -> TestApp {
    Spawn::default()
        .backends(Backends::dedicated().await)
        .start()
        .await
}

/// The binary, applying the feed, killed (SIGKILL) with changes it could not apply (Redis
/// frozen): another instance on the same database and Redis takes the applier role and
/// applies them.
#[tokio::test]
async fn another_instance_takes_over_when_the_applier_is_killed() {
    let backends = Backends::dedicated().await;
    let database = backends.new_database().await;
    let prefix = "takeover:";
    let port = free_port();
    let mut binary = Command::new(env!("CARGO_BIN_EXE_itemcache"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", backends.pg.url(&database))
        .env("REDIS_URL", backends.redis.url())
        .env("CACHE_KEY_PREFIX", prefix)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_TIMEOUT_MS", "100")
        .env("RUST_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "the binary listens"
    );
    eventually("the binary to apply the feed", APPLIED_WITHIN, || async {
        let ready: Value = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (ready["change_feed"] == "applying").then_some(())
    })
    .await;

    let standby = Spawn::default()
        .backends(backends.clone())
        .database(&database)
        .var("CACHE_KEY_PREFIX", prefix)
        .var("REDIS_TIMEOUT_MS", 100)
        .start()
        .await;
    let ids = standby.insert_items(2).await;
    for &id in &ids {
        cache_it(&standby, id).await;
    }
    let ready: Value = standby.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["change_feed"], "standby");

    backends.redis.freeze();
    standby.sql("UPDATE items SET price_cents = 3").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    binary.kill().unwrap();
    binary.wait().unwrap();
    let killed = Instant::now();
    backends.redis.thaw();

    until_applying(&standby).await;
    for &id in &ids {
        until_version(&standby, id, Some(2)).await;
    }
    eprintln!(
        "taken over and applied {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(queued_changes(&standby).await, 0);
}
