//! Contract cache behaviours 1, 2 and 4: read-through, negative caching, coalescing.

use std::time::Duration;

use crate::support::{Spawn, eventually, header, spawn_app};

#[tokio::test]
async fn first_read_is_a_miss_and_later_reads_are_hits() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];

    let first = app.get_item(id).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert!(header(&first, "server-timing").contains("db;dur="));
    let first_body: serde_json::Value = first.json().await.unwrap();

    let second = app.get_item(id).await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert!(!header(&second, "server-timing").contains("db;dur="));
    let second_body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(first_body, second_body);
    assert_eq!(
        app.item_queries().await,
        1,
        "the hit did not touch Postgres"
    );
}

#[tokio::test]
async fn an_entry_expires_after_its_ttl() {
    // Without stale-while-revalidate, which would keep a read entry fresh (see freshness.rs).
    let app = Spawn::default().ttl(1, 0).start().await;
    let id = app.insert_items(1).await[0];
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
    eventually("the entry to expire", Duration::from_secs(5), || async {
        (header(&app.get_item(id).await, "x-cache") == "MISS").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_not_found_is_cached_for_the_negative_ttl() {
    let app = Spawn::default()
        .var("CACHE_NEGATIVE_TTL_SECS", 1)
        .start()
        .await;
    let first = app.get_item(424242).await;
    assert_eq!(first.status(), 404);
    assert_eq!(header(&first, "x-cache"), "MISS");
    let second = app.get_item(424242).await;
    assert_eq!(second.status(), 404);
    assert_eq!(header(&second, "x-cache"), "HIT");
    let queries = app.item_queries().await;
    assert_eq!(queries, 1);
    eventually(
        "the negative entry to expire",
        Duration::from_secs(5),
        || async { (header(&app.get_item(424242).await, "x-cache") == "MISS").then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn concurrent_reads_of_a_cold_id_cost_one_query() {
    // 200 requests at once on a debug build keep both workers busy for a while: a generous
    // Redis deadline keeps this test about coalescing, not about deadlines.
    let app = Spawn::default().var("REDIS_TIMEOUT_MS", 2000).start().await;
    let id = app.insert_items(1).await[0];
    // Hold Postgres so that every read arrives while the first load is in flight.
    let app = std::sync::Arc::new(app);
    let reads = (0..200).map(|_| {
        let app = app.clone();
        tokio::spawn(async move {
            let response = app.get_item(id).await;
            (response.status().as_u16(), header(&response, "x-cache"))
        })
    });
    let results = futures_util::future::join_all(reads).await;
    for result in &results {
        let (status, cache) = result.as_ref().unwrap();
        assert_eq!(*status, 200);
        assert!(cache == "MISS" || cache == "HIT", "{cache}");
    }
    assert_eq!(
        app.item_queries().await,
        1,
        "200 concurrent reads, one Postgres query"
    );
}

#[tokio::test]
async fn cache_disabled_reads_bypass_redis() {
    let app = Spawn::default().var("CACHE_ENABLED", "false").start().await;
    let id = app.insert_items(1).await[0];
    for _ in 0..2 {
        let response = app.get_item(id).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cache"), "BYPASS");
    }
    assert_eq!(app.redis_get(&format!("item:{id}")).await, None);
}
