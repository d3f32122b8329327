//! The near cache (`CACHE_L1_MAX_MB`): hits served in-process, invalidated by Redis's
//! client-side-caching pushes across instances, flushed when the pushes stop, and the
//! in-flight race (an invalidation during a read that is about to store) forced.

use std::sync::Arc;
use std::time::Duration;

use itemcache::failpoints;
use serde_json::{Value, json};

use crate::support::{Spawn, TestApp, eventually, header, staleness};

/// An instance with the near cache on; entries live a minute in it, so that anything the
/// tests see change within seconds was changed by an invalidation, not by its TTL.
async fn with_near_cache() -> TestApp {
    Spawn::default()
        .var("CACHE_L1_MAX_MB", 16)
        .var("CACHE_L1_TTL_MS", 60_000)
        .start()
        .await
}

fn from_near(response: &reqwest::Response) -> bool {
    header(response, "cache-status").contains("detail=near")
}

async fn version_of(response: reqwest::Response) -> i64 {
    let body: Value = response.json().await.unwrap();
    body["version"].as_i64().unwrap()
}

/// Reads `id` until the near cache answers it.
async fn until_near(app: &TestApp, id: i64) {
    eventually(
        "a hit from the near cache",
        Duration::from_secs(5),
        || async {
            let read = app.get_item(id).await;
            (header(&read, "x-cache") == "HIT" && from_near(&read)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_hit_is_served_from_the_near_cache_and_a_write_here_is_seen_at_once() {
    let app = with_near_cache().await;
    let id = app.create_item("near", 1).await["id"].as_i64().unwrap();
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
    let from_redis = app.get_item(id).await;
    assert_eq!(header(&from_redis, "x-cache"), "HIT");
    assert!(!from_near(&from_redis), "the first hit comes from Redis");
    until_near(&app, id).await;

    // On the writing instance the write evicts before it answers: the next read is new.
    let patched = app.patch_item(id, &json!({"price_cents": 2})).await;
    assert_eq!(patched.status(), 200);
    assert_eq!(version_of(app.get_item(id).await).await, 2);
}

#[tokio::test]
async fn a_write_on_another_instance_reaches_this_near_cache_by_redis_push() {
    let a = with_near_cache().await;
    let b = a.another_instance().await;
    let id = a.create_item("pushed", 1).await["id"].as_i64().unwrap();
    a.get_item(id).await;
    until_near(&a, id).await;

    assert_eq!(
        b.patch_item(id, &json!({"price_cents": 2})).await.status(),
        200
    );
    // Within the bound (the push's delivery), far inside the entry's minute in the cache.
    eventually("A sees B's write", Duration::from_secs(2), || async {
        (version_of(a.get_item(id).await).await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn losing_the_tracking_connection_flushes_the_near_cache() {
    let app = with_near_cache().await;
    let id = app.create_item("tracked", 1).await["id"].as_i64().unwrap();
    app.get_item(id).await;
    until_near(&app, id).await;

    // Kill the connection the pushes come on: invalidations sent until a new one has
    // subscribed are lost, so nothing stored before may be served after.
    let name = format!("{}{}", itemcache::cache::tracking::CLIENT_NAME, app.prefix);
    let tracking_id = || async {
        let list: String = app.redis_cmd(&["CLIENT", "LIST"]).await;
        list.lines()
            .find(|line| line.contains(&format!(" name={name} ")))
            .and_then(|line| line.split_whitespace().find_map(|f| f.strip_prefix("id=")))
            .map(str::to_owned)
    };
    let killed = tracking_id().await.expect("the tracking connection");
    let _: i64 = app.redis_cmd(&["CLIENT", "KILL", "ID", &killed]).await;
    eventually(
        "a new tracking connection",
        Duration::from_secs(5),
        || async { tracking_id().await.filter(|id| *id != killed) },
    )
    .await;
    // Reconnected and subscribed: the entry from before the gap is gone.
    let read = app.get_item(id).await;
    assert_eq!(header(&read, "x-cache"), "HIT");
    assert!(!from_near(&read), "the near cache was flushed");
}

#[tokio::test]
async fn an_invalidation_during_a_read_keeps_the_old_entry_out_of_the_near_cache() {
    let a = Arc::new(with_near_cache().await);
    let b = a.another_instance().await;
    let id = a.create_item("raced", 1).await["id"].as_i64().unwrap();
    b.get_item(id).await; // v1 in Redis
    a.get_item(id).await; // seen once by A's near cache: the next read of it stores

    // A reads v1 from Redis and stops before storing it in its near cache.
    let armed = failpoints::arm(
        failpoints::BEFORE_NEAR_STORE,
        &format!("{}item:{id}", a.prefix),
    );
    let reader = {
        let a = a.clone();
        tokio::spawn(async move { a.get_item(id).await })
    };
    tokio::time::timeout(Duration::from_secs(10), armed.reached())
        .await
        .expect("the read reached the store");
    // B writes v2; Redis pushes the invalidation to A while A's read is in flight.
    assert_eq!(
        b.patch_item(id, &json!({"price_cents": 2})).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    armed.release();
    let early = reader.await.unwrap();
    assert_eq!(
        version_of(early).await,
        1,
        "the read began before the write"
    );

    // What it read was not stored: A's next reads show v2, never v1 from its near cache.
    for _ in 0..3 {
        assert_eq!(version_of(a.get_item(id).await).await, 2);
    }
}

/// The staleness checker over two instances with near caches: no read is older than a
/// write acknowledged more than the stated bound before it began. The bound checked here
/// is `CACHE_L1_TTL_MS` (the cap); the lag actually seen is reported (and measured in
/// `bench/near`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_instances_with_near_caches_no_read_lags_beyond_the_bound() {
    const BOUND: Duration = Duration::from_millis(1000);
    let a = Spawn::default()
        .var("CACHE_L1_MAX_MB", 16)
        .var("CACHE_L1_TTL_MS", BOUND.as_millis())
        .start()
        .await;
    let b = a.another_instance().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            a.create_item(&format!("near {n}"), 0).await["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let report = staleness::check_within(
        &a,
        &[a.address.clone(), b.address.clone()],
        &ids,
        Duration::from_secs(4),
        BOUND,
    )
    .await;
    eprintln!(
        "near caches across instances: largest lag seen {:?}",
        report.max_lag
    );
    assert!(
        report.writes > 20 && report.reads > 50 && report.hits > 0,
        "the checker did real work: {report:?}"
    );
    assert_eq!(
        report.stale, 0,
        "no read lagged beyond {BOUND:?}: {report:?}"
    );
}
