//! `GET /admin/hot-keys` and `itemcache_hot_key_share`: the ids an instance reads most
//! (item and batch reads), most read first, behind the write token when there is one.
//!
//! One read in 8 is sampled, at random gaps of at most 15 reads: the reads here are many
//! enough, and far enough apart per id, that the order cannot come out otherwise (the
//! closest pair is over 4 standard deviations apart).

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::{Spawn, TestApp, assert_problem, header, spawn_app};

const TOKEN: &str = "s3cret";
/// Reads per sampled read (`hot_keys::SAMPLE_EVERY`).
const SAMPLE_EVERY: u64 = 8;

async fn hot_keys(app: &TestApp) -> Vec<Value> {
    let response = app.get("/admin/hot-keys").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "application/json");
    response.json().await.expect("a JSON list")
}

/// `times` GETs of `path`, 8 at a time.
async fn get_times(app: &TestApp, path: &str, times: usize) {
    for _ in 0..times / 8 {
        let responses = join_all((0..8).map(|_| app.get(path))).await;
        for response in responses {
            assert!([200, 404].contains(&response.status().as_u16()), "{path}");
        }
    }
}

#[tokio::test]
async fn the_most_read_id_ranks_first_with_its_estimated_count_and_share() {
    let app = spawn_app().await;
    assert_eq!(
        hot_keys(&app).await,
        Vec::<Value>::new(),
        "nothing read yet"
    );
    let ids = app.insert_items(3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    // 1,700 reads: a 1,200 (800 alone, 400 in batches), b 400 (in batches), c 100. A batch
    // counts each of its ids; listings and writes count nothing.
    get_times(&app, &format!("/items?ids={c},{b},{a}"), 104).await;
    get_times(&app, &format!("/items?ids={b},{a}"), 296).await;
    get_times(&app, &format!("/items/{a}"), 800).await;
    app.get("/items?limit=5").await;
    app.patch_item(c, &json!({"price_cents": 5})).await;
    let reads = [(a, 1_200.0), (b, 400.0), (c, 104.0)];
    let total: f64 = reads.iter().map(|(_, n)| n).sum();

    let listed = hot_keys(&app).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (entry, (id, n)) in listed.iter().zip(reads) {
        let mut keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["count", "error", "id", "share"], "{entry}");
        assert_eq!(entry["id"], id, "most read first: {listed:?}");
        // Three ids, 1,024 counters: no counter was ever taken over.
        assert_eq!(entry["error"], 0, "{entry}");
        let count = entry["count"].as_u64().unwrap();
        assert_eq!(
            count % SAMPLE_EVERY,
            0,
            "the sample's count, scaled: {entry}"
        );
        let share = entry["share"].as_f64().unwrap();
        assert!(
            (share - n / total).abs() < 0.15,
            "{id}: share {share}, read {n} of {total}"
        );
    }
    let shares: f64 = listed.iter().map(|e| e["share"].as_f64().unwrap()).sum();
    assert!(
        (shares - 1.0).abs() < 1e-9,
        "only these ids were read: {shares}"
    );

    // The same ids in the metrics, one series each, with the same shares, most read first.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let series: Vec<(String, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("itemcache_hot_key_share{id=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(id, share)| (id.to_owned(), share.parse().unwrap()))
        .collect();
    assert_eq!(series.len(), listed.len(), "{series:?}");
    for ((id, share), entry) in series.iter().zip(&listed) {
        assert_eq!(id, &entry["id"].to_string());
        // (serde_json's float parsing may be an ulp off.)
        assert!((share - entry["share"].as_f64().unwrap()).abs() < 1e-12);
    }
    assert!(metrics.contains("# TYPE itemcache_hot_key_share gauge"));
}

#[tokio::test]
async fn with_a_write_token_the_hot_keys_need_it() {
    let app = Spawn::default().var("WRITE_TOKEN", TOKEN).start().await;
    let id = app.insert_items(1).await[0];
    // Reads need no token. 48 of them: at least one in any 15 is sampled on each worker.
    get_times(&app, &format!("/items/{id}"), 48).await;

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
