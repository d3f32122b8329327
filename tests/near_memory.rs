//! The near cache's memory (issue 15: "bounded by bytes", "memory bound held under a
//! key-space sweep (RSS measured)").
//!
//! - **What an entry costs**: entries built exactly as the read path builds them (a Redis
//!   bulk string decoded by `Entry::decode`), stored through the public `Near` API
//!   (doorkeeper, ticket, store) until moka's pending work has run, each case in a process
//!   of its own (this binary, run again) whose allocator is the service's (mimalloc), and
//!   its anonymous RSS growth set against the weigher's total: within ±20 %, for small,
//!   large and "not found" entries, and for a full cache that evicts.
//! - **The bound under a sweep**: the real binary, `CACHE_L1_MAX_MB=4`, every id of a key
//!   space over three times what the bound holds read twice (the doorkeeper admits an id on
//!   its second read); its RSS against an identical process with the near cache off.
//!
//! Every process measured here runs with `MIMALLOC_ALLOW_THP=0`. mimalloc otherwise asks
//! for transparent huge pages, and RSS then moves by 2 MiB at a time, wherever a thread
//! first touches a region: the same sweep measured -0.2 to 3.8 MiB over the L1-off process
//! from one run to the next (the L1-off process alone ending anywhere from 44 to 50 MiB),
//! against 4.1 to 4.6 MiB with 4 KiB pages.
//!
//! Why RSS and not a counting `#[global_allocator]`: the package forbids `unsafe_code`
//! (Cargo.toml `[lints]`, which reaches test targets too), and a `GlobalAlloc` is an
//! `unsafe impl`. The process's anonymous RSS, in a process that does nothing else, counts
//! the same bytes and what a counter would miss: the allocator's size classes and its pages.

// A test binary: a failed expectation is the test's answer.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test binary: a failed expectation is a test failure"
)]

// The harness of the API tests (private Postgres and Redis); this binary uses part of it.
#[path = "api/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use itemcache::cache::{Cached, Entry, Keys, Near};
use itemcache::items::model::{ItemId, ItemJson};

use crate::support::Backends;
use crate::support::servers::{free_port, wait_for_port};

/// The service's allocator (src/main.rs), so that size classes and pages are its own.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIB: u64 = 1024 * 1024;

/// An item's JSON as the service serializes it (`ItemJson::from_item`), with a description
/// of `description_len` bytes (a seeded item's is about 55: JSON about 230 bytes).
fn item_json(id: i64, description_len: usize) -> Vec<u8> {
    let mut description = format!("Item {id}: a dependable choice, batch {}, ", id % 97);
    while description.len() < description_len {
        description.push_str("rated 4 of 5. ");
    }
    description.truncate(description_len);
    format!(
        r#"{{"id":{id},"name":"Compact Steel Widget {id:07}","description":"{description}","price_cents":{},"version":1,"created_at":"2026-11-24T10:00:00.123456Z","updated_at":"2026-11-24T10:00:00.123456Z"}}"#,
        100 + id % 9900
    )
    .into_bytes()
}

