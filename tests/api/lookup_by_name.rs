//! `GET /items?name=` (contract §6): exact-name lookups, cached as lists of ids, and never
//! an old membership after a write's acknowledgement — through the API or through psql
//! (the change feed).

use std::sync::Arc;
use std::time::Duration;

use itemcache::failpoints;
use serde_json::{Value, json};

use crate::support::{TestApp, eventually, header, spawn_app};

/// The change feed applies a psql write within milliseconds; a busy 2-core machine.
const APPLIED_WITHIN: Duration = Duration::from_secs(5);

fn query(name: &str) -> String {
    let mut encoded = String::new();
    for byte in name.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'~' => {
                encoded.push(byte as char)
            }
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    format!("/items?name={encoded}")
}

/// The ids a lookup of `name` returns, and its `X-Cache`.
async fn lookup(app: &TestApp, name: &str) -> (Vec<i64>, String) {
    let response = app.get(&query(name)).await;
    assert_eq!(response.status(), 200, "lookup {name:?}");
    let cache = header(&response, "x-cache");
    let body: Value = response.json().await.unwrap();
    let ids = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            assert_eq!(item["name"], name, "only exact matches");
            item["id"].as_i64().unwrap()
        })
        .collect();
    (ids, cache)
}

async fn create(app: &TestApp, name: &str) -> i64 {
    app.create_item(name, 1).await["id"].as_i64().unwrap()
}

#[tokio::test]
async fn each_lookup_after_a_write_shows_the_new_membership() {
    let app = spawn_app().await;
    let a = create(&app, "lamp").await;
    let b = create(&app, "lamp").await;
    create(&app, "lamp shade").await;
    // The feed's own invalidation of the name for `a`'s insert, landing after `b`'s stamp
    // and after the first lookup noted it, would refuse that lookup's fill: let it land.
    app.settle_feed().await;
    assert_eq!(lookup(&app, "lamp").await, (vec![a, b], "MISS".into()));
    assert_eq!(lookup(&app, "lamp").await, (vec![a, b], "HIT".into()));

    // Renamed through the API: gone from the old name, there under the new one.
    assert_eq!(
        app.patch_item(b, &json!({"name": "lantern"}))
            .await
            .status(),
        200
    );
    assert_eq!(lookup(&app, "lamp").await.0, vec![a]);
    assert_eq!(lookup(&app, "lantern").await.0, vec![b]);
    // An update that keeps the name shows through the name's entry at once.
    assert_eq!(
        app.patch_item(a, &json!({"price_cents": 9})).await.status(),
        200
    );
    let response = app.get(&query("lamp")).await;
    assert_eq!(
        response.json::<Value>().await.unwrap()["items"][0]["price_cents"],
        9
    );

    // Deleted, then a third created with the name.
    assert_eq!(app.delete_item(a).await.status(), 204);
    assert_eq!(lookup(&app, "lamp").await.0, Vec::<i64>::new());
    let c = create(&app, "lamp").await;
    assert_eq!(lookup(&app, "lamp").await.0, vec![c]);
}

#[tokio::test]
async fn renames_by_psql_reach_the_lookup_through_the_change_feed() {
    let app = spawn_app().await;
    let a = create(&app, "desk").await;
    let b = create(&app, "desk").await;
    app.settle_feed().await; // as above
    assert_eq!(lookup(&app, "desk").await.0, vec![a, b]);
    assert_eq!(lookup(&app, "desk").await.1, "HIT");
    app.sql(&format!("UPDATE items SET name = 'table' WHERE id = {a}"))
        .await;
    eventually("the rename to reach 'desk'", APPLIED_WITHIN, || async {
        (lookup(&app, "desk").await.0 == vec![b]).then_some(())
    })
    .await;
    assert_eq!(lookup(&app, "table").await.0, vec![a]);
    app.sql(&format!("DELETE FROM items WHERE id = {b}")).await;
    eventually("the delete to reach 'desk'", APPLIED_WITHIN, || async {
        lookup(&app, "desk").await.0.is_empty().then_some(())
    })
    .await;
    app.sql("INSERT INTO items (name) VALUES ('desk')").await;
    eventually("the insert to reach 'desk'", APPLIED_WITHIN, || async {
        (lookup(&app, "desk").await.0.len() == 1).then_some(())
    })
    .await;
}

