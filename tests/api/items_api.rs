//! Contract §2, row by row: every route's success and errors over real HTTP, the problem
//! document, and the header rules (`ETag`, conditional requests, `X-Cache`,
//! `Server-Timing`, `X-Request-Id`, `Allow`, the write token). Hostile input is
//! `bad_input`'s; cache timing and races are `cache_behaviour`'s and `cache_races`'.

use std::collections::HashSet;

use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

use crate::support::{Spawn, TestApp, assert_problem, header, spawn_app};

const TOKEN: &str = "s3cret";

/// A request to `path` on `app`, to add headers or a body to.
fn request(app: &TestApp, method: Method, path: &str) -> RequestBuilder {
    app.client.request(method, app.url(path))
}

async fn send(builder: RequestBuilder) -> Response {
    builder.send().await.expect("request sent")
}

async fn json_of(response: Response) -> Value {
    response.json().await.expect("a JSON body")
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let response = app.get(path).await;
    assert_eq!(response.status(), 200, "GET {path}");
    json_of(response).await
}

/// Ids of the `items` of a batch or page.
fn ids_in(body: &Value) -> Vec<i64> {
    body["items"]
        .as_array()
        .expect("an items array")
        .iter()
        .map(|item| item["id"].as_i64().expect("an integer id"))
        .collect()
}

fn batch_path(ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("/items?ids={}", ids.join(","))
}

/// The `(metric, dur)` pairs of a `Server-Timing` value such as `cache;dur=0.1, db;dur=2`.
fn server_timings(response: &Response) -> Vec<(String, f64)> {
    header(response, "server-timing")
        .split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            let mut parts = entry.trim().split(';');
            let name = parts.next().unwrap_or("").trim().to_owned();
            let dur = parts
                .find_map(|p| p.trim().strip_prefix("dur="))
                .and_then(|d| d.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no numeric dur in {entry:?}"));
            assert!(dur >= 0.0, "{entry}");
            (name, dur)
        })
        .collect()
}

fn timing_names(response: &Response) -> Vec<String> {
    server_timings(response)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// `2026-11-24T10:00:00.123456Z`: UTC, exactly six fractional digits, `Z`.
fn assert_timestamp(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is a string"));
    let bytes = text.as_bytes();
    assert_eq!(bytes.len(), 27, "{text}");
    assert_eq!(bytes[19], b'.', "{text}");
    assert!(bytes[20..26].iter().all(u8::is_ascii_digit), "{text}");
    assert_eq!(bytes[26], b'Z', "{text}");
    assert!(
        chrono::DateTime::parse_from_rfc3339(text).is_ok(),
        "{text} is RFC 3339"
    );
}

/// Every field of an item, with its JSON type; nothing else.
fn assert_item_shape(item: &Value) {
    let object = item
        .as_object()
        .unwrap_or_else(|| panic!("{item} is an object"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "created_at",
            "description",
            "id",
            "name",
            "price_cents",
            "updated_at",
            "version"
        ],
        "{item}"
    );
    assert!(item["id"].as_i64().is_some_and(|id| id >= 1), "{item}");
    assert!(item["name"].is_string(), "{item}");
    assert!(item["description"].is_string(), "{item}");
    assert!(
        item["price_cents"].as_i64().is_some_and(|p| p >= 0),
        "{item}"
    );
    assert!(item["version"].as_i64().is_some_and(|v| v >= 1), "{item}");
    assert_timestamp(&item["created_at"]);
    assert_timestamp(&item["updated_at"]);
}

async fn create(app: &TestApp, body: Value) -> Value {
    let response = app.post_item(&body).await;
    assert_eq!(response.status(), 201, "create {body}");
    json_of(response).await
}

fn id_of(item: &Value) -> i64 {
    item["id"].as_i64().expect("an integer id")
}

// ---------------------------------------------------------------- GET /items/{id}

#[tokio::test]
async fn an_item_is_served_with_every_field_in_its_type() {
    let app = spawn_app().await;
    let created = create(
        &app,
        json!({"name": "Widget", "description": "a widget", "price_cents": 1999}),
    )
    .await;
    let id = id_of(&created);

    let response = app.get_item(id).await;
    assert_eq!(response.status(), 200);
    assert!(
        header(&response, "content-type").starts_with("application/json"),
        "{}",
        header(&response, "content-type")
    );
    let item = json_of(response).await;
    assert_item_shape(&item);
    assert_eq!(item["id"], id);
    assert_eq!(item["name"], "Widget");
    assert_eq!(item["description"], "a widget");
    assert_eq!(item["price_cents"], 1999);
    assert_eq!(item["version"], 1);
    assert_eq!(item["created_at"], item["updated_at"]);
    assert_eq!(item, created, "the read returns what the create returned");
}

#[tokio::test]
async fn a_hit_serves_the_same_item_as_the_miss() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let miss = app.get_item(id).await;
    assert_eq!(header(&miss, "x-cache"), "MISS");
    let hit = app.get_item(id).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(header(&miss, "etag"), header(&hit, "etag"));
    let (miss, hit) = (json_of(miss).await, json_of(hit).await);
    assert_item_shape(&hit);
    assert_eq!(miss, hit);
}

