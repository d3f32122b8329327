//! Freshness without miss storms (issue 14): stale-while-revalidate keeps a read entry
//! served while one background refresh runs; early refresh (XFetch) renews an entry before
//! it expires; neither ever serves what a write invalidated.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Spawn, TestApp, eventually, header};

pub(crate) async fn short_lived() -> TestApp {
    Spawn::default().ttl(1, 30).start().await
}

/// The raw entry's `(fresh_until_ms, load_ms)`.
pub(crate) async fn entry_times(app: &TestApp, id: i64) -> Option<(i64, i64)> {
    let raw = app.redis_get(&format!("item:{id}")).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let times = text.split(' ').nth(1)?;
    let (fresh, load) = times.split_once('/')?;
    Some((fresh.parse().ok()?, load.parse().ok()?))
}

#[tokio::test]
async fn past_freshness_hits_are_served_while_one_refresh_runs() {
    let app = Arc::new(short_lived().await);
    let id = app.insert_items(1).await[0];
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
    let (first_fresh_until, _) = entry_times(&app, id).await.expect("an entry");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let before = app.item_queries().await;
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { header(&app.get_item(id).await, "x-cache") })
        })
        .collect();
    for read in reads {
        assert_eq!(
            read.await.unwrap(),
            "HIT",
            "served from the entry past freshness"
        );
    }
    eventually("the background refresh", Duration::from_secs(5), || async {
        let (fresh_until, _) = entry_times(&app, id).await?;
        (fresh_until > first_fresh_until).then_some(())
    })
    .await;
    assert_eq!(
        app.item_queries().await - before,
        1,
        "one refresh for twenty hits"
    );
}

#[tokio::test]
async fn a_write_is_never_hidden_by_stale_while_revalidate() {
    let app = short_lived().await;
    let id = app.create_item("swr", 1).await["id"].as_i64().unwrap();
    app.get_item(id).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        app.patch_item(id, &json!({"price_cents": 2}))
            .await
            .status(),
        200
    );
    let read = app.get_item(id).await;
    assert_eq!(
        header(&read, "x-cache"),
        "MISS",
        "the write deleted the entry"
    );
    assert_eq!(read.json::<Value>().await.unwrap()["version"], 2);
}

/// An entry whose load took (as it records) far longer than its remaining freshness is
/// refreshed early by the next hit, which is still answered from the cache.
#[tokio::test]
async fn a_slow_to_load_entry_is_refreshed_before_it_expires() {
    let app = Spawn::default().start().await; // the default five-minute TTL
    let id = app.insert_items(1).await[0];
    app.get_item(id).await;
    let key = format!("{}item:{id}", app.prefix);
    let raw = app
        .redis_get(&format!("item:{id}"))
        .await
        .expect("an entry");
    let text = String::from_utf8(raw).unwrap();
    let (fresh_until, load_ms) = entry_times(&app, id).await.unwrap();
    // Say the load took a day: early refresh is then all but certain, minutes before expiry.
    let slow = text.replacen(
        &format!("{fresh_until}/{load_ms}"),
        &format!("{fresh_until}/86400000"),
        1,
    );
    let _: () = app.redis_cmd(&["SET", &key, &slow, "KEEPTTL"]).await;
    let before = app.item_queries().await;
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
    eventually("the early refresh", Duration::from_secs(5), || async {
        let (_, load_ms) = entry_times(&app, id).await?;
        (load_ms < 86_400_000).then_some(())
    })
    .await;
    assert_eq!(app.item_queries().await - before, 1);
}
