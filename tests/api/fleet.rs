//! Several instances on one Redis and one Postgres: fleet-wide coalescing with Redis leases
//! (behaviour 8), and how leases compose with the write stamps and with dead holders.

use std::sync::Arc;
use std::time::Duration;

use itemcache::cache::lease::LEASE_WAIT;
use serde_json::{Value, json};

use crate::cache_races::reader_paused_before_fill;
use crate::freshness::{entry_times, short_lived};
use crate::support::servers::{NginxServer, RedisCluster};
use crate::support::{Spawn, TestApp, eventually, header, staleness};

/// Three instances of one app (same database, Redis and key prefix).
async fn three_instances(app: TestApp) -> Vec<Arc<TestApp>> {
    let second = app.another_instance().await;
    let third = app.another_instance().await;
    vec![Arc::new(app), Arc::new(second), Arc::new(third)]
}

/// The `db` duration of a response's `Server-Timing`, in milliseconds.
fn db_ms(response: &reqwest::Response) -> f64 {
    let timing = header(response, "server-timing");
    timing
        .split(',')
        .find_map(|entry| entry.trim().strip_prefix("db;dur="))
        .and_then(|dur| dur.parse().ok())
        .unwrap_or_else(|| panic!("no db duration in {timing:?}"))
}

async fn version_of(response: reqwest::Response) -> i64 {
    let body: Value = response.json().await.unwrap();
    body["version"].as_i64().unwrap()
}

#[tokio::test]
async fn a_cold_id_read_on_three_instances_at_once_costs_one_query() {
    // 1,000 requests at once on a debug build keep every worker busy for a while: a
    // generous Redis deadline keeps this test about coalescing, not about deadlines.
    let app = Spawn::default().var("REDIS_TIMEOUT_MS", 2000).start().await;
    let id = app.insert_items(1).await[0];
    let fleet = three_instances(app).await;

    let reads = (0..1000).map(|n| {
        let instance = fleet[n % fleet.len()].clone();
        tokio::spawn(async move {
            let response = instance.get_item(id).await;
            let status = response.status().as_u16();
            let cache = header(&response, "x-cache");
            let body: Value = response.json().await.unwrap();
            (status, cache, body["id"].as_i64())
        })
    });
    let results = futures_util::future::join_all(reads).await;
    for result in &results {
        let (status, cache, body_id) = result.as_ref().unwrap();
        assert_eq!(*status, 200);
        assert!(cache == "MISS" || cache == "HIT", "{cache}");
        assert_eq!(*body_id, Some(id));
    }
    assert_eq!(
        fleet[0].item_queries().await,
        1,
        "1,000 concurrent reads over three instances, one Postgres query"
    );
    assert_eq!(
        fleet[0]
            .redis_get(&format!("lease:{id}"))
            .await
            .map(String::from_utf8),
        None,
        "the filler released its lease"
    );
}

#[tokio::test]
async fn a_write_during_a_lease_lets_the_next_reader_load_at_once_and_nobody_fills_the_old_row() {
    let app = Spawn::default().start().await;
    let id = app.create_item("leased", 100).await["id"].as_i64().unwrap();
    let fleet = three_instances(app).await;

    // Instance 0 holds the lease, its load of v1 paused before the fill.
    let (armed, reader) = reader_paused_before_fill(&fleet[0], id).await;
    assert!(
        fleet[0].redis_get(&format!("lease:{id}")).await.is_some(),
        "the paused load holds the lease"
    );
    // Instance 1 writes v2: the invalidation drops the lease with the entry.
    let patched = fleet[1].patch_item(id, &json!({"price_cents": 200})).await;
    assert_eq!(patched.status(), 200);
    assert_eq!(fleet[1].redis_get(&format!("lease:{id}")).await, None);

    // Instance 2 reads after the write: it does not wait for the doomed load (the paused
    // reader is still paused) and answers v2.
    let read = fleet[2].get_item(id).await;
    assert_eq!(read.status(), 200);
    assert_eq!(version_of(read).await, 2);

    armed.release();
    assert_eq!(reader.await.unwrap().status(), 200);
    for instance in &fleet {
        assert_eq!(
            version_of(instance.get_item(id).await).await,
            2,
            "the paused load's v1 was not stored"
        );
    }
}