#[tokio::test]
async fn an_unknown_id_is_a_404_item_not_found_problem() {
    let app = spawn_app().await;
    for _ in 0..2 {
        // The second answer comes from the cached "not found": still the same problem.
        assert_problem(app.get_item(4242).await, 404, "item_not_found").await;
    }
}

#[tokio::test]
async fn an_id_that_is_not_a_positive_integer_is_a_400_invalid_id() {
    let app = spawn_app().await;
    for id in ["abc", "0", "-1", "9223372036854775808", "1.5"] {
        assert_problem(app.get(&format!("/items/{id}")).await, 400, "invalid_id").await;
    }
}

#[tokio::test]
async fn the_largest_id_is_valid_and_simply_not_found() {
    let app = spawn_app().await;
    assert_problem(
        app.get("/items/9223372036854775807").await,
        404,
        "item_not_found",
    )
    .await;
}

#[tokio::test]
async fn if_none_match_with_the_current_etag_is_a_304_without_body() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let first = app.get_item(id).await;
    let etag = header(&first, "etag");
    assert!(!etag.is_empty(), "a read carries an ETag");

    // Once served from the cache (HIT), once read from Postgres (MISS after an eviction).
    for expected_cache in ["HIT", "MISS"] {
        if expected_cache == "MISS" {
            assert_eq!(app.evict(id).await.status(), 204);
        }
        let response = send(
            request(&app, Method::GET, &format!("/items/{id}")).header("if-none-match", &etag),
        )
        .await;
        assert_eq!(response.status(), 304, "{expected_cache}");
        assert_eq!(header(&response, "x-cache"), expected_cache);
        assert_eq!(header(&response, "etag"), etag);
        assert!(
            response.bytes().await.unwrap().is_empty(),
            "a 304 has no body"
        );
    }
}

#[tokio::test]
async fn if_none_match_with_another_etag_is_a_200_with_the_item() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let etag = header(&app.get_item(id).await, "etag");
    for other in ["\"999\"", "\"not-ours\"", "garbage"] {
        let response = send(
            request(&app, Method::GET, &format!("/items/{id}")).header("if-none-match", other),
        )
        .await;
        assert_eq!(response.status(), 200, "{other}");
        assert_eq!(header(&response, "etag"), etag);
        assert_eq!(json_of(response).await["id"], id);
    }
}

#[tokio::test]
async fn the_etag_changes_when_the_item_is_patched() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let before = header(&app.get_item(id).await, "etag");
    assert_eq!(
        app.patch_item(id, &json!({"name": "renamed"}))
            .await
            .status(),
        200
    );
    let after = header(&app.get_item(id).await, "etag");
    assert!(!after.is_empty());
    assert_ne!(before, after);

    // The old tag no longer gets a 304; the new one does.
    let path = format!("/items/{id}");
    let old = send(request(&app, Method::GET, &path).header("if-none-match", &before)).await;
    assert_eq!(old.status(), 200);
    let new = send(request(&app, Method::GET, &path).header("if-none-match", &after)).await;
    assert_eq!(new.status(), 304);
}

// ---------------------------------------------------------------- GET /items?ids=

