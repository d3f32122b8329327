//! Contract cache behaviour 3: after a write's 2xx, every read of that id — from any
//! instance sharing the Redis — returns the new state. The classic cache-aside race is
//! forced deterministically with the `read.before_fill` pause point: a reader has read the
//! old row from Postgres and is about to fill the cache when the write commits.

use std::sync::Arc;

use std::time::Duration;

use itemcache::failpoints::{self, Armed};
use serde_json::{Value, json};

use crate::support::proxy::SlowProxy;
use crate::support::{Spawn, TestApp, header, spawn_app, staleness};

/// Arms the pause between Postgres read and cache fill for `id` in `app`'s key space.
fn pause_before_fill(app: &TestApp, id: i64) -> Armed {
    failpoints::arm(failpoints::BEFORE_FILL, &format!("{}item:{id}", app.prefix))
}

async fn version_of(response: reqwest::Response) -> i64 {
    let body: Value = response.json().await.unwrap();
    body["version"].as_i64().unwrap()
}

/// Starts a read of `id` that will stop at the fill; returns once it has read Postgres.
pub(crate) async fn reader_paused_before_fill(
    app: &Arc<TestApp>,
    id: i64,
) -> (Armed, tokio::task::JoinHandle<reqwest::Response>) {
    let armed = pause_before_fill(app, id);
    let reader = {
        let app = app.clone();
        tokio::spawn(async move { app.get_item(id).await })
    };
    tokio::time::timeout(Duration::from_secs(10), armed.reached())
        .await
        .expect("the reader reached the fill");
    (armed, reader)
}

#[tokio::test]
async fn a_reader_that_read_before_an_update_cannot_fill_the_old_row() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_item("race", 100).await["id"].as_i64().unwrap();

    let (armed, reader) = reader_paused_before_fill(&app, id).await;
    // The write commits and is acknowledged while the reader holds version 1.
    let patched = app.patch_item(id, &json!({"price_cents": 200})).await;
    assert_eq!(patched.status(), 200);
    assert_eq!(version_of(patched).await, 2);
    armed.release();

    let stale_read = reader.await.unwrap();
    assert_eq!(header(&stale_read, "x-cache"), "MISS");
    assert_eq!(
        version_of(stale_read).await,
        1,
        "the reader started before the write: v1 is fine"
    );
    assert_eq!(
        app.redis_get(&format!("item:{id}")).await,
        None,
        "the old row was not stored"
    );

    for expected_cache in ["MISS", "HIT"] {
        let read = app.get_item(id).await;
        assert_eq!(header(&read, "x-cache"), expected_cache);
        assert_eq!(version_of(read).await, 2);
    }
}

#[tokio::test]
async fn a_reader_that_read_before_a_delete_cannot_resurrect_the_item() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_item("doomed", 1).await["id"].as_i64().unwrap();

    let (armed, reader) = reader_paused_before_fill(&app, id).await;
    assert_eq!(app.delete_item(id).await.status(), 204);
    armed.release();
    assert_eq!(reader.await.unwrap().status(), 200);

    assert_eq!(app.get_item(id).await.status(), 404);
    assert_eq!(app.get_item(id).await.status(), 404);
}

#[tokio::test]
async fn a_reader_that_found_nothing_before_a_create_cannot_cache_the_absence() {
    let app = Arc::new(spawn_app().await);
    // A fresh database: the next item created gets id 1.
    let (armed, reader) = reader_paused_before_fill(&app, 1).await;
    let created = app.create_item("newborn", 5).await;
    assert_eq!(created["id"], 1);
    armed.release();
    assert_eq!(
        reader.await.unwrap().status(),
        404,
        "it read before the create"
    );

    let read = app.get_item(1).await;
    assert_eq!(read.status(), 200);
    assert_eq!(version_of(read).await, 1);
}

#[tokio::test]
async fn a_write_on_one_instance_stops_a_fill_on_another() {
    let reading = Arc::new(spawn_app().await);
    let writing = reading.another_instance().await;
    let id = writing.create_item("shared", 10).await["id"]
        .as_i64()
        .unwrap();

    let (armed, reader) = reader_paused_before_fill(&reading, id).await;
    assert_eq!(
        writing
            .patch_item(id, &json!({"name": "renamed"}))
            .await
            .status(),
        200
    );
    armed.release();
    reader.await.unwrap();

    for app in [&*reading, &writing, &*reading] {
        let read = app.get_item(id).await;
        let body: Value = read.json().await.unwrap();
        assert_eq!(
            (body["name"].as_str(), body["version"].as_i64()),
            (Some("renamed"), Some(2))
        );
    }
}

