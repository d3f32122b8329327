//! The metrics over real traffic. Each scenario snapshots `/metrics`, drives a scripted
//! sequence of requests, snapshots again, and asserts that every counter (and every
//! histogram's `_count`) moved by exactly what the code records for that traffic, and that
//! nothing else moved. Then: every contract metric is there with its labels and buckets,
//! and promtool reads the whole text.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use reqwest::Method;
use serde_json::json;

use crate::exposition::{Exposition, Labels, labels, promtool_check_metrics};
use crate::serial;
use crate::support::servers::free_port;
use crate::support::{Backends, Spawn, TestApp, eventually, header, spawn_app};

// The contract's names (§3), written out rather than taken from `itemcache::metrics`, so
// that renaming a constant there fails here.
const HTTP_REQUESTS: &str = "itemcache_http_requests_total";
const HTTP_DURATION: &str = "itemcache_http_request_duration_seconds";
const LOOKUPS: &str = "itemcache_cache_lookups_total";
const CACHE_OP_DURATION: &str = "itemcache_cache_operation_duration_seconds";
const CACHE_ERRORS: &str = "itemcache_cache_errors_total";
const DB_QUERY_DURATION: &str = "itemcache_db_query_duration_seconds";
const COALESCED: &str = "itemcache_coalesced_requests_total";
const POOL_CONNECTIONS: &str = "itemcache_pool_connections";
const POOL_WAITERS: &str = "itemcache_pool_waiters";
const BUILD_INFO: &str = "itemcache_build_info";

const HTTP_DURATION_COUNT: &str = "itemcache_http_request_duration_seconds_count";
const CACHE_OP_COUNT: &str = "itemcache_cache_operation_duration_seconds_count";
const DB_QUERY_COUNT: &str = "itemcache_db_query_duration_seconds_count";

/// Every series a scenario accounts for: counters, and the `_count` of each histogram (one
/// observation per request, Redis round trip or query).
const ACCOUNTED: [&str; 7] = [
    HTTP_REQUESTS,
    HTTP_DURATION_COUNT,
    LOOKUPS,
    CACHE_OP_COUNT,
    CACHE_ERRORS,
    DB_QUERY_COUNT,
    COALESCED,
];

/// The `route` label's values: the contract's patterns, and one for every unmatched path.
const ROUTES: [&str; 9] = [
    "/items",
    "/items/{id}",
    "/cache/items/{id}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "unmatched",
];

/// Far beyond any id a test database hands out: reads of these are "not found".
const ABSENT_ID_BASE: i64 = 1_000_000_000;

/// One rendering of `/metrics`, and its place among this test's scrapes: a scrape is
/// counted (`GET /metrics 200`) only after its text was rendered, so it shows up in the next
/// one. Between two snapshots, `/metrics` moves by the difference of their `seq`.
struct Snapshot {
    metrics: Exposition,
    text: String,
    seq: u64,
}

/// Scrapes one app's `/metrics`, counting the scrapes.
struct Scraper<'a> {
    app: &'a TestApp,
    scrapes: Cell<u64>,
}