/// What Redis holds for `id`: the entry encoding (`I<version> <fresh>/<load> <json>`), or
/// a cached "not found" when `description_len` is `None`.
fn redis_value(id: i64, description_len: Option<usize>, fresh_until_ms: i64) -> Vec<u8> {
    let entry = match description_len {
        Some(len) => Entry {
            value: Cached::Item(ItemJson {
                version: 1,
                json: Bytes::from(item_json(id, len)),
            }),
            fresh_until_ms,
            load_ms: 3,
        },
        None => Entry {
            value: Cached::NotFound,
            fresh_until_ms,
            load_ms: 0,
        },
    };
    entry.encode()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A line of `/proc/<pid>/status` in bytes (the file says kB).
fn status_bytes(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

// ---------------------------------------------------------------------------------------
// What one entry costs
// ---------------------------------------------------------------------------------------

/// Set in the process this binary runs of itself: the case [`measurement`] measures.
const CHILD: &str = "NEAR_MEMORY_CASE";

#[derive(Clone, Copy, Debug)]
enum Holder {
    /// The decoded entries alone, in a vector (what the read path's entry costs by itself).
    Entries,
    /// The near cache holding them (what the weigher must count).
    Near,
    /// The near cache under a sweep three times its bound (evicting: what it holds when the
    /// bound binds). `entries` is what the bound holds, by the weigher.
    Full,
}

#[derive(Debug)]
struct Measured {
    entries: u64,
    /// Anonymous RSS growth while they were built and stored.
    rss: u64,
    /// The weigher's total (0 for `Holder::Entries`).
    weighted: u64,
    /// Bytes of the Redis values they were decoded from.
    value_bytes: u64,
}

impl Measured {
    fn per_entry(&self) -> f64 {
        self.rss as f64 / self.entries as f64
    }
}

/// Runs this binary again, with only [`measurement`] selected, for one case: a process that
/// has done nothing else, so its RSS growth is the case's.
fn measure(holder: Holder, description_len: Option<usize>, entries: u64) -> Measured {
    let case = format!(
        "{holder:?} {} {entries}",
        description_len.map_or("none".to_owned(), |n| n.to_string())
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "measurement",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &case)
        // RSS by 4 KiB pages, not by the 2 MiB transparent huge pages mimalloc asks for.
        .env("MIMALLOC_ALLOW_THP", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{case}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let numbers: Vec<u64> = stdout
        .lines()
        .find_map(|line| line.strip_prefix("measured: "))
        .unwrap_or_else(|| panic!("{case}: no measurement in {stdout}"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    Measured {
        entries,
        rss: numbers[0],
        weighted: numbers[1],
        value_bytes: numbers[2],
    }
}

/// The case [`measure`] asked for; does nothing in an ordinary run (`--ignored` without the
/// variable).
#[test]
#[ignore = "one measurement, run by the tests below in a process of its own"]
fn measurement() {
    let Ok(case) = std::env::var(CHILD) else {
        return;
    };
    let words: Vec<&str> = case.split_whitespace().collect();
    let description_len: Option<usize> = words[1].parse().ok();
    let count: i64 = words[2].parse().unwrap();
    let fresh_until_ms = now_ms() + 3_600_000;
    let (rss, weighted, value_bytes) = match words[0] {
        "Entries" => {
            // Every slot written before the baseline: only the entries' own heap counts.
            let mut held: Vec<Option<Entry>> = vec![None; count as usize];
            let values = redis_values(count, description_len, fresh_until_ms);
            let before = status_bytes("self", "RssAnon:");
            for (slot, value) in held.iter_mut().zip(&values) {
                *slot = Some(read_path_entry(value));
            }
            let rss = status_bytes("self", "RssAnon:") - before;
            assert!(held.iter().all(Option::is_some));
            (rss, 0, byte_count(&values))
        }
        "Near" => {
            let near = Near::new(1 << 40, Duration::from_secs(600));
            near.set_live(true);
            let now = now_ms();
            let values = redis_values(count, description_len, fresh_until_ms);
            let before = status_bytes("self", "RssAnon:");
            for (n, value) in (1..).zip(&values) {
                let id = ItemId::new(n).unwrap();
                let entry = read_path_entry(value);
                // The doorkeeper: stored on the second read (the first may be a false "seen").
                near.admit(id, now);
                assert!(near.admit(id, now));
                near.ticket(id).store(&entry);
            }
            let weighted = settled(&near);
            let rss = status_bytes("self", "RssAnon:") - before;
            for n in [1, count] {
                assert!(near.get(ItemId::new(n).unwrap(), now).is_some(), "{n} held");
            }
            (rss, weighted, byte_count(&values))
        }
        "Full" => {
            // The bound: `count` entries of this size, by the weigher; three times as many
            // swept through it.
            let probe = read_path_entry(&redis_value(1, description_len, fresh_until_ms));
            let probe_weight = {
                let near = Near::new(1 << 40, Duration::from_secs(600));
                near.set_live(true);
                near.admit(ItemId::new(1).unwrap(), 0);
                near.admit(ItemId::new(1).unwrap(), 0);
                near.ticket(ItemId::new(1).unwrap()).store(&probe);
                near.weighted_size()
            };
            drop(probe);
            let near = Near::new(probe_weight * count as u64, Duration::from_secs(600));
            near.set_live(true);
            let now = now_ms();
            let values = redis_values(3 * count, description_len, fresh_until_ms);
            let before = status_bytes("self", "RssAnon:");
            for (n, value) in (1..).zip(&values) {
                let id = ItemId::new(n).unwrap();
                let entry = read_path_entry(value);
                near.admit(id, now);
                near.admit(id, now);
                near.ticket(id).store(&entry);
            }
            let weighted = settled(&near);
            let rss = status_bytes("self", "RssAnon:") - before;
            (rss, weighted, byte_count(&values) / 3)
        }
        other => panic!("unknown holder {other}"),
    };
    // On a line of its own (libtest has written "test measurement ... " before it).
    println!("\nmeasured: {rss} {weighted} {value_bytes}");
}

/// The weigher's total once moka's pending work (inserts, evictions) has all run.
fn settled(near: &Near) -> u64 {
    let mut weighted = near.weighted_size();
    loop {
        let again = near.weighted_size();
        if again == weighted {
            return weighted;
        }
        weighted = again;
    }
}

/// The Redis values of ids 1..=count, made before the measurement starts (what the
/// measurement allocates is then the read path's alone).
fn redis_values(count: i64, description_len: Option<usize>, fresh_until_ms: i64) -> Vec<Vec<u8>> {
    (1..=count)
        .map(|id| redis_value(id, description_len, fresh_until_ms))
        .collect()
}

fn byte_count(values: &[Vec<u8>]) -> u64 {
    values.iter().map(|v| v.len() as u64).sum()
}

/// What the read path makes of a Redis reply: redis-rs hands a bulk string over as a `Vec`
/// of exactly its length (`bs.to_vec()` in its parser), which `cache::entry_of` turns into
/// `Bytes` and `Entry::decode` slices the JSON from.
fn read_path_entry(value: &[u8]) -> Entry {
    let reply: Vec<u8> = value.to_vec();
    Entry::decode(Bytes::from(reply)).expect("an entry")
}

/// Measures the near cache holding `entries` of one kind, and the same entries alone; asserts
/// that the weigher counts the near cache's growth within ±20 %; prints the breakdown.
fn weigher_holds_for(what: &str, description_len: Option<usize>, entries: u64) {
    let alone = measure(Holder::Entries, description_len, entries);
    let held = measure(Holder::Near, description_len, entries);
    let per_value = held.value_bytes as f64 / entries as f64;
    let weighed = held.weighted as f64 / entries as f64;
    println!(
        "{what}: {entries} entries, Redis value {per_value:.0} B; RSS per entry: the entry \
         alone {:.0} B, held by the near cache {:.0} B (so the cache's own {:.0} B); \
         the weigher counts {weighed:.0} B ({:+.1} %)",
        alone.per_entry(),
        held.per_entry(),
        held.per_entry() - alone.per_entry(),
        (weighed / held.per_entry() - 1.0) * 100.0,
    );
    assert_weighs_within_a_fifth(what, &held);
}

/// The weigher's count is within ±20 % of the RSS the entries took.
fn assert_weighs_within_a_fifth(what: &str, measured: &Measured) {
    let ratio = measured.weighted as f64 / measured.rss as f64;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{what}: the weigher counts {} bytes for {} bytes of RSS growth ({ratio:.2})",
        measured.weighted,
        measured.rss
    );
}

#[test]
fn the_weigher_counts_what_a_small_entry_costs() {
    // A seeded item's size (bench/results/near.md: JSON 232 bytes).
    weigher_holds_for("small items", Some(60), 60_000);
}

#[test]
fn the_weigher_counts_what_a_large_entry_costs() {
    // JSON just over 8 KiB: the allocator's size class is 10 KiB.
    weigher_holds_for("large items", Some(8_000), 4_000);
}

#[test]
fn the_weigher_counts_what_a_not_found_entry_costs() {
    weigher_holds_for("\"not found\" entries", None, 60_000);
}

/// Where the bound binds: a full cache, evicting. Its hash table then also holds the slots
/// and tombstones of evicted keys, and evicted values wait for crossbeam's epoch to free
/// them.
#[test]
fn the_weigher_counts_what_a_full_cache_holds() {
    let full = measure(Holder::Full, Some(60), 24_000);
    println!(
        "a full cache of small items (bound: {} of them; three times as many swept through \
         it): RSS growth {:.1} MiB, {:.0} B per entry held; the weigher counts {:.1} MiB",
        full.entries,
        full.rss as f64 / MIB as f64,
        full.per_entry(),
        full.weighted as f64 / MIB as f64,
    );
    assert_weighs_within_a_fifth("a full cache", &full);
}

// ---------------------------------------------------------------------------------------
// The bound under a key-space sweep, in the real binary
// ---------------------------------------------------------------------------------------

/// The bound the sweep runs under.
const BOUND_MB: u64 = 4;

/// Ids swept: 3.5 times what the bound holds (an entry of a seeded item weighs 734 bytes).
const SWEEP: i64 = 20_000;

/// Ids per batch read (the contract's most).
const BATCH: i64 = 100;

/// Batch reads in flight at once.
const CLIENTS: usize = 4;

/// What the L1-on process may grow beyond the bound: fixed costs (the doorkeeper's 128 KiB,
/// moka's channels and frequency sketch, old hash-table slot arrays, the tracking
/// connection) and pages the allocator keeps: measured 0.1 to 0.6 MiB at this bound
/// (0.4 to 2.6 MiB at 32 MiB). With the weigher before it was measured (JSON + 96 bytes)
/// the growth was 8.6 to 9.1 MiB at this bound.
const SLACK: u64 = 2 * MIB;

/// The service, run as a process of its own; killed when dropped.
struct Service {
    child: Child,
    url: String,
    client: reqwest::Client,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    async fn batch(&self, first: i64) {
        let ids: Vec<String> = (first..first + BATCH).map(|id| id.to_string()).collect();
        let response = self
            .client
            .get(format!("{}/items?ids={}", self.url, ids.join(",")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["items"].as_array().map(Vec::len), Some(BATCH as usize));
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

#[derive(Debug)]
struct Rss {
    before: u64,
    after: u64,
    peak: u64,
}

/// Starts the binary on `database` and `prefix` with the near cache at `l1_mb` (0: off),
/// sweeps ids 1..=SWEEP (each batch read twice), and reads its RSS.
async fn sweep(backends: &Backends, database: &str, prefix: &str, l1_mb: u64) -> (Rss, Service) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_itemcache"))
        .arg("serve")
        .env_clear()
        .current_dir(std::env::temp_dir())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", backends.pg.url(database))
        .env("REDIS_URL", backends.redis.url())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("CACHE_KEY_PREFIX", prefix)
        .env("CACHE_TTL_SECS", "3600")
        .env("CACHE_VERIFY_SAMPLE", "0")
        .env("CACHE_L1_MAX_MB", l1_mb.to_string())
        .env("CACHE_L1_TTL_MS", "60000")
        // A loaded machine must not turn a slow Redis read into a Postgres read (and these
        // items are in Redis only).
        .env("REDIS_TIMEOUT_MS", "10000")
        .env("MIMALLOC_ALLOW_THP", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let service = Service {
        child,
        url: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
    };
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "serve listens"
    );
    if l1_mb > 0 {
        // The near cache stores only once Redis's invalidations arrive: until an id beyond
        // the sweep is answered from it.
        let url = format!("{}/items/{}", service.url, SWEEP + 1);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let read = service.client.get(&url).send().await.unwrap();
            assert_eq!(read.status(), 200);
            let status = support::header(&read, "cache-status");
            if status.contains("detail=near") {
                break;
            }
            assert!(Instant::now() < until, "the near cache went live");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let pid = service.pid();
    let before = status_bytes(&pid, "VmRSS:");
    let batches: Vec<i64> = (0..SWEEP / BATCH).map(|b| 1 + b * BATCH).collect();
    let service_ref = &service;
    for lane in batches.chunks(CLIENTS) {
        let reads = lane.iter().map(|&first| async move {
            let service = service_ref;
            service.batch(first).await; // seen once: not stored
            service.batch(first).await; // seen again: stored
        });
        futures_util::future::join_all(reads).await;
    }
    // The near-cache gauge (and moka's pending evictions) run every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss = Rss {
        before,
        after: status_bytes(&pid, "VmRSS:"),
        peak: status_bytes(&pid, "VmHWM:"),
    };
    (rss, service)
}

/// Redis holds every id of the sweep (and the probe after it): the sweep's reads are hits,
/// as in bench/near's sweep, and no Postgres row is needed.
async fn fill_redis(backends: &Backends, prefix: &str) {
    let client = redis::Client::open(backends.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = Keys::new(prefix, false);
    let fresh_until_ms = now_ms() + 3_600_000;
    let ids: Vec<i64> = (1..=SWEEP + 1).collect();
    for chunk in ids.chunks(2_000) {
        let mut pipe = redis::pipe();
        for &id in chunk {
            // A seeded item's size: JSON about 230 bytes.
            let value = redis_value(id, Some(60), fresh_until_ms);
            pipe.cmd("SET")
                .arg(keys.entry(ItemId::new(id).unwrap()))
                .arg(value)
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_holds_in_rss_under_a_key_space_sweep() {
    let started = Instant::now();
    let backends = Backends::shared().await;
    let database = backends.new_database().await;
    let prefix = format!("nearmem{}:", std::process::id());
    fill_redis(&backends, &prefix).await;

    let (off, off_service) = sweep(&backends, &database, &prefix, 0).await;
    drop(off_service);
    let (on, on_service) = sweep(&backends, &database, &prefix, BOUND_MB).await;
    let held = on_service.metric("itemcache_near_cache_bytes").await;
    let evicted = on_service
        .metric("itemcache_near_cache_evictions_total{cause=\"size\"}")
        .await;
    drop(on_service);

    let bound = BOUND_MB * MIB;
    let growth = on.after as i64 - off.after as i64;
    let peak_growth = on.peak as i64 - off.peak as i64;
    let mib = |b: i64| b as f64 / MIB as f64;
    let report = format!(
        "sweep of {SWEEP} ids, CACHE_L1_MAX_MB={BOUND_MB}: L1 off RSS {:.1} -> {:.1} MiB \
         (peak {:.1}); L1 on {:.1} -> {:.1} MiB (peak {:.1}); growth over L1 off {:.1} MiB \
         (peak {:.1}); near cache's own count {:.1} MiB, {evicted} evicted for size; {:.1} s",
        mib(off.before as i64),
        mib(off.after as i64),
        mib(off.peak as i64),
        mib(on.before as i64),
        mib(on.after as i64),
        mib(on.peak as i64),
        mib(growth),
        mib(peak_growth),
        held / MIB as f64,
        started.elapsed().as_secs_f64(),
    );
    println!("{report}");
    assert!(
        held >= 0.8 * bound as f64 && evicted > 0.0,
        "the sweep filled the near cache past its bound: {report}"
    );
    let limit = (bound + SLACK) as i64;
    assert!(growth <= limit, "RSS beyond the bound: {report}");
    assert!(peak_growth <= limit, "peak RSS beyond the bound: {report}");
}