#[tokio::test]
async fn a_batch_keeps_request_order_lists_duplicates_once_and_names_the_missing() {
    let app = spawn_app().await;
    let ids = app.insert_items(3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let unknown = 999_999;

    let response = app.get(&batch_path(&[c, a, unknown, b, c, a])).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_eq!(ids_in(&body), [c, a, b]);
    assert_eq!(body["missing"], json!([unknown]));
    for item in body["items"].as_array().unwrap() {
        assert_item_shape(item);
        assert_eq!(
            *item,
            get_json(&app, &format!("/items/{}", id_of(item))).await
        );
    }

    let none_found = get_json(&app, &batch_path(&[unknown, unknown + 1])).await;
    assert_eq!(
        none_found,
        json!({"items": [], "missing": [unknown, unknown + 1]})
    );
}

#[tokio::test]
async fn a_batch_is_a_miss_then_a_hit_and_a_miss_again_after_an_eviction() {
    let app = spawn_app().await;
    let ids = app.insert_items(3).await;
    let path = batch_path(&[ids[0], ids[1], ids[2], 777_777]);

    let first = app.get(&path).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    let first = json_of(first).await;

    let repeat = app.get(&path).await;
    assert_eq!(
        header(&repeat, "x-cache"),
        "HIT",
        "every id, the missing one too, is cached"
    );
    assert_eq!(json_of(repeat).await, first);

    assert_eq!(app.evict(ids[1]).await.status(), 204);
    let after_eviction = app.get(&path).await;
    assert_eq!(header(&after_eviction, "x-cache"), "MISS");
    assert_eq!(json_of(after_eviction).await, first);
}

#[tokio::test]
async fn a_batch_of_cold_ids_costs_one_sql_query() {
    let app = spawn_app().await;
    let ids = app.insert_items(6).await;
    let mut wanted = ids.clone();
    wanted.push(888_888);

    let before = app.item_queries().await;
    let body = get_json(&app, &batch_path(&wanted)).await;
    assert_eq!(ids_in(&body), ids);
    assert_eq!(
        app.item_queries().await - before,
        1,
        "seven cold ids, one SQL query"
    );

    let before = app.item_queries().await;
    get_json(&app, &batch_path(&wanted)).await;
    assert_eq!(app.item_queries().await - before, 0, "all hits: no SQL");
}

#[tokio::test]
async fn a_batch_takes_one_to_a_hundred_ids() {
    let app = spawn_app().await;
    let hundred: Vec<i64> = (1..=100).collect();
    let body = get_json(&app, &batch_path(&hundred)).await;
    assert_eq!(body["missing"].as_array().unwrap().len(), 100);

    let hundred_and_one: Vec<i64> = (1..=101).collect();
    assert_problem(
        app.get(&batch_path(&hundred_and_one)).await,
        400,
        "invalid_ids",
    )
    .await;
    assert_problem(app.get("/items?ids=").await, 400, "invalid_ids").await;
}

// ---------------------------------------------------------------- GET /items (listing)

#[tokio::test]
async fn a_listing_walks_every_page_with_limit_and_after_id() {
    let app = spawn_app().await;
    let ids = app.insert_items(7).await;

    let mut seen = Vec::new();
    let mut after_id = 0;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 4, "7 items in pages of 3 take 3 pages");
        let page = get_json(&app, &format!("/items?limit=3&after_id={after_id}")).await;
        let page_ids = ids_in(&page);
        assert!(page_ids.len() <= 3, "{page}");
        for item in page["items"].as_array().unwrap() {
            assert_item_shape(item);
        }
        seen.extend(page_ids.iter().copied());
        match page["next_after_id"].as_i64() {
            Some(next) => {
                assert_eq!(
                    Some(&next),
                    page_ids.last(),
                    "next_after_id is the page's last id"
                );
                after_id = next;
            }
            None => {
                assert!(page["next_after_id"].is_null(), "{page}");
                break;
            }
        }
    }
    assert_eq!(seen, ids, "every item once, in id order");
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn the_last_full_page_says_it_is_the_last() {
    let app = spawn_app().await;
    let ids = app.insert_items(6).await;
    let first = get_json(&app, "/items?limit=3").await;
    assert_eq!(first["next_after_id"], ids[2]);
    let second = get_json(&app, &format!("/items?limit=3&after_id={}", ids[2])).await;
    assert_eq!(ids_in(&second), ids[3..]);
    assert!(
        second["next_after_id"].is_null(),
        "no empty third page to fetch: {second}"
    );
}

#[tokio::test]
async fn a_listing_item_is_the_same_as_a_read_of_it() {
    let app = spawn_app().await;
    let item = create(
        &app,
        json!({"name": "Listed", "description": "d", "price_cents": 7}),
    )
    .await;
    let page = get_json(&app, "/items").await;
    assert_eq!(page["items"], json!([item]));
    assert!(page["next_after_id"].is_null());
}

#[tokio::test]
async fn a_listing_defaults_to_fifty_items() {
    let app = spawn_app().await;
    let ids = app.insert_items(60).await;
    let page = get_json(&app, "/items").await;
    assert_eq!(ids_in(&page), ids[..50]);
    assert_eq!(page["next_after_id"], ids[49]);

    let rest = get_json(&app, &format!("/items?after_id={}", ids[49])).await;
    assert_eq!(ids_in(&rest), ids[50..]);
    assert!(rest["next_after_id"].is_null());
}

#[tokio::test]
async fn a_listing_past_the_last_id_is_empty() {
    let app = spawn_app().await;
    let ids = app.insert_items(2).await;
    let page = get_json(&app, &format!("/items?after_id={}", ids[1])).await;
    assert_eq!(page, json!({"items": [], "next_after_id": null}));
    let page = get_json(&app, "/items?after_id=9223372036854775807&limit=1000").await;
    assert_eq!(page, json!({"items": [], "next_after_id": null}));
}

#[tokio::test]
async fn a_listing_with_a_bad_limit_or_after_id_is_a_400_invalid_query() {
    let app = spawn_app().await;
    for query in [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "after_id=-1",
        "after_id=abc",
        "after_id=9223372036854775808",
    ] {
        assert_problem(
            app.get(&format!("/items?{query}")).await,
            400,
            "invalid_query",
        )
        .await;
    }
    // The bounds themselves are fine.
    get_json(&app, "/items?limit=1&after_id=0").await;
    get_json(&app, "/items?limit=1000").await;
}

