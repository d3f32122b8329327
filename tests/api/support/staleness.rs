//! The staleness checker: concurrent writers, readers and evictions over a few hot ids,
//! spread over several endpoints (instances, a load balancer in front of them), and a writer
//! behind the service's back (plain SQL, as psql would). It counts every read that started
//! after a write's acknowledgement and returned an older version — for the external
//! writer's writes, once the change feed's lag bound has passed.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestApp, header};

/// The change feed's bound for writes made outside the service (docs/cache-design.md): a
/// NOTIFY wakes it at once; its slow timer reads the queue every second.
pub const EXTERNAL_LAG: Duration = Duration::from_secs(1);

/// What a run did and found.
#[derive(Debug)]
pub struct Report {
    pub writes: usize,
    pub reads: usize,
    pub hits: usize,
    /// Hits the near cache answered (`Cache-Status: ...; detail=near`).
    pub near_hits: usize,
    pub evictions: usize,
    /// Reads older than a write acknowledged (beyond the allowance) before they began.
    pub stale: usize,
    /// The longest any read lagged: from the acknowledgement of the first version newer
    /// than what it returned to the read's start (zero when no read lagged).
    pub max_lag: Duration,
}

/// Versions written behind the service's back, with when each was acknowledged.
type ExternalWrites = Mutex<Vec<(Instant, i64)>>;

/// Versions acknowledged through the API: when, which version, through which endpoint.
type Acks = Mutex<Vec<(Instant, i64, usize)>>;

async fn version_of(response: reqwest::Response) -> i64 {
    let body: Value = response.json().await.unwrap();
    body["version"].as_i64().unwrap()
}

/// Runs the checker for `run_for` over `ids` (existing items, at version 1) through
/// `endpoints` (base URLs); `app` gives the database for the external writer. Afterwards,
/// once the feed has applied the last external write, every endpoint must answer every
/// id's last version.
pub async fn check(app: &TestApp, endpoints: &[String], ids: &[i64], run_for: Duration) -> Report {
    check_within(app, endpoints, ids, run_for, Duration::ZERO).await
}