impl<'a> Scraper<'a> {
    fn new(app: &'a TestApp) -> Scraper<'a> {
        Scraper {
            app,
            scrapes: Cell::new(0),
        }
    }

    async fn scrape(&self) -> Snapshot {
        let response = self.app.get("/metrics").await;
        assert_eq!(response.status(), 200, "GET /metrics");
        let content_type = header(&response, "content-type");
        assert!(
            content_type.starts_with("text/plain"),
            "GET /metrics Content-Type: {content_type}"
        );
        let text = response.text().await.expect("the /metrics body");
        let seq = self.scrapes.get();
        self.scrapes.set(seq + 1);
        let metrics = Exposition::parse(&text)
            .unwrap_or_else(|e| panic!("/metrics is not exposition text: {e}\n{text}"));
        Snapshot { metrics, text, seq }
    }
}

/// How much a scenario should move each accounted series: family -> labels -> delta.
#[derive(Default)]
struct Expected(BTreeMap<&'static str, BTreeMap<Labels, f64>>);

impl Expected {
    fn add(&mut self, family: &'static str, pairs: &[(&str, &str)], n: u64) -> &mut Expected {
        *self
            .0
            .entry(family)
            .or_default()
            .entry(labels(pairs))
            .or_default() += n as f64;
        self
    }

    /// `n` responses: the request counter and the duration histogram's count.
    fn http(
        &mut self,
        method: &str,
        route: &str,
        status: &str,
        cache: &str,
        n: u64,
    ) -> &mut Expected {
        self.add(
            HTTP_REQUESTS,
            &[("method", method), ("route", route), ("status", status)],
            n,
        )
        .add(
            HTTP_DURATION_COUNT,
            &[("method", method), ("route", route), ("cache", cache)],
            n,
        )
    }

    /// The `/metrics` requests made from `before` (inclusive) to `after` (exclusive).
    fn scrapes(&mut self, before: &Snapshot, after: &Snapshot) -> &mut Expected {
        self.http("GET", "/metrics", "200", "none", after.seq - before.seq)
    }

    fn lookups(&mut self, result: &str, n: u64) -> &mut Expected {
        self.add(LOOKUPS, &[("result", result)], n)
    }

    fn cache_ops(&mut self, op: &str, n: u64) -> &mut Expected {
        self.add(CACHE_OP_COUNT, &[("op", op)], n)
    }

    fn cache_errors(&mut self, op: &str, n: u64) -> &mut Expected {
        self.add(CACHE_ERRORS, &[("op", op)], n)
    }

    fn queries(&mut self, query: &str, n: u64) -> &mut Expected {
        self.add(DB_QUERY_COUNT, &[("query", query)], n)
    }

    fn coalesced(&mut self, n: u64) -> &mut Expected {
        self.add(COALESCED, &[], n)
    }

    /// Every accounted series moved by exactly its expected delta; all others stood still.
    /// The change feed's Redis calls (`op="feed"`) are left out: the feed sees each write
    /// a moment after it, in batches of its own making (`change_feed_*` tests cover it).
    fn assert_moved(&self, before: &Snapshot, after: &Snapshot) {
        let mut wrong = Vec::new();
        for family in ACCOUNTED {
            let mut got = after.metrics.deltas(&before.metrics, family);
            got.retain(|labels, _| labels.get("op").is_none_or(|op| op != "feed"));
            let want: BTreeMap<Labels, f64> = self
                .0
                .get(family)
                .into_iter()
                .flatten()
                .filter(|(_, n)| **n != 0.0)
                .map(|(l, n)| (l.clone(), *n))
                .collect();
            let series: BTreeSet<&Labels> = got.keys().chain(want.keys()).collect();
            for labels in series {
                let (g, w) = (
                    got.get(labels).copied().unwrap_or(0.0),
                    want.get(labels).copied().unwrap_or(0.0),
                );
                if g != w {
                    wrong.push(format!(
                        "  {family}{}: expected +{w}, moved +{g}",
                        show(labels)
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "series moved by other amounts than the traffic accounts for:\n{}",
            wrong.join("\n")
        );
    }
}

fn show(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(","))
}

/// One `GET /items/{id}`, checked for its status and `X-Cache`.
async fn read(app: &TestApp, id: i64, status: u16, x_cache: &str) {
    let response = app.get_item(id).await;
    assert_eq!(
        (response.status().as_u16(), header(&response, "x-cache")),
        (status, x_cache.to_owned()),
        "GET /items/{id}: status and X-Cache"
    );
}

/// The scripted sequence, and what it must move. Ids: `items` holds 5 rows nobody has read.
///
/// Per request, as the read path (`items::service`) records it:
/// - read MISS: Redis `GET` (op get); the id's write stamp noted with one `MGET` (op mget);
///   `SELECT` (query get_item); the fill script (op set). One `miss` lookup.
/// - read HIT: `GET` only; one `hit` lookup. A cached "not found" is a HIT with status 404.
/// - batch: one `MGET` (op mget); for the ids not fresh in Redis, one `MGET` of their
///   stamps, one query (get_items for 2 or more ids, get_item for 1), one fill script.
/// - writes and evictions: the invalidation script (new stamp, entry deleted; op delete)
///   after the commit.
/// - 400s, 405s and unmatched routes touch neither Redis nor Postgres: `cache="none"`.
async fn scripted_traffic(app: &TestApp, items: &[i64], expected: &mut Expected) {
    let [a, b, c, d, e] = items else {
        panic!("scripted_traffic needs 5 items, got {items:?}")
    };
    let (absent_1, absent_2) = (ABSENT_ID_BASE + a, ABSENT_ID_BASE + b);

    // 3 misses (cold ids), then 5 hits on them.
    for id in [a, b, c] {
        read(app, *id, 200, "MISS").await;
    }
    for id in [a, b, c, a, b] {
        read(app, *id, 200, "HIT").await;
    }
    // 2 ids that do not exist, each read twice: the "not found" is cached.
    for id in [absent_1, absent_2] {
        read(app, id, 404, "MISS").await;
        read(app, id, 404, "HIT").await;
    }
    // A batch of 4: `a` and `absent_1` are cached (hits), `d` and `e` are cold (misses).
    let batch = app.get(&format!("/items?ids={a},{d},{absent_1},{e}")).await;
    assert_eq!(
        (batch.status().as_u16(), header(&batch, "x-cache")),
        (200, "MISS".to_owned()),
        "the batch"
    );
    // 2 bad requests, a wrong method, and an unknown route (with an id in it, which must
    // not become a label).
    assert_eq!(app.get("/items/not-a-number").await.status(), 400);
    assert_eq!(app.get("/items?ids=0").await.status(), 400);
    let put = app.request(Method::PUT, &format!("/items/{c}")).await;
    assert_eq!(put.status(), 405);
    assert_eq!(app.get("/no/such/route/4242").await.status(), 404);
    // An eviction: the next read of `a` misses again.
    assert_eq!(app.evict(*a).await.status(), 204);
    read(app, *a, 200, "MISS").await;
    // Two writes.
    let patched = app.patch_item(*b, &json!({"price_cents": 7})).await;
    assert_eq!(patched.status(), 200);
    app.create_item("scripted", 1).await;

    expected
        // 3 misses + 5 hits + the re-read after the eviction.
        .http("GET", "/items/{id}", "200", "miss", 3 + 1)
        .http("GET", "/items/{id}", "200", "hit", 5)
        .http("GET", "/items/{id}", "404", "miss", 2)
        .http("GET", "/items/{id}", "404", "hit", 2)
        .http("GET", "/items", "200", "miss", 1)
        .http("GET", "/items/{id}", "400", "none", 1)
        .http("GET", "/items", "400", "none", 1)
        .http("PUT", "/items/{id}", "405", "none", 1)
        .http("GET", "unmatched", "404", "none", 1)
        .http("DELETE", "/cache/items/{id}", "204", "none", 1)
        .http("PATCH", "/items/{id}", "200", "none", 1)
        .http("POST", "/items", "201", "none", 1)
        // single reads: 3 + 1 misses, 2 negative misses; batch: d and e.
        .lookups("miss", 3 + 1 + 2 + 2)
        // single reads: 5 hits, 2 negative hits; batch: a and absent_1.
        .lookups("hit", 5 + 2 + 2)
        // one lookup per single read, which reads the id's write stamp with its entry
        // (a miss notes it from there): 3 + 5 + 4 + 1.
        .cache_ops("get", 13)
        // the batch's MGET, and its load's stamp MGET.
        .cache_ops("mget", 1 + 1)
        // one fill per load.
        .cache_ops("set", 4 + 2 + 1)
        // and one lease taken per load before it (cache::lease).
        .cache_ops("lease", 4 + 2 + 1)
        // eviction, PATCH, POST.
        .cache_ops("delete", 3)
        .queries("get_item", 4 + 2)
        .queries("get_items", 1)
        .queries("update_item", 1)
        .queries("insert_item", 1);
}

#[tokio::test]
async fn scripted_traffic_moves_each_counter_by_exactly_its_share() {
    let _serial = serial().await;
    let app = spawn_app().await;
    let items = app.insert_items(5).await;
    let scraper = Scraper::new(&app);

    let before = scraper.scrape().await;
    let mut expected = Expected::default();
    scripted_traffic(&app, &items, &mut expected).await;
    let after = scraper.scrape().await;

    expected
        .scrapes(&before, &after)
        .assert_moved(&before, &after);
}

/// Runs a statement on a connection of the test's own.
async fn execute(conn: &mut AsyncPgConnection, sql: &str) {
    use diesel_async::RunQueryDsl;
    diesel::sql_query(sql)
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Backends of this test's database waiting for a lock.
async fn lock_waiters(app: &TestApp) -> i64 {
    use diesel::sql_types::BigInt;
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = app.backends.connect(&app.database).await;
    let waiting: Waiting = diesel::sql_query(
        "SELECT count(*)::bigint AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .get_result(&mut conn)
    .await
    .expect("pg_stat_activity");
    waiting.n
}

/// `1 + followers` concurrent reads of the cold `id`, and one Postgres load for all: the
/// first read's `SELECT` is held behind a table lock until every follower has looked in
/// Redis and so joined that load; then the lock goes. Every read answers 200 MISS.
///
/// Why a lock rather than a burst of reads: a burst coalesces only if the reads happen to
/// overlap, and the exact counts below need to know how many did.
async fn reads_behind_one_load(app: &Arc<TestApp>, scraper: &Scraper<'_>, id: i64, followers: u64) {
    let gets = |s: &Snapshot| {
        s.metrics
            .value(CACHE_OP_COUNT, &labels(&[("op", "get")]))
            .unwrap_or(0.0)
    };
    let mut lock = app.backends.connect(&app.database).await;
    execute(&mut lock, "BEGIN").await;
    execute(&mut lock, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE").await;
    let gets_before = gets(&scraper.scrape().await);

    let spawn_read = || {
        let app = app.clone();
        tokio::spawn(async move {
            let response = app.get_item(id).await;
            (response.status().as_u16(), header(&response, "x-cache"))
        })
    };
    let mut reads = vec![spawn_read()];
    eventually(
        "the first read to wait for the table lock",
        Duration::from_secs(10),
        || async { (lock_waiters(app).await >= 1).then_some(()) },
    )
    .await;
    reads.extend((0..followers).map(|_| spawn_read()));
    // A follower joins the load as soon as it is done with Redis (its GET, then the write
    // stamp), with no `.await` that yields in between. So: first every follower's GET is
    // counted; then, in a later scrape (pools are sampled before the text is rendered), no
    // Redis command is in flight. The leader waits in Postgres, not in Redis.
    let all_looked = gets_before + 1.0 + followers as f64;
    eventually(
        "the followers to look in Redis",
        Duration::from_secs(10),
        || async { (gets(&scraper.scrape().await) >= all_looked).then_some(()) },
    )
    .await;
    let redis_in_use = labels(&[("pool", "redis"), ("state", "in_use")]);
    eventually(
        "the followers to be done with Redis",
        Duration::from_secs(10),
        || async {
            let snapshot = scraper.scrape().await;
            (snapshot.metrics.value(POOL_CONNECTIONS, &redis_in_use) == Some(0.0)).then_some(())
        },
    )
    .await;
    execute(&mut lock, "COMMIT").await;

    for read in reads {
        assert_eq!(
            read.await.expect("read task"),
            (200, "MISS".to_owned()),
            "a coalesced read of {id}"
        );
    }
}

#[tokio::test]
async fn reads_that_wait_for_another_reads_load_are_counted_as_coalesced() {
    const FOLLOWERS: u64 = 5;
    let _serial = serial().await;
    let app = Arc::new(spawn_app().await);
    let id = app.insert_items(1).await[0];
    let scraper = Scraper::new(&app);

    let before = scraper.scrape().await;
    reads_behind_one_load(&app, &scraper, id, FOLLOWERS).await;
    let after = scraper.scrape().await;

    let reads = 1 + FOLLOWERS;
    Expected::default()
        .http("GET", "/items/{id}", "200", "miss", reads)
        .lookups("miss", reads)
        // Every read looks for the entry and reads the id's write stamp in the same call;
        // only the leader fills.
        .cache_ops("get", reads)
        .cache_ops("mget", 0)
        .cache_ops("set", 1)
        .cache_ops("lease", 1)
        .queries("get_item", 1)
        .coalesced(FOLLOWERS)
        .scrapes(&before, &after)
        .assert_moved(&before, &after);
}

#[tokio::test]
async fn a_redis_call_past_its_deadline_is_a_cache_error_and_the_read_bypasses() {
    let _serial = serial().await;
    let backends = Backends::dedicated().await;
    let app = Spawn::default()
        .backends(backends.clone())
        .var("REDIS_TIMEOUT_MS", 50)
        .start()
        .await;
    let id = app.insert_items(1).await[0];
    let scraper = Scraper::new(&app);

    let before = scraper.scrape().await;
    backends.redis.freeze();
    let response = app.get_item(id).await;
    backends.redis.thaw();
    assert_eq!(
        (response.status().as_u16(), header(&response, "x-cache")),
        (200, "BYPASS".to_owned()),
        "a read while Redis is frozen"
    );
    let after = scraper.scrape().await;

    Expected::default()
        .http("GET", "/items/{id}", "200", "bypass", 1)
        .lookups("bypass", 1)
        // The GET that timed out is both timed and counted as an error; a bypass read
        // neither notes a stamp nor fills.
        .cache_ops("get", 1)
        .cache_errors("get", 1)
        .queries("get_item", 1)
        .scrapes(&before, &after)
        .assert_moved(&before, &after);
}

/// The labels of `family`'s series, without `le`.
fn label_names(exposition: &Exposition, name: &str) -> BTreeSet<BTreeSet<String>> {
    exposition
        .series(name)
        .map(|s| s.labels.keys().filter(|k| *k != "le").cloned().collect())
        .collect()
}

/// Every value `label` takes across the series of `name`.
fn label_values(exposition: &Exposition, name: &str, label: &str) -> BTreeSet<String> {
    exposition
        .series(name)
        .filter_map(|s| s.labels.get(label).cloned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Each series of the histogram `family` has buckets from 50 µs to 5 s, then `+Inf`.
fn assert_buckets(exposition: &Exposition, family: &str) {
    let bucket = format!("{family}_bucket");
    let mut by_series: BTreeMap<Labels, Vec<f64>> = BTreeMap::new();
    for sample in exposition.series(&bucket) {
        let mut series = sample.labels.clone();
        let le = series.remove("le").expect("a bucket has le");
        let le: f64 = match le.as_str() {
            "+Inf" => f64::INFINITY,
            _ => le
                .parse()
                .unwrap_or_else(|_| panic!("{bucket}: le={le:?} is not a number")),
        };
        by_series.entry(series).or_default().push(le);
    }
    assert!(!by_series.is_empty(), "{family}: no buckets");
    for (series, mut les) in by_series {
        les.sort_by(f64::total_cmp);
        let finite: Vec<f64> = les.iter().copied().filter(|l| l.is_finite()).collect();
        let where_ = format!("{bucket}{}", show(&series));
        assert_eq!(les.last(), Some(&f64::INFINITY), "{where_}: no +Inf bucket");
        assert_eq!(
            finite.first(),
            Some(&0.000_05),
            "{where_}: first bucket {les:?}"
        );
        assert_eq!(
            finite.last(),
            Some(&5.0),
            "{where_}: last finite bucket {les:?}"
        );
        assert!(
            finite.len() >= 10,
            "{where_}: only {} buckets",
            finite.len()
        );
    }
}

#[tokio::test]
async fn every_contract_metric_is_exported_with_its_labels_and_the_text_passes_promtool() {
    let _serial = serial().await;
    let app = Arc::new(spawn_app().await);
    let items = app.insert_items(6).await;
    // Traffic that touches every family: the script, coalesced reads, and a read on an
    // instance whose Redis is not there (a cache error, a bypass).
    scripted_traffic(&app, &items[..5], &mut Expected::default()).await;
    let scraper = Scraper::new(&app);
    reads_behind_one_load(&app, &scraper, items[5], 2).await;
    let no_redis = Spawn::default()
        .var("REDIS_URL", format!("redis://127.0.0.1:{}", free_port()))
        .start()
        .await;
    read(&no_redis, items[0], 404, "BYPASS").await;
    drop(no_redis);
    let Snapshot { metrics, text, .. } = scraper.scrape().await;

    let types = [
        (HTTP_REQUESTS, "counter"),
        (HTTP_DURATION, "histogram"),
        (LOOKUPS, "counter"),
        (CACHE_OP_DURATION, "histogram"),
        (CACHE_ERRORS, "counter"),
        (DB_QUERY_DURATION, "histogram"),
        (COALESCED, "counter"),
        (POOL_CONNECTIONS, "gauge"),
        (POOL_WAITERS, "gauge"),
        (BUILD_INFO, "gauge"),
    ];
    for (family, kind) in types {
        assert_eq!(
            metrics.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}"
        );
        let name = match kind {
            "histogram" => format!("{family}_count"),
            _ => family.to_owned(),
        };
        assert!(
            metrics.series(&name).next().is_some(),
            "no series of {name}"
        );
    }

    let names = |n: &[&str]| BTreeSet::from([set(n)]);
    assert_eq!(
        label_names(&metrics, HTTP_REQUESTS),
        names(&["method", "route", "status"])
    );
    for suffix in ["_bucket", "_sum", "_count"] {
        assert_eq!(
            label_names(&metrics, &format!("{HTTP_DURATION}{suffix}")),
            names(&["method", "route", "cache"])
        );
        assert_eq!(
            label_names(&metrics, &format!("{CACHE_OP_DURATION}{suffix}")),
            names(&["op"])
        );
        assert_eq!(
            label_names(&metrics, &format!("{DB_QUERY_DURATION}{suffix}")),
            names(&["query"])
        );
    }
    assert_eq!(label_names(&metrics, LOOKUPS), names(&["result"]));
    assert_eq!(label_names(&metrics, CACHE_ERRORS), names(&["op"]));
    assert_eq!(label_names(&metrics, COALESCED), names(&[]));
    assert_eq!(
        label_names(&metrics, POOL_CONNECTIONS),
        names(&["pool", "state"])
    );
    assert_eq!(label_names(&metrics, POOL_WAITERS), names(&["pool"]));

    // Label values: within the contract's sets, and those this traffic produced present.
    let within = |name: &str, label: &str, allowed: &[&str], present: &[&str]| {
        let values = label_values(&metrics, name, label);
        assert!(
            values.is_subset(&set(allowed)),
            "{name}: {label} takes {values:?}, allowed {allowed:?}"
        );
        assert!(
            values.is_superset(&set(present)),
            "{name}: {label} takes {values:?}, expected at least {present:?}"
        );
    };
    let results = ["hit", "miss", "stale", "bypass"];
    within(LOOKUPS, "result", &results, &["hit", "miss", "bypass"]);
    within(
        HTTP_DURATION_COUNT,
        "cache",
        &["hit", "miss", "stale", "bypass", "none"],
        &["hit", "miss", "bypass", "none"],
    );
    // The contract's four, and four of ours: `/readyz`'s probe, the change feed, leases,
    // and a cluster's topology.
    let ops = [
        "get", "mget", "set", "delete", "ping", "feed", "lease", "topology",
    ];
    within(
        CACHE_OP_COUNT,
        "op",
        &ops,
        &["get", "mget", "set", "delete", "feed"],
    );
    within(CACHE_ERRORS, "op", &ops, &["get"]);
    let queries = [
        "get_item",
        "get_items",
        "list_items",
        "insert_item",
        "update_item",
        "delete_item",
        "ids_by_name",
        "list_by_name",
    ];
    within(
        DB_QUERY_COUNT,
        "query",
        &queries,
        &["get_item", "get_items", "insert_item", "update_item"],
    );
    within(
        POOL_CONNECTIONS,
        "pool",
        &["postgres", "redis"],
        &["postgres", "redis"],
    );
    within(
        POOL_CONNECTIONS,
        "state",
        &["idle", "in_use"],
        &["idle", "in_use"],
    );
    within(
        POOL_WAITERS,
        "pool",
        &["postgres", "redis"],
        &["postgres", "redis"],
    );
    assert_eq!(
        metrics.series(POOL_CONNECTIONS).count(),
        4,
        "2 pools x 2 states"
    );
    assert_eq!(metrics.series(POOL_WAITERS).count(), 2, "one per pool");
    for route_family in [HTTP_REQUESTS, HTTP_DURATION_COUNT] {
        within(
            route_family,
            "route",
            &ROUTES,
            &[
                "/items",
                "/items/{id}",
                "/cache/items/{id}",
                "/metrics",
                "unmatched",
            ],
        );
    }
    // No raw path (ids included) ever becomes a route label.
    for sample in &metrics.samples {
        if let Some(route) = sample.labels.get("route") {
            assert!(
                !route.chars().any(|c| c.is_ascii_digit()),
                "{}{}: an id in the route label",
                sample.name,
                show(&sample.labels)
            );
        }
    }

    let errors = metrics
        .value(CACHE_ERRORS, &labels(&[("op", "get")]))
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "cache errors {{op=get}}: {errors}");
    let coalesced = metrics.value(COALESCED, &Labels::new()).unwrap_or(0.0);
    assert!(coalesced >= 2.0, "coalesced requests: {coalesced}");
    let build: Vec<_> = metrics.series(BUILD_INFO).collect();
    assert_eq!(build.len(), 1, "one build_info series: {build:?}");
    assert_eq!(
        (&build[0].labels, build[0].value),
        (&labels(&[("version", env!("CARGO_PKG_VERSION"))]), 1.0),
        "build_info"
    );

    for family in [HTTP_DURATION, CACHE_OP_DURATION, DB_QUERY_DURATION] {
        assert_buckets(&metrics, family);
    }

    match promtool_check_metrics(&text) {
        Ok(lint) if lint.is_empty() => {}
        Ok(lint) => eprintln!("promtool check metrics (lint only):\n{}", lint.join("\n")),
        Err(e) => panic!("promtool cannot parse /metrics: {e}\n{text}"),
    }
}