// ---------------------------------------------------------------- POST /items

#[tokio::test]
async fn creating_an_item_answers_201_with_its_location_and_the_defaults() {
    let app = spawn_app().await;
    let response = app.post_item(&json!({"name": "Widget"})).await;
    assert_eq!(response.status(), 201);
    let location = header(&response, "location");
    let item = json_of(response).await;
    assert_item_shape(&item);
    assert_eq!(location, format!("/items/{}", id_of(&item)));
    assert_eq!(item["name"], "Widget");
    assert_eq!(item["description"], "");
    assert_eq!(item["price_cents"], 0);
    assert_eq!(item["version"], 1);

    assert_eq!(get_json(&app, &location).await, item);
}

#[tokio::test]
async fn creating_an_item_keeps_every_given_field() {
    let app = spawn_app().await;
    let item = create(
        &app,
        json!({"name": "Gadget", "description": "shiny", "price_cents": 250}),
    )
    .await;
    assert_eq!(item["name"], "Gadget");
    assert_eq!(item["description"], "shiny");
    assert_eq!(item["price_cents"], 250);
}

#[tokio::test]
async fn the_largest_values_the_contract_allows_are_accepted() {
    let app = spawn_app().await;
    // Characters, not bytes: 200 two-byte and 10,000 four-byte characters.
    let name = "é".repeat(200);
    let description = "🦀".repeat(10_000);
    let item = create(
        &app,
        json!({"name": name, "description": description, "price_cents": i64::MAX}),
    )
    .await;
    let read = get_json(&app, &format!("/items/{}", id_of(&item))).await;
    assert_eq!(read["name"], name);
    assert_eq!(read["description"], description);
    assert_eq!(read["price_cents"], i64::MAX);
}

#[tokio::test]
async fn a_created_item_is_readable_at_once_even_after_a_cached_not_found() {
    let app = spawn_app().await;
    // A fresh database: ids start at 1. Read id 1 before it exists, twice, so the
    // "not found" is certainly in the cache.
    let target = 1;
    assert_problem(app.get_item(target).await, 404, "item_not_found").await;
    let cached = app.get_item(target).await;
    assert_eq!(header(&cached, "x-cache"), "HIT");
    assert_eq!(cached.status(), 404);

    let mut created = create(&app, json!({"name": "first"})).await;
    while id_of(&created) < target {
        created = create(&app, json!({"name": "next"})).await;
    }
    assert_eq!(id_of(&created), target);

    let read = app.get_item(target).await;
    assert_eq!(
        read.status(),
        200,
        "the cached 404 did not survive the create"
    );
    assert_eq!(json_of(read).await, created);
}

#[tokio::test]
async fn json_with_parameters_or_a_json_suffix_is_accepted() {
    let app = spawn_app().await;
    for content_type in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ] {
        let response = send(
            request(&app, Method::POST, "/items")
                .header("content-type", content_type)
                .body(r#"{"name": "typed"}"#),
        )
        .await;
        assert_eq!(response.status(), 201, "{content_type}");
    }
}

#[tokio::test]
async fn a_body_of_exactly_64_kib_is_accepted() {
    let app = spawn_app().await;
    // The limit is "over 64 KiB": pad a valid item with whitespace to exactly 65,536 bytes.
    let item = json!({"name": "padded", "description": "🦀".repeat(10_000)}).to_string();
    let body = format!("{item}{}", " ".repeat(64 * 1024 - item.len()));
    assert_eq!(body.len(), 65_536);
    let response = send(
        request(&app, Method::POST, "/items")
            .header("content-type", "application/json")
            .body(body),
    )
    .await;
    assert_eq!(response.status(), 201);
}

// ---------------------------------------------------------------- PATCH /items/{id}

#[tokio::test]
async fn a_patch_changes_only_the_given_fields_and_bumps_the_version() {
    let app = spawn_app().await;
    let original = create(
        &app,
        json!({"name": "Widget", "description": "d", "price_cents": 100}),
    )
    .await;
    let id = id_of(&original);

    let response = app.patch_item(id, &json!({"price_cents": 250})).await;
    assert_eq!(response.status(), 200);
    let patched = json_of(response).await;
    assert_item_shape(&patched);
    assert_eq!(patched["version"], 2);
    assert_eq!(patched["price_cents"], 250);
    assert_eq!(patched["name"], "Widget");
    assert_eq!(patched["description"], "d");
    assert_eq!(patched["created_at"], original["created_at"]);
    assert!(
        patched["updated_at"].as_str() > original["updated_at"].as_str(),
        "updated_at moves on: {original} -> {patched}"
    );

    let patched = json_of(
        app.patch_item(id, &json!({"name": "Renamed", "description": ""}))
            .await,
    )
    .await;
    assert_eq!(patched["version"], 3);
    assert_eq!(patched["name"], "Renamed");
    assert_eq!(patched["description"], "");
    assert_eq!(patched["price_cents"], 250);
}