/// A lookup paused between its Postgres read and its fill while a rename commits: its fill
/// is refused, so the next lookup does not see the old membership.
#[tokio::test]
async fn a_name_fill_from_before_a_rename_is_refused() {
    let app = Arc::new(spawn_app().await);
    let a = create(&app, "chair").await;
    let armed = failpoints::arm(
        failpoints::BEFORE_FILL,
        &format!("{}name:chair", app.prefix),
    );
    let reader = {
        let app = app.clone();
        tokio::spawn(async move { lookup(&app, "chair").await })
    };
    tokio::time::timeout(Duration::from_secs(10), armed.reached())
        .await
        .expect("the lookup reached the fill");
    assert_eq!(
        app.patch_item(a, &json!({"name": "stool"})).await.status(),
        200
    );
    armed.release();
    let (early, _) = reader.await.unwrap();
    // The early lookup read its list before the rename: it may show the item (under the
    // exact-name guard it does not, since its entry is read after the rename).
    assert!(early.is_empty() || early == vec![a]);
    assert_eq!(
        app.redis_get("name:chair").await,
        None,
        "the fill was refused"
    );
    assert_eq!(lookup(&app, "chair").await.0, Vec::<i64>::new());
}

#[tokio::test]
async fn concurrent_lookups_of_one_uncached_name_cost_one_query_each_way() {
    let app = Arc::new(spawn_app().await);
    for _ in 0..3 {
        create(&app, "shelf").await;
    }
    let before = app.item_queries().await;
    let lookups: Vec<_> = (0..50)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { lookup(&app, "shelf").await })
        })
        .collect();
    for lookup in lookups {
        assert_eq!(lookup.await.unwrap().0.len(), 3);
    }
    // One query for the name's ids, one for the items (each coalesced).
    assert_eq!(app.item_queries().await - before, 2);
}

#[tokio::test]
async fn pages_follow_the_listing() {
    let app = spawn_app().await;
    app.sql("INSERT INTO items (name) SELECT 'bulk' FROM generate_series(1, 120)")
        .await;
    app.settle_feed().await;
    let first: Value = app.get(&query("bulk")).await.json().await.unwrap();
    assert_eq!(first["items"].as_array().unwrap().len(), 50);
    let after = first["next_after_id"].as_i64().expect("more pages");
    let cached: Value = app.get(&query("bulk")).await.json().await.unwrap();
    assert_eq!(cached, first, "the cached first page is the same page");
    let second = app
        .get(&format!("{}&after_id={after}&limit=100", query("bulk")))
        .await;
    assert_eq!(header(&second, "x-cache"), "BYPASS");
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["items"].as_array().unwrap().len(), 70);
    assert_eq!(second["next_after_id"], Value::Null);
    assert_eq!(second["items"][0]["id"].as_i64().unwrap(), after + 1);
}

#[tokio::test]
async fn hostile_names_are_matched_exactly_and_never_a_5xx() {
    let app = spawn_app().await;
    let names = [
        "50% off",
        "a_b",
        "it's \"quoted\"",
        "back\\slash",
        "ünïcödé ✓",
    ];
    for name in names {
        create(&app, name).await;
    }
    for name in names {
        assert_eq!(lookup(&app, name).await.0.len(), 1, "{name:?}");
    }
    // LIKE patterns match nothing: only exact names do.
    for pattern in ["50%", "a%", "a_c", "%", "_"] {
        assert_eq!(
            lookup(&app, pattern).await.0,
            Vec::<i64>::new(),
            "{pattern:?}"
        );
    }
    let nul = app.get("/items?name=a%00b").await;
    assert_eq!(nul.status(), 200);
    let long = "x".repeat(201);
    for bad in [query(""), query(&long), format!("{}&ids=1", query("x"))] {
        let response = app.get(&bad).await;
        assert_eq!(response.status(), 400, "{bad}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_query");
    }
    assert_eq!(lookup(&app, &"y".repeat(200)).await.0, Vec::<i64>::new());
}