/// The race the randomized test below first found: a read that starts after a write's
/// acknowledgement must not join (coalesce with) a load that began before the write —
/// even when the write went through another instance.
#[tokio::test]
async fn a_read_after_a_write_does_not_join_a_load_from_before_it() {
    let reading = Arc::new(spawn_app().await);
    let writing = reading.another_instance().await;
    let id = writing.create_item("coalesced", 10).await["id"]
        .as_i64()
        .unwrap();

    let (armed, early_reader) = reader_paused_before_fill(&reading, id).await;
    assert_eq!(
        writing
            .patch_item(id, &json!({"price_cents": 11}))
            .await
            .status(),
        200
    );
    // The early reader is still in flight on `reading`, holding version 1.
    let late = reading.get_item(id).await;
    assert_eq!(late.status(), 200);
    assert_eq!(
        version_of(late).await,
        2,
        "the late read did not take the early load's answer"
    );
    armed.release();
    assert_eq!(version_of(early_reader.await.unwrap()).await, 1);
    assert_eq!(version_of(reading.get_item(id).await).await, 2);
}

/// The same race without stamps: the reading instance has its cache off (or Redis
/// failing), so its loads carry no stamp to compare. Its Postgres replies are slowed, so a
/// load that began before the other instance's write is still in flight when a read that
/// began after the write's 200 arrives: that read must run a load of its own.
#[tokio::test]
async fn a_read_without_a_stamp_does_not_join_a_load_from_before_a_write() {
    let writing = spawn_app().await;
    let id = writing.create_item("unstamped", 10).await["id"]
        .as_i64()
        .unwrap();
    let proxy = SlowProxy::start(writing.backends.pg.port).await;
    let reading = Arc::new(
        Spawn::default()
            .backends(writing.backends.clone())
            .database(&writing.database)
            .var(
                "DATABASE_URL",
                format!(
                    "postgres://postgres@127.0.0.1:{}/{}",
                    proxy.port, writing.database
                ),
            )
            .var("CACHE_KEY_PREFIX", &writing.prefix)
            .var("CACHE_ENABLED", "false")
            .start()
            .await,
    );
    // Connections made before the replies are slowed.
    let warm: Vec<_> = (0..3)
        .map(|_| {
            let reading = reading.clone();
            tokio::spawn(async move { reading.get_item(id).await.status() })
        })
        .collect();
    for read in warm {
        assert_eq!(read.await.unwrap(), 200);
    }

    proxy.set_delay(Duration::from_millis(600));
    let early = {
        let reading = reading.clone();
        tokio::spawn(async move { reading.get_item(id).await })
    };
    // The early load's SELECT has reached Postgres; its reply is held back.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        writing
            .patch_item(id, &json!({"price_cents": 11}))
            .await
            .status(),
        200
    );
    let late = reading.get_item(id).await;
    assert_eq!(header(&late, "x-cache"), "BYPASS");
    assert_eq!(
        version_of(late).await,
        2,
        "a read begun after the write's 200 returned the version before it"
    );
    assert_eq!(version_of(early.await.unwrap()).await, 1);
}

#[tokio::test]
async fn an_eviction_during_a_read_leaves_no_entry_behind() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_item("evicted", 10).await["id"].as_i64().unwrap();
    let (armed, reader) = reader_paused_before_fill(&app, id).await;
    assert_eq!(app.evict(id).await.status(), 204);
    armed.release();
    reader.await.unwrap();
    assert_eq!(app.redis_get(&format!("item:{id}")).await, None);
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
}

/// Concurrent writers, readers and evictions over a few hot ids, on two instances sharing
/// one Redis, and a writer behind the service's back (plain SQL): no read that started
/// after a write's acknowledgement returns an older version — for the external writer's
/// writes, once the change feed's lag bound has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_random_concurrent_writes_no_read_goes_back_in_time() {
    let a = spawn_app().await;
    let b = a.another_instance().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            a.create_item(&format!("hot {n}"), 0).await["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let report = staleness::check(
        &a,
        &[a.address.clone(), b.address.clone()],
        &ids,
        Duration::from_secs(4),
    )
    .await;
    assert!(
        report.writes > 20 && report.reads > 50 && report.hits > 0,
        "the stress did real work: {report:?}"
    );
    assert_eq!(
        report.stale, 0,
        "a read returned a version older than an acknowledged write"
    );
}