#[tokio::test]
async fn a_patch_with_the_current_etag_in_if_match_succeeds() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let etag = header(&app.get_item(id).await, "etag");
    let response = send(
        request(&app, Method::PATCH, &format!("/items/{id}"))
            .header("if-match", &etag)
            .json(&json!({"name": "guarded"})),
    )
    .await;
    assert_eq!(response.status(), 200);
    let new_etag = header(&response, "etag");
    let item = json_of(response).await;
    assert_eq!(item["name"], "guarded");
    assert_eq!(item["version"], 2);
    assert_ne!(new_etag, etag);
}

#[tokio::test]
async fn a_patch_with_a_stale_etag_is_a_412_and_changes_nothing() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let stale = header(&app.get_item(id).await, "etag");
    assert_eq!(
        app.patch_item(id, &json!({"name": "first"})).await.status(),
        200
    );
    let current = get_json(&app, &format!("/items/{id}")).await;

    let response = send(
        request(&app, Method::PATCH, &format!("/items/{id}"))
            .header("if-match", &stale)
            .json(&json!({"name": "second"})),
    )
    .await;
    assert_problem(response, 412, "version_conflict").await;
    assert_eq!(get_json(&app, &format!("/items/{id}")).await, current);
    assert_eq!(current["name"], "first");
}

#[tokio::test]
async fn patching_a_missing_item_is_a_404() {
    let app = spawn_app().await;
    assert_problem(
        app.patch_item(31337, &json!({"name": "ghost"})).await,
        404,
        "item_not_found",
    )
    .await;
    let guarded = send(
        request(&app, Method::PATCH, "/items/31337")
            .header("if-match", "\"1\"")
            .json(&json!({"name": "ghost"})),
    )
    .await;
    assert_problem(guarded, 404, "item_not_found").await;
    assert_problem(app.get_item(31337).await, 404, "item_not_found").await;
}

#[tokio::test]
async fn the_read_after_a_patch_returns_the_new_state() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    app.get_item(id).await;
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");

    let patched = json_of(app.patch_item(id, &json!({"price_cents": 4242})).await).await;
    for _ in 0..2 {
        let read = app.get_item(id).await;
        let cache = header(&read, "x-cache");
        assert!(cache == "MISS" || cache == "HIT", "{cache}");
        assert_eq!(json_of(read).await, patched);
    }
    let batch = get_json(&app, &batch_path(&[id])).await;
    assert_eq!(batch["items"], json!([patched]));
}

// ---------------------------------------------------------------- DELETE /items/{id}

#[tokio::test]
async fn deleting_an_item_answers_204_and_it_is_gone() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    // Cached first, so the delete has an entry to invalidate.
    app.get_item(id).await;
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");

    let response = app.delete_item(id).await;
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty());
    for _ in 0..2 {
        assert_problem(app.get_item(id).await, 404, "item_not_found").await;
    }
    let batch = get_json(&app, &batch_path(&[id])).await;
    assert_eq!(batch, json!({"items": [], "missing": [id]}));
    assert_problem(app.delete_item(id).await, 404, "item_not_found").await;
}

#[tokio::test]
async fn a_delete_with_a_stale_etag_is_a_412_and_keeps_the_item() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let stale = header(&app.get_item(id).await, "etag");
    assert_eq!(
        app.patch_item(id, &json!({"name": "moved on"}))
            .await
            .status(),
        200
    );
    let path = format!("/items/{id}");

    let response = send(request(&app, Method::DELETE, &path).header("if-match", &stale)).await;
    assert_problem(response, 412, "version_conflict").await;
    assert_eq!(get_json(&app, &path).await["name"], "moved on");

    let current = header(&app.get_item(id).await, "etag");
    let response = send(request(&app, Method::DELETE, &path).header("if-match", &current)).await;
    assert_eq!(response.status(), 204);
    assert_problem(app.get_item(id).await, 404, "item_not_found").await;
}

#[tokio::test]
async fn deleting_a_missing_item_is_a_404() {
    let app = spawn_app().await;
    assert_problem(app.delete_item(5150).await, 404, "item_not_found").await;
}

// ---------------------------------------------------------------- DELETE /cache/items/{id}

#[tokio::test]
async fn evicting_an_item_answers_204_and_the_next_read_is_a_miss() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    app.get_item(id).await;
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");

    let response = app.evict(id).await;
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty());
    let read = app.get_item(id).await;
    assert_eq!(read.status(), 200, "eviction leaves Postgres alone");
    assert_eq!(header(&read, "x-cache"), "MISS");

    // An id that was never cached, or does not exist, evicts just as well.
    assert_eq!(app.evict(987_654).await.status(), 204);
}