/// [`check`], with API writes allowed to go unseen for `allowed` after their
/// acknowledgement (the near cache's bound on other instances): only older reads count.
pub async fn check_within(
    app: &TestApp,
    endpoints: &[String],
    ids: &[i64],
    run_for: Duration,
    allowed: Duration,
) -> Report {
    let client = reqwest::Client::new();
    let endpoints = Arc::new(endpoints.to_vec());
    let ids = Arc::new(ids.to_vec());
    let hot = ids.len();
    // The highest version acknowledged to any writer, per id, and each acknowledgement.
    let acked: Arc<Vec<AtomicI64>> = Arc::new((0..hot).map(|_| AtomicI64::new(1)).collect());
    let acks: Arc<Vec<Acks>> = Arc::new((0..hot).map(|_| Default::default()).collect());
    let max_lag_us = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // writes, reads, hits, evictions, stale reads, near hits
    let counts: Arc<[AtomicUsize; 6]> = Arc::new(Default::default());
    let external: Arc<Vec<ExternalWrites>> =
        Arc::new((0..hot).map(|_| Default::default()).collect());

    let mut tasks = Vec::new();
    {
        let (ids, stop, external) = (ids.clone(), stop.clone(), external.clone());
        let mut conn = app.backends.connect(&app.database).await;
        tasks.push(tokio::spawn(async move {
            #[derive(diesel::QueryableByName)]
            struct Written {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                version: i64,
            }
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let slot = n % hot;
                let written: Written = diesel_async::RunQueryDsl::get_result(
                    diesel::sql_query(format!(
                        "UPDATE items SET description = 'external {n}' WHERE id = {} RETURNING version",
                        ids[slot]
                    )),
                    &mut conn,
                )
                .await
                .unwrap();
                external[slot]
                    .lock()
                    .unwrap()
                    .push((Instant::now(), written.version));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for worker in 0..12usize {
        let (client, endpoints, ids, acked, acks, max_lag_us, stop, counts, external) = (
            client.clone(),
            endpoints.clone(),
            ids.clone(),
            acked.clone(),
            acks.clone(),
            max_lag_us.clone(),
            stop.clone(),
            counts.clone(),
            external.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let slot = (n >> 33) % hot;
                let id = ids[slot];
                let endpoint = (n >> 40) % endpoints.len();
                let base = &endpoints[endpoint];
                match worker % 6 {
                    // Two writers in six tasks.
                    0 | 1 => {
                        let response = client
                            .patch(format!("{base}/items/{id}"))
                            .json(&json!({"price_cents": (n >> 20) % 1000}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(response.status(), 200, "PATCH via {base}");
                        let version = version_of(response).await;
                        acks[slot]
                            .lock()
                            .unwrap()
                            .push((Instant::now(), version, endpoint));
                        acked[slot].fetch_max(version, Ordering::SeqCst);
                        counts[0].fetch_add(1, Ordering::Relaxed);
                    }
                    // One evicter.
                    2 => {
                        let response = client
                            .delete(format!("{base}/cache/items/{id}"))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(response.status(), 204, "eviction via {base}");
                        counts[3].fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // Three readers.
                    _ => {
                        let started = Instant::now();
                        let external_floor = external[slot]
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|(at, _)| *at + EXTERNAL_LAG <= started)
                            .map(|(_, version)| *version)
                            .max()
                            .unwrap_or(0);
                        // The allowance is for other endpoints only: through the endpoint
                        // that took a write, it is seen at once.
                        let api_floor = if allowed.is_zero() {
                            acked[slot].load(Ordering::SeqCst)
                        } else {
                            acks[slot]
                                .lock()
                                .unwrap()
                                .iter()
                                .filter(|(at, _, via)| {
                                    *via == endpoint && *at <= started || *at + allowed <= started
                                })
                                .map(|(_, version, _)| *version)
                                .max()
                                .unwrap_or(1)
                        };
                        let floor = api_floor.max(external_floor);
                        let response = client
                            .get(format!("{base}/items/{id}"))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(response.status(), 200, "GET via {base}");
                        if header(&response, "x-cache") == "HIT" {
                            counts[2].fetch_add(1, Ordering::Relaxed);
                        }
                        if header(&response, "cache-status").contains("detail=near") {
                            counts[5].fetch_add(1, Ordering::Relaxed);
                        }
                        let version = version_of(response).await;
                        // How long the newest version this read missed had been acknowledged.
                        let missed_since = acks[slot]
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|(at, v, _)| *v > version && *at <= started)
                            .map(|(at, _, _)| *at)
                            .min();
                        if let Some(since) = missed_since {
                            let lag = started.duration_since(since).as_micros() as i64;
                            max_lag_us.fetch_max(lag, Ordering::SeqCst);
                        }
                        if version < floor {
                            counts[4].fetch_add(1, Ordering::SeqCst);
                            eprintln!(
                                "id {id} via {base}: read version {version} after version {floor} was acknowledged"
                            );
                        }
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(run_for).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let [writes, reads, hits, evictions, stale, near_hits] =
        [0, 1, 2, 3, 4, 5].map(|i| counts[i].load(Ordering::SeqCst));
    let report = Report {
        writes,
        reads,
        hits,
        near_hits,
        evictions,
        stale,
        max_lag: Duration::from_micros(max_lag_us.load(Ordering::SeqCst) as u64),
    };
    eprintln!(
        "staleness checker over {} endpoints: {report:?} in {:.1} s",
        endpoints.len(),
        started.elapsed().as_secs_f64()
    );
    // At rest, every endpoint agrees with Postgres (once the feed has applied the last
    // external write).
    tokio::time::sleep(EXTERNAL_LAG).await;
    for (slot, &id) in ids.iter().enumerate() {
        let external = external[slot].lock().unwrap().last().map_or(0, |w| w.1);
        let expected = acked[slot].load(Ordering::SeqCst).max(external);
        for base in endpoints.iter() {
            let response = client
                .get(format!("{base}/items/{id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                version_of(response).await,
                expected,
                "id {id} via {base} at rest"
            );
        }
    }
    report
}
