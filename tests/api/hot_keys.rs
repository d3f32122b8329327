//! `GET /admin/hot-keys` and `itemcache_hot_key_share`: the ids an instance reads most
//! (item and batch reads), most read first, behind the write token when there is one.

use serde_json::{Value, json};

use crate::support::{Spawn, TestApp, assert_problem, header, spawn_app};

const TOKEN: &str = "s3cret";

async fn hot_keys(app: &TestApp) -> Vec<Value> {
    let response = app.get("/admin/hot-keys").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "application/json");
    response.json().await.expect("a JSON list")
}

#[tokio::test]
async fn the_most_read_id_ranks_first_with_its_count_and_share() {
    let app = spawn_app().await;
    assert_eq!(
        hot_keys(&app).await,
        Vec::<Value>::new(),
        "nothing read yet"
    );
    let ids = app.insert_items(3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    for (id, reads) in [(b, 3), (a, 5), (c, 1)] {
        for _ in 0..reads {
            assert_eq!(app.get_item(id).await.status(), 200);
        }
    }
    // A batch read counts each of its ids; a miss counts like a hit.
    let batch = app.get(&format!("/items?ids={c},{b},{a}")).await;
    assert_eq!(batch.status(), 200);
    // Reads of ids that do not exist count too; listings and writes do not.
    assert_eq!(app.get_item(999_999).await.status(), 404);
    app.get("/items?limit=5").await;
    app.patch_item(c, &json!({"price_cents": 5})).await;

    // 13 reads: a 6, b 4, c 2, the missing id 1. Far fewer ids than counters: exact.
    let total = 13.0;
    let listed = hot_keys(&app).await;
    let expected: Vec<(i64, u64)> = vec![(a, 6), (b, 4), (c, 2), (999_999, 1)];
    assert_eq!(listed.len(), expected.len(), "{listed:?}");
    for (entry, (id, count)) in listed.iter().zip(&expected) {
        let mut keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["count", "error", "id", "share"], "{entry}");
        assert_eq!(entry["id"], *id, "{listed:?}");
        assert_eq!(entry["count"], *count, "{entry}");
        assert_eq!(entry["error"], 0, "{entry}");
        let share = entry["share"].as_f64().unwrap();
        assert!((share - *count as f64 / total).abs() < 1e-9, "{entry}");
    }

    // The same ids in the metrics, one series each, with the same shares.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("itemcache_hot_key_share{"))
        .collect();
    assert_eq!(series.len(), expected.len(), "{series:?}");
    assert_eq!(
        series[0],
        format!("itemcache_hot_key_share{{id=\"{a}\"}} {}", 6.0 / total)
    );
    assert!(metrics.contains("# TYPE itemcache_hot_key_share gauge"));
}

#[tokio::test]
async fn with_a_write_token_the_hot_keys_need_it() {
    let app = Spawn::default().var("WRITE_TOKEN", TOKEN).start().await;
    let id = app.insert_items(1).await[0];
    assert_eq!(app.get_item(id).await.status(), 200, "reads need no token");

    let without = app.get("/admin/hot-keys").await;
    assert_eq!(header(&without, "www-authenticate"), "Bearer");
    assert_problem(without, 401, "unauthorized").await;
    let wrong = app
        .client
        .get(app.url("/admin/hot-keys"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_problem(wrong, 401, "unauthorized").await;

    let with = app
        .client
        .get(app.url("/admin/hot-keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 200);
    let listed: Vec<Value> = with.json().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (&listed[0]["id"], &listed[0]["share"]),
        (&json!(id), &json!(1.0))
    );
}
