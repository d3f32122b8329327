//! Redis answering some commands and refusing others (an ACL user without some rights):
//! a failure of one step must be reported for what it is, and must not spill into others.

use crate::support::{Spawn, TestApp, header, spawn_app};

/// An app whose Redis user has only the rights `rules` grants (ACL SETUSER syntax), on the
/// shared Redis and `base`'s database and key prefix.
async fn app_with_redis_rights(base: &TestApp, rules: &[&str]) -> TestApp {
    let user = format!("limited_{}", base.prefix.trim_end_matches(':'));
    let mut args = vec!["ACL", "SETUSER", &user, "reset", "on", ">secret"];
    args.extend_from_slice(rules);
    let _: () = base.redis_cmd(&args).await;
    Spawn::default()
        .backends(base.backends.clone())
        .var(
            "REDIS_URL",
            format!(
                "redis://{user}:secret@127.0.0.1:{}",
                base.backends.redis.port
            ),
        )
        .database(&base.database)
        .var("CACHE_KEY_PREFIX", &base.prefix)
        .start()
        .await
}

/// A read that could not note the write stamps reads Postgres without filling: that is a
/// `BYPASS` (from Postgres, not cached), not a `MISS` ("now cached").
#[tokio::test]
async fn a_read_that_cannot_note_stamps_is_a_bypass_not_a_miss() {
    let base = spawn_app().await;
    let ids = base.insert_items(2).await;
    // Entries may be read, stamps may not.
    let entries = format!("~{}item:*", base.prefix);
    let app = app_with_redis_rights(&base, &[&entries, "+@all"]).await;

    for _ in 0..2 {
        let one = app.get_item(ids[0]).await;
        assert_eq!(one.status(), 200);
        assert_eq!(header(&one, "x-cache"), "BYPASS", "a single read");
    }
    let batch = app.get(&format!("/items?ids={},{}", ids[0], ids[1])).await;
    assert_eq!(batch.status(), 200);
    assert_eq!(header(&batch, "x-cache"), "BYPASS", "a batch read");
    assert_eq!(
        base.redis_get(&format!("item:{}", ids[0])).await,
        None,
        "nothing was cached"
    );
}

/// `/readyz` probing a Redis that refuses its `PING` reports Redis down, but the probe is
/// not a read: it neither opens the circuit breaker (which would send every read past the
/// cache) nor counts toward it.
#[tokio::test]
async fn failed_readiness_probes_do_not_open_the_circuit() {
    let base = spawn_app().await;
    let id = base.insert_items(1).await[0];
    let app = app_with_redis_rights(&base, &["~*", "+@all", "-ping"]).await;

    // The breaker opens after 5 consecutive failures; twice that many probes.
    for _ in 0..10 {
        let ready = app.get("/readyz").await;
        assert_eq!(ready.status(), 200);
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(body["redis"], "down", "{body}");
    }
    let read = app.get_item(id).await;
    assert_eq!(read.status(), 200);
    assert_eq!(
        header(&read, "x-cache"),
        "MISS",
        "reads still use the cache"
    );
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
}
