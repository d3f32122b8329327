//! Contract cache behaviour 3: after a write's 2xx, every read of that id — from any
//! instance sharing the Redis — returns the new state. The classic cache-aside race is
//! forced deterministically with the `read.before_fill` pause point: a reader has read the
//! old row from Postgres and is about to fill the cache when the write commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use itemcache::failpoints::{self, Armed};
use serde_json::{Value, json};

use crate::support::proxy::SlowProxy;
use crate::support::{Spawn, TestApp, header, spawn_app};

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

/// Versions of one id written behind the service's back, with when each was acknowledged.
type ExternalWrites = std::sync::Mutex<Vec<(Instant, i64)>>;

/// Concurrent writers, readers and evictions over a few hot ids, on two instances sharing
/// one Redis, and a writer behind the service's back (plain SQL): no read that started
/// after a write's acknowledgement returns an older version — for the external writer's
/// writes, once the change feed's lag bound has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_random_concurrent_writes_no_read_goes_back_in_time() {
    const HOT_IDS: usize = 3;
    // The change feed's bound for writes made outside the service (docs/cache-design.md):
    // a NOTIFY wakes it at once; its slow timer reads the queue every second.
    const EXTERNAL_LAG: Duration = Duration::from_secs(1);
    const RUN_FOR: Duration = Duration::from_secs(4);
    let a = Arc::new(spawn_app().await);
    let b = Arc::new(a.another_instance().await);
    let mut ids = Vec::new();
    for n in 0..HOT_IDS {
        ids.push(
            a.create_item(&format!("hot {n}"), 0).await["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let ids = Arc::new(ids);
    // The highest version acknowledged to any writer, per id.
    let acked: Arc<Vec<AtomicI64>> = Arc::new((0..HOT_IDS).map(|_| AtomicI64::new(1)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([
        AtomicUsize::new(0), // writes
        AtomicUsize::new(0), // reads
        AtomicUsize::new(0), // hits
        AtomicUsize::new(0), // evictions
    ]);
    let violations = Arc::new(AtomicUsize::new(0));
    // Versions written behind the service's back (plain SQL, as psql would), with when
    // each was acknowledged: the change feed applies them within EXTERNAL_LAG.
    let external: Arc<Vec<ExternalWrites>> =
        Arc::new((0..HOT_IDS).map(|_| Default::default()).collect());

    let mut tasks = Vec::new();
    {
        let (a, ids, stop, external) = (a.clone(), ids.clone(), stop.clone(), external.clone());
        tasks.push(tokio::spawn(async move {
            #[derive(diesel::QueryableByName)]
            struct Written {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                version: i64,
            }
            let mut conn = a.backends.connect(&a.database).await;
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let slot = n % HOT_IDS;
                let written: Written = diesel_async::RunQueryDsl::get_result(
                    diesel::sql_query(format!(
                        "UPDATE items SET description = 'external {n}' WHERE id = {} RETURNING version",
                        ids[slot]
                    )),
                    &mut conn,
                )
                .await
                .unwrap();
                external[slot]
                    .lock()
                    .unwrap()
                    .push((Instant::now(), written.version));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for worker in 0..12usize {
        let (a, b, ids, acked, stop, counts, violations, external) = (
            a.clone(),
            b.clone(),
            ids.clone(),
            acked.clone(),
            stop.clone(),
            counts.clone(),
            violations.clone(),
            external.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let slot = (n >> 33) % HOT_IDS;
                let id = ids[slot];
                let app = if (n >> 40) % 2 == 0 { &a } else { &b };
                match worker % 6 {
                    // Two writers in six tasks.
                    0 | 1 => {
                        let response = app.patch_item(id, &json!({"price_cents": (n >> 20) % 1000})).await;
                        assert_eq!(response.status(), 200);
                        let version = version_of(response).await;
                        acked[slot].fetch_max(version, Ordering::SeqCst);
                        counts[0].fetch_add(1, Ordering::Relaxed);
                    }
                    // One evicter.
                    2 => {
                        assert_eq!(app.evict(id).await.status(), 204);
                        counts[3].fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // Three readers.
                    _ => {
                        let started = Instant::now();
                        let external_floor = external[slot]
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|(at, _)| *at + EXTERNAL_LAG <= started)
                            .map(|(_, version)| *version)
                            .max()
                            .unwrap_or(0);
                        let floor = acked[slot].load(Ordering::SeqCst).max(external_floor);
                        let response = app.get_item(id).await;
                        assert_eq!(response.status(), 200);
                        if header(&response, "x-cache") == "HIT" {
                            counts[2].fetch_add(1, Ordering::Relaxed);
                        }
                        let version = version_of(response).await;
                        if version < floor {
                            violations.fetch_add(1, Ordering::SeqCst);
                            eprintln!("id {id}: read version {version} after version {floor} was acknowledged");
                        }
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(RUN_FOR).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let [writes, reads, hits, evictions] = [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    eprintln!(
        "stress: {writes} writes, {reads} reads ({hits} hits), {evictions} evictions in {:.1} s; {} stale reads",
        started.elapsed().as_secs_f64(),
        violations.load(Ordering::SeqCst)
    );
    assert!(
        writes > 20 && reads > 50 && hits > 0,
        "the stress did real work"
    );
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a read returned a version older than an acknowledged write"
    );
    // And at rest, both instances agree with Postgres (once the feed has applied the
    // last external write).
    tokio::time::sleep(EXTERNAL_LAG).await;
    for (slot, &id) in ids.iter().enumerate() {
        let external = external[slot].lock().unwrap().last().map_or(0, |w| w.1);
        let expected = acked[slot].load(Ordering::SeqCst).max(external);
        for app in [&a, &b] {
            assert_eq!(version_of(app.get_item(id).await).await, expected);
        }
    }
}