// ---------------------------------------------------------------- health

#[tokio::test]
async fn healthz_says_ok() {
    let app = spawn_app().await;
    assert_eq!(get_json(&app, "/healthz").await, json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_reports_both_backends_and_the_change_feed_ok() {
    let app = spawn_app().await;
    // The follower connects in the background at start-up.
    let ready = crate::support::eventually(
        "the change feed to be followed",
        std::time::Duration::from_secs(10),
        || async {
            let ready = get_json(&app, "/readyz").await;
            (ready["change_feed"] != "down").then_some(ready)
        },
    )
    .await;
    assert_eq!(
        ready,
        json!({"status": "ok", "postgres": "ok", "redis": "ok", "change_feed": "applying"})
    );
}

// ---------------------------------------------------------------- headers

/// One request of each kind of answer: success, error, 304, 201, 204, 405, unknown route.
async fn one_of_each_response(app: &TestApp, request_id: Option<&str>) -> Vec<(String, Response)> {
    let id = app.insert_items(1).await[0];
    let etag = header(&app.get_item(id).await, "etag");
    let requests: Vec<(&str, RequestBuilder)> = vec![
        (
            "item read",
            request(app, Method::GET, &format!("/items/{id}")),
        ),
        (
            "304",
            request(app, Method::GET, &format!("/items/{id}")).header("if-none-match", &etag),
        ),
        ("404", request(app, Method::GET, "/items/424242")),
        ("400", request(app, Method::GET, "/items/abc")),
        ("batch", request(app, Method::GET, &batch_path(&[id]))),
        ("listing", request(app, Method::GET, "/items")),
        (
            "create",
            request(app, Method::POST, "/items").json(&json!({"name": "x"})),
        ),
        (
            "422",
            request(app, Method::POST, "/items").json(&json!({"name": ""})),
        ),
        (
            "patch",
            request(app, Method::PATCH, &format!("/items/{id}")).json(&json!({"name": "y"})),
        ),
        (
            "evict",
            request(app, Method::DELETE, &format!("/cache/items/{id}")),
        ),
        (
            "delete",
            request(app, Method::DELETE, &format!("/items/{id}")),
        ),
        ("405", request(app, Method::PUT, "/items/1")),
        ("unknown route", request(app, Method::GET, "/nope")),
        ("healthz", request(app, Method::GET, "/healthz")),
        ("readyz", request(app, Method::GET, "/readyz")),
        ("metrics", request(app, Method::GET, "/metrics")),
    ];
    let mut responses = Vec::new();
    for (what, builder) in requests {
        let builder = match request_id {
            Some(rid) => builder.header("x-request-id", rid),
            None => builder,
        };
        responses.push((what.to_owned(), send(builder).await));
    }
    responses
}

#[tokio::test]
async fn every_response_carries_a_new_request_id_when_none_is_sent() {
    let app = spawn_app().await;
    let mut seen = HashSet::new();
    for (what, response) in one_of_each_response(&app, None).await {
        let rid = header(&response, "x-request-id");
        assert!(
            uuid::Uuid::parse_str(&rid).is_ok(),
            "{what}: X-Request-Id {rid:?} is a UUID"
        );
        assert!(seen.insert(rid.clone()), "{what}: {rid} is new");
    }
}

#[tokio::test]
async fn the_clients_request_id_is_sent_back() {
    let app = spawn_app().await;
    let rid = "client-req-0042";
    for (what, response) in one_of_each_response(&app, Some(rid)).await {
        assert_eq!(header(&response, "x-request-id"), rid, "{what}");
    }
}

#[tokio::test]
async fn an_unreasonable_request_id_is_replaced_by_a_new_one() {
    let app = spawn_app().await;
    // Over 128 characters, or not visible ASCII: not echoed into headers and logs.
    for presented in ["x".repeat(10_000), "has spaces in it".to_owned()] {
        let response =
            send(request(&app, Method::GET, "/healthz").header("x-request-id", &presented)).await;
        let rid = header(&response, "x-request-id");
        assert!(uuid::Uuid::parse_str(&rid).is_ok(), "{rid:.80}");
    }
}

#[tokio::test]
async fn server_timing_reports_db_time_only_when_postgres_was_read() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let cases = [
        (format!("/items/{id}"), "MISS", vec!["cache", "db"]),
        (format!("/items/{id}"), "HIT", vec!["cache"]),
        ("/items/65000".to_owned(), "MISS", vec!["cache", "db"]),
        ("/items/65000".to_owned(), "HIT", vec!["cache"]),
        (batch_path(&[id, 65001]), "MISS", vec!["cache", "db"]),
        (batch_path(&[id, 65001]), "HIT", vec!["cache"]),
    ];
    for (path, cache, timings) in cases {
        let response = app.get(&path).await;
        assert_eq!(header(&response, "x-cache"), cache, "{path}");
        assert_eq!(
            timing_names(&response),
            timings,
            "{path} ({cache}): {}",
            header(&response, "server-timing")
        );
    }
}

#[tokio::test]
async fn reads_bypassing_the_cache_report_db_time() {
    let app = Spawn::default().var("CACHE_ENABLED", "false").start().await;
    let id = app.insert_items(1).await[0];
    for path in [format!("/items/{id}"), batch_path(&[id])] {
        let response = app.get(&path).await;
        assert_eq!(header(&response, "x-cache"), "BYPASS");
        assert!(timing_names(&response).contains(&"db".to_owned()), "{path}");
    }
}

// ---------------------------------------------------------------- WRITE_TOKEN

async fn spawn_app_with_token() -> TestApp {
    Spawn::default().var("WRITE_TOKEN", TOKEN).start().await
}

/// Every kind of write, on item `id`, as a request to add an `Authorization` to.
fn writes(app: &TestApp, id: i64) -> Vec<(&'static str, RequestBuilder)> {
    vec![
        (
            "POST",
            request(app, Method::POST, "/items").json(&json!({"name": "new"})),
        ),
        (
            "PATCH",
            request(app, Method::PATCH, &format!("/items/{id}")).json(&json!({"name": "changed"})),
        ),
        (
            "evict",
            request(app, Method::DELETE, &format!("/cache/items/{id}")),
        ),
        (
            "DELETE",
            request(app, Method::DELETE, &format!("/items/{id}")),
        ),
    ]
}

async fn listing(app: &TestApp) -> Value {
    get_json(app, "/items?limit=1000").await
}

#[tokio::test]
async fn with_a_write_token_writes_without_it_are_401() {
    let app = spawn_app_with_token().await;
    let id = app.insert_items(1).await[0];
    let before = listing(&app).await;
    for (what, builder) in writes(&app, id) {
        let response = send(builder).await;
        assert_eq!(header(&response, "www-authenticate"), "Bearer", "{what}");
        assert_problem(response, 401, "unauthorized").await;
    }
    assert_eq!(listing(&app).await, before, "nothing was written");
}

#[tokio::test]
async fn with_a_write_token_a_wrong_token_is_401() {
    let app = spawn_app_with_token().await;
    let id = app.insert_items(1).await[0];
    let before = listing(&app).await;
    for authorization in [
        "Bearer nope",
        "Bearer s3cret-and-more",
        "Bearer s3cre",
        "Bearer ",
        "Bearer",
        "s3cret",
        "Basic czNjcmV0",
        "Token s3cret",
    ] {
        for (what, builder) in writes(&app, id) {
            let response = send(builder.header("authorization", authorization)).await;
            assert_eq!(response.status(), 401, "{what} with {authorization:?}");
            assert_problem(response, 401, "unauthorized").await;
        }
    }
    assert_eq!(listing(&app).await, before, "nothing was written");
}

#[tokio::test]
async fn with_a_write_token_the_right_token_writes() {
    let app = spawn_app_with_token().await;
    let id = app.insert_items(1).await[0];
    let expected = [
        ("POST", 201),
        ("PATCH", 200),
        ("evict", 204),
        ("DELETE", 204),
    ];
    for ((what, builder), (expected_what, status)) in writes(&app, id).into_iter().zip(expected) {
        assert_eq!(what, expected_what);
        let response = send(builder.bearer_auth(TOKEN)).await;
        assert_eq!(response.status(), status, "{what}");
    }
    assert_problem(app.get_item(id).await, 404, "item_not_found").await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    // RFC 9110 §11.1: the authentication scheme is a case-insensitive token.
    let app = spawn_app_with_token().await;
    for scheme in ["bearer", "BEARER"] {
        let response = send(
            request(&app, Method::POST, "/items")
                .header("authorization", format!("{scheme} {TOKEN}"))
                .json(&json!({"name": "x"})),
        )
        .await;
        assert_eq!(response.status(), 201, "{scheme}");
    }
}

#[tokio::test]
async fn with_a_write_token_reads_need_no_token() {
    let app = spawn_app_with_token().await;
    let id = app.insert_items(1).await[0];
    for path in [
        format!("/items/{id}"),
        batch_path(&[id]),
        "/items".to_owned(),
        "/healthz".to_owned(),
        "/readyz".to_owned(),
        "/metrics".to_owned(),
    ] {
        assert_eq!(app.get(&path).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn the_token_is_checked_before_the_body_is_read() {
    let app = spawn_app_with_token().await;
    let id = app.insert_items(1).await[0];
    let before = listing(&app).await;
    let path = format!("/items/{id}");
    let hostile: Vec<(&str, RequestBuilder)> = vec![
        (
            "malformed JSON",
            request(&app, Method::POST, "/items")
                .header("content-type", "application/json")
                .body("{not json"),
        ),
        (
            "text/plain",
            request(&app, Method::POST, "/items")
                .header("content-type", "text/plain")
                .body("hello"),
        ),
        (
            "invalid fields",
            request(&app, Method::PATCH, &path).json(&json!({"name": 5})),
        ),
        (
            "oversized",
            request(&app, Method::POST, "/items")
                .header("content-type", "application/json")
                .body(vec![b' '; 70 * 1024]),
        ),
    ];
    for (what, builder) in hostile {
        let response = send(builder).await;
        assert_eq!(response.status(), 401, "{what}");
        assert_problem(response, 401, "unauthorized").await;
    }
    assert_eq!(listing(&app).await, before);
}

// ---------------------------------------------------------------- routing

#[tokio::test]
async fn an_unknown_route_is_a_404_not_found_problem() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::GET, "/"),
        (Method::GET, "/nope"),
        (Method::GET, "/items/1/extra"),
        (Method::GET, "/cache/items"),
        (Method::POST, "/nope"),
        (Method::DELETE, "/cache"),
    ] {
        let response = send(request(&app, method.clone(), path)).await;
        let problem = assert_problem(response, 404, "not_found").await;
        assert_ne!(problem["code"], "item_not_found", "{method} {path}");
    }
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem_with_allow() {
    let app = spawn_app().await;
    for (method, path, allowed) in [
        (
            Method::PUT,
            "/items/1",
            vec!["GET", "HEAD", "PATCH", "DELETE"],
        ),
        (
            Method::POST,
            "/items/1",
            vec!["GET", "HEAD", "PATCH", "DELETE"],
        ),
        (Method::GET, "/cache/items/1", vec!["DELETE"]),
        (Method::PUT, "/items", vec!["GET", "HEAD", "POST"]),
        (Method::DELETE, "/items", vec!["GET", "HEAD", "POST"]),
        (Method::POST, "/healthz", vec!["GET", "HEAD"]),
        (Method::DELETE, "/readyz", vec!["GET", "HEAD"]),
    ] {
        let response = send(request(&app, method.clone(), path)).await;
        let allow = header(&response, "allow");
        let listed: Vec<&str> = allow.split(',').map(str::trim).collect();
        for method in &allowed {
            assert!(
                listed.contains(method),
                "{path}: Allow {allow:?} lists {method}"
            );
        }
        assert!(
            !listed.contains(&method.as_str()),
            "{method} {path}: Allow {allow:?}"
        );
        assert_problem(response, 405, "method_not_allowed").await;
    }
}

/// HEAD is served wherever GET is (RFC 9110 §9.1): GET's status and headers, no body.
#[tokio::test]
async fn head_answers_like_get_without_the_body() {
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let item = format!("/items/{id}");
    let missing = format!("/items/{}", id + 1_000_000);
    for (path, cache) in [
        (item.as_str(), "MISS"),
        (item.as_str(), "HIT"),
        (missing.as_str(), "MISS"),
        ("/items?ids=1,2", ""),
        ("/healthz", ""),
        ("/openapi.json", ""),
    ] {
        let head = send(request(&app, Method::HEAD, path)).await;
        let get = app.get(path).await;
        let what = format!("HEAD {path}");
        assert_eq!(head.status(), get.status(), "{what}");
        if !cache.is_empty() {
            assert_eq!(header(&head, "x-cache"), cache, "{what}");
        }
        for name in ["content-type", "content-length", "etag"] {
            assert_eq!(header(&head, name), header(&get, name), "{what}: {name}");
        }
        assert!(!header(&head, "x-request-id").is_empty(), "{what}");
    }
    // No body on the wire (an HTTP client would not read one after HEAD anyway): on one
    // connection, the bytes after HEAD's headers are the next response's status line.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    for path in [item.as_str(), missing.as_str()] {
        let next = exchange(&mut conn, "HEAD", path).await;
        assert!(next.is_empty(), "HEAD {path}: {next:?} after the headers");
    }
    let next = exchange(&mut conn, "GET", "/healthz").await;
    assert!(
        next.ends_with(r#"{"status":"ok"}"#),
        "GET after HEADs: {next:?}"
    );

    let etag = header(&app.get(&item).await, "etag");
    let not_modified =
        send(request(&app, Method::HEAD, &item).header("if-none-match", &etag)).await;
    assert_eq!(not_modified.status(), 304);
}

/// Sends `method path` on `conn` (keep-alive) and reads one response: returns what came
/// after the header block, once the peer has been quiet for a moment.
async fn exchange(conn: &mut tokio::net::TcpStream, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let wait = if got.windows(4).any(|w| w == b"\r\n\r\n") {
            std::time::Duration::from_millis(300)
        } else {
            std::time::Duration::from_secs(10)
        };
        match tokio::time::timeout(wait, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => panic!("{method} {path}: connection closed"),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a header block");
    assert!(head.starts_with("HTTP/1.1 "), "{method} {path}: {head}");
    rest.to_owned()
}