#[tokio::test]
async fn a_lease_whose_holder_died_delays_readers_by_the_wait_bound_only() {
    let app = Spawn::default().start().await;
    let id = app.create_item("orphan", 100).await["id"].as_i64().unwrap();
    let key = format!("{}lease:{id}", app.prefix);
    // A holder that took the lease and died: nothing will fill or release it.
    let _: () = app
        .redis_cmd(&["SET", &key, "dead-holder", "PX", "60000"])
        .await;

    let read = app.get_item(id).await;
    assert_eq!(read.status(), 200, "the reader gave up waiting and loaded");
    assert_eq!(header(&read, "x-cache"), "MISS");
    // It waited for the holder's fill, up to the bound (not the lease's 60 s), before it
    // loaded: the load's time (`Server-Timing` db) includes the wait.
    let waited = db_ms(&read);
    let bound = LEASE_WAIT.as_secs_f64() * 1000.0;
    assert!(
        waited >= bound * 0.9 && waited < bound * 5.0,
        "waited {waited} ms for a dead holder's lease (bound {bound} ms)"
    );
    assert_eq!(version_of(read).await, 1);
    assert_eq!(app.item_queries().await, 1);
    // Its fill (stamp-checked like any) stored the entry: the next read is a hit, and the
    // dead holder's lease is left to expire (it is not this reader's to release).
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
    let holder: Option<String> = app.redis_cmd(&["GET", &key]).await;
    assert_eq!(holder.as_deref(), Some("dead-holder"));
}

#[tokio::test]
async fn a_failed_load_releases_its_lease() {
    let app = Spawn::default().start().await;
    let id = app.insert_items(1).await[0];
    // The load fails at once: its table is gone.
    app.sql("ALTER TABLE items RENAME TO items_gone").await;
    let read = app.get_item(id).await;
    assert!(read.status().is_server_error(), "{}", read.status());
    assert_eq!(
        app.redis_get(&format!("lease:{id}")).await,
        None,
        "the failed load released its lease"
    );
    app.sql("ALTER TABLE items_gone RENAME TO items").await;
    assert_eq!(app.get_item(id).await.status(), 200);
}

/// The fleet as deployed: three instances on a Redis Cluster behind nginx
/// (`deploy/nginx.conf`). The staleness checker writes and reads through nginx and through
/// each instance directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_and_each_instance_of_a_fleet_on_a_cluster_no_read_goes_back_in_time() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let app = Spawn::default()
        .var("REDIS_CLUSTER_NODES", cluster.seeds())
        .start()
        .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            app.create_item(&format!("fleet {n}"), 0).await["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let fleet = three_instances(app).await;
    let ports: Vec<u16> = fleet.iter().map(|i| i.port).collect();
    let nginx = tokio::task::spawn_blocking(move || NginxServer::start(&ports))
        .await
        .unwrap();

    // nginx passes the client's request id through, and makes one when there is none.
    let client = reqwest::Client::new();
    let traced = client
        .get(format!("{}/items/{}", nginx.url(), ids[0]))
        .header("x-request-id", "fleet-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), 200);
    assert_eq!(header(&traced, "x-request-id"), "fleet-trace-1");
    let untraced = client
        .get(format!("{}/items/{}", nginx.url(), ids[0]))
        .send()
        .await
        .unwrap();
    assert!(!header(&untraced, "x-request-id").is_empty());

    let mut endpoints = vec![nginx.url()];
    endpoints.extend(fleet.iter().map(|i| i.address.clone()));
    let report = staleness::check(&fleet[0], &endpoints, &ids, Duration::from_secs(4)).await;
    assert!(
        report.writes > 20 && report.reads > 50 && report.hits > 0,
        "the checker did real work: {report:?}"
    );
    assert_eq!(report.stale, 0, "no read older than an acknowledged write");

    // An instance gone: nginx sends its requests to the others (passive health checks),
    // and no client sees an error.
    let mut fleet = fleet;
    drop(fleet.pop());
    for _ in 0..30 {
        let response = client
            .get(format!("{}/items/{}", nginx.url(), ids[1]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn an_expired_entry_hit_on_two_instances_at_once_is_refreshed_once() {
    let a = short_lived().await; // fresh 1 s, then served while revalidated for 30 s
    let b = a.another_instance().await;
    let id = a.insert_items(1).await[0];
    assert_eq!(header(&a.get_item(id).await, "x-cache"), "MISS");
    let (first_fresh_until, _) = entry_times(&a, id).await.expect("an entry");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = a.item_queries().await;

    // Both hits are past freshness: each instance starts a background refresh.
    let (on_a, on_b) = tokio::join!(a.get_item(id), b.get_item(id));
    assert_eq!(header(&on_a, "x-cache"), "HIT");
    assert_eq!(header(&on_b, "x-cache"), "HIT");
    eventually("the entry renewed", Duration::from_secs(5), || async {
        let (fresh_until, _) = entry_times(&a, id).await?;
        (fresh_until > first_fresh_until).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        a.item_queries().await - before,
        1,
        "one refresh for the fleet: the other instance's was refused its lease"
    );
}
