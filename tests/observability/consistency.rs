//! The live staleness checker (`CACHE_VERIFY_SAMPLE`, `src/verify.rs`): a stale entry is
//! reported, a write racing the check is not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::exposition::{Exposition, labels};
use crate::serial;
use crate::support::{Spawn, TestApp, eventually, header};

const CHECKS: &str = "itemcache_consistency_checks_total";

async fn checks(app: &TestApp, result: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    Exposition::parse(&text)
        .unwrap()
        .value(CHECKS, &labels(&[("result", result)]))
        .unwrap_or(0.0)
}

async fn checked_app() -> TestApp {
    Spawn::default().var("CACHE_VERIFY_SAMPLE", 1).start().await
}

/// Leaves in Redis what a lost invalidation leaves behind: a new item at version 2 whose
/// entry holds version 1, the newer version clearly older than any hit from now on. Returns
/// the item's id: its next read is a hit serving the old version.
pub async fn plant_old_version(app: &TestApp) -> i64 {
    let id = app.create_item("checked", 1).await["id"].as_i64().unwrap();
    assert_eq!(
        app.patch_item(id, &json!({"price_cents": 2}))
            .await
            .status(),
        200
    );
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
    let key = format!("{}item:{id}", app.prefix);
    let raw = app
        .redis_get(&format!("item:{id}"))
        .await
        .expect("an entry");
    let old = String::from_utf8(raw).unwrap().replacen("I2 ", "I1 ", 1);
    let _: () = app.redis_cmd(&["SET", &key, &old, "KEEPTTL"]).await;
    // The newer version is clearly older than the hit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    id
}

/// An entry overwritten in Redis with an older version of its item (what a lost
/// invalidation leaves behind): the next hit's check reports it within the grace.
#[tokio::test]
async fn an_entry_holding_an_old_version_is_reported_stale() {
    let _serial = serial().await;
    let app = checked_app().await;
    let id = plant_old_version(&app).await;

    let stale_before = checks(&app, "stale").await;
    let hit = app.get_item(id).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(header(&hit, "etag"), "\"1\"", "the old version was served");
    eventually(
        "the stale entry to be reported",
        Duration::from_secs(5),
        || async { (checks(&app, "stale").await > stale_before).then_some(()) },
    )
    .await;
}

/// Writes racing reads (every hit checked): mismatches the writes explain are not
/// staleness; the checker reports none.
#[tokio::test]
async fn racing_writes_are_not_reported_as_staleness() {
    let _serial = serial().await;
    let app = Arc::new(checked_app().await);
    let ids = Arc::new(app.insert_items(3).await);
    let (stale_before, consistent_before) = (
        checks(&app, "stale").await,
        checks(&app, "consistent").await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..6)
        .map(|worker| {
            let (app, ids, stop) = (app.clone(), ids.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = ids[n % ids.len()];
                    if worker < 2 {
                        app.patch_item(id, &json!({"price_cents": n})).await;
                    } else {
                        app.get_item(id).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    // Every check started has ended after the grace.
    tokio::time::sleep(itemcache::verify::GRACE + Duration::from_secs(1)).await;
    assert!(
        checks(&app, "consistent").await > consistent_before,
        "hits were checked"
    );
    assert_eq!(
        checks(&app, "stale").await,
        stale_before,
        "no staleness reported"
    );
}
