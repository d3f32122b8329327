//! `Cache-Status` (RFC 9211) beside `X-Cache` on item reads, batch reads and name lookups:
//! one list member, `itemcache`, saying in the standard's terms what `X-Cache` says.

use std::time::Duration;

use crate::freshness::short_lived;
use crate::support::{Backends, Spawn, TestApp, eventually, header, spawn_app};

const HIT: &str = "itemcache; hit";
const MISS: &str = "itemcache; fwd=miss; stored";
const STALE: &str = "itemcache; fwd=stale; fwd-status=503";
const BYPASS: &str = "itemcache; fwd=bypass";

/// `Cache-Status` taken apart: the member and its outcome, then its `ttl` and `detail`.
fn cache_status(response: &reqwest::Response) -> (String, Option<i64>, Option<String>) {
    let value = header(response, "cache-status");
    let (mut kept, mut ttl, mut detail) = (Vec::new(), None, None);
    for part in value.split("; ") {
        if let Some(seconds) = part.strip_prefix("ttl=") {
            let seconds = seconds.parse::<i64>();
            ttl = Some(seconds.unwrap_or_else(|_| panic!("ttl is not an integer: {value}")));
        } else if let Some(what) = part.strip_prefix("detail=") {
            detail = Some(what.to_owned());
        } else {
            kept.push(part);
        }
    }
    (kept.join("; "), ttl, detail)
}

/// `X-Cache` and `Cache-Status` of a response, the latter without `ttl` and `detail`.
fn statuses(response: &reqwest::Response) -> (String, String) {
    (header(response, "x-cache"), cache_status(response).0)
}

async fn read(app: &TestApp, path: &str) -> (String, String) {
    let response = app.get(path).await;
    assert!(
        [200, 304, 404].contains(&response.status().as_u16()),
        "{path}: {}",
        response.status()
    );
    statuses(&response)
}

fn pair(x_cache: &str, cache_status: &str) -> (String, String) {
    (x_cache.to_owned(), cache_status.to_owned())
}

#[tokio::test]
async fn a_miss_that_was_cached_and_the_hits_after_it_say_so() {
    let app = spawn_app().await;
    let ids = app.insert_items(2).await;
    let (id, other) = (ids[0], ids[1]);
    let item = format!("/items/{id}");

    assert_eq!(read(&app, &item).await, pair("MISS", MISS));
    assert_eq!(read(&app, &item).await, pair("HIT", HIT));
    // A 304 is answered from the cache too.
    let not_modified = app
        .client
        .get(app.url(&item))
        .header("If-None-Match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(statuses(&not_modified), pair("HIT", HIT));

    // A "not found" is cached like an item.
    let absent = "/items/999999999";
    assert_eq!(read(&app, absent).await, pair("MISS", MISS));
    assert_eq!(read(&app, absent).await, pair("HIT", HIT));

    // A batch: a miss while any id came from Postgres, then a hit.
    let batch = format!("/items?ids={id},{other}");
    assert_eq!(read(&app, &batch).await, pair("MISS", MISS));
    assert_eq!(read(&app, &batch).await, pair("HIT", HIT));

    // A name lookup's first page is cached; the items are named "item N".
    let by_name = "/items?name=item%201";
    assert_eq!(read(&app, by_name).await, pair("MISS", MISS));
    assert_eq!(read(&app, by_name).await, pair("HIT", HIT));

    // A listing is not a cached read: neither header.
    let page = app.get("/items?limit=5").await;
    assert_eq!(statuses(&page), pair("", ""));
}

#[tokio::test]
async fn a_hit_says_how_fresh_its_entry_is_and_when_it_is_revalidated() {
    let app = Spawn::default().ttl(300, 10).start().await;
    let id = app.insert_items(1).await[0];
    assert_eq!(
        read(&app, &format!("/items/{id}")).await,
        pair("MISS", MISS)
    );
    let hit = app.get_item(id).await;
    let (status, ttl, detail) = cache_status(&hit);
    assert_eq!(status, HIT);
    assert!(ttl.is_some_and(|s| (290..300).contains(&s)), "ttl {ttl:?}");
    assert_eq!(detail, None, "far from expiry: no early refresh");

    // Past freshness, within CACHE_SWR_SECS: still a hit, a stale one, being revalidated.
    let app = short_lived().await;
    let id = app.insert_items(1).await[0];
    assert_eq!(
        read(&app, &format!("/items/{id}")).await,
        pair("MISS", MISS)
    );
    let (x_cache, ttl) = eventually(
        "a hit served while revalidating",
        Duration::from_secs(5),
        || async {
            let response = app.get_item(id).await;
            let (status, ttl, detail) = cache_status(&response);
            (detail.as_deref() == Some("stale-while-revalidate"))
                .then(|| ((header(&response, "x-cache"), status), ttl))
        },
    )
    .await;
    assert_eq!(x_cache, pair("HIT", HIT));
    assert!(
        ttl.is_some_and(|s| s < 0),
        "a stale hit has negative freshness: {ttl:?}"
    );
}

#[tokio::test]
async fn with_the_cache_disabled_every_read_bypasses_it() {
    let app = Spawn::default().var("CACHE_ENABLED", "false").start().await;
    let ids = app.insert_items(2).await;
    for path in [
        format!("/items/{}", ids[0]),
        format!("/items/{}", ids[0]),
        format!("/items?ids={},{}", ids[0], ids[1]),
        "/items?name=item%201".to_owned(),
        "/items/999999999".to_owned(),
    ] {
        assert_eq!(read(&app, &path).await, pair("BYPASS", BYPASS), "{path}");
    }
}

#[tokio::test]
async fn with_postgres_down_a_stale_entry_says_its_forward_failed() {
    let app = Spawn::default()
        .backends(Backends::dedicated().await)
        // No stale-while-revalidate: else the entry is served as a hit, revalidating, first.
        .ttl(1, 0)
        .start()
        .await;
    let id = app.insert_items(1).await[0];
    let item = format!("/items/{id}");
    assert_eq!(read(&app, &item).await, pair("MISS", MISS));

    app.backends.pg.stop();
    // Fresh for a second more, then served stale: the forward to Postgres failed.
    let stale = eventually(
        "the entry to be served stale",
        Duration::from_secs(5),
        || async {
            let response = app.get(&item).await;
            assert_eq!(response.status(), 200);
            let got = statuses(&response);
            (got.0 == "STALE").then_some(got)
        },
    )
    .await;
    assert_eq!(stale, pair("STALE", STALE));
    let batch = app.get(&format!("/items?ids={id}")).await;
    assert_eq!(batch.status(), 200);
    assert_eq!(statuses(&batch), pair("STALE", STALE));
    app.backends.pg.start_again();
}
