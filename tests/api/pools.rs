//! Postgres connections per HTTP worker (`db::pools`): statements from a worker (a thread
//! with a current-thread runtime, as actix's) go over connections made on that worker;
//! other tasks, a worker past the budget, and a worker whose own are all lent out use the
//! shared pool.

use std::sync::Arc;

use diesel_async::RunQueryDsl;
use itemcache::db::pools::Pools;

use crate::support::Backends;

async fn new_pools(size: usize, workers: usize) -> Arc<Pools> {
    let backends = Backends::shared().await;
    let database = backends.new_database().await;
    Arc::new(Pools::new(&backends.pg.url(&database), size, workers).expect("pools"))
}

/// Runs `work` on a thread of its own with a current-thread runtime: an HTTP worker.
fn on_a_worker<T: Send + 'static>(
    work: impl AsyncFnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work())
    })
}

async fn select_one(pools: &Pools) {
    let mut conn = pools.get().await.expect("a connection");
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("SELECT 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_queries_over_its_own_connections_and_other_tasks_over_shared_ones() {
    let pools = new_pools(16, 2).await;

    let worker = pools.clone();
    on_a_worker(async move || select_one(&worker).await)
        .join()
        .expect("worker");
    assert_eq!(
        pools.shared().status().size,
        0,
        "a worker took a shared one"
    );
    assert_eq!(pools.status().size, 1, "the worker's own connection");

    select_one(&pools).await;
    assert_eq!(pools.shared().status().size, 1, "the main runtime's task");
    assert_eq!(pools.status().size, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_own_are_lent_out_takes_a_shared_one() {
    // 16: 2 shared, 7 for each of 2 workers.
    let pools = new_pools(16, 2).await;
    let worker = pools.clone();
    on_a_worker(async move || {
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(worker.get().await.expect("a connection"));
        }
    })
    .join()
    .expect("worker");
    assert_eq!(
        pools.shared().status().size,
        1,
        "the eighth was a shared one"
    );
    assert_eq!(pools.status().size, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_past_the_budget_and_small_pools_use_the_shared_pool() {
    let pools = new_pools(16, 2).await;
    // Three workers alive at once (a thread that ended would hand its entry on).
    let together = Arc::new(std::sync::Barrier::new(3));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (worker, together) = (pools.clone(), together.clone());
            on_a_worker(async move || {
                select_one(&worker).await;
                together.wait();
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    assert_eq!(pools.shared().status().size, 1, "the third worker's");
    assert_eq!(pools.status().size, 3);

    // Too small to give each worker two and keep two shared: all shared.
    let small = new_pools(5, 2).await;
    let worker = small.clone();
    on_a_worker(async move || select_one(&worker).await)
        .join()
        .expect("worker");
    assert_eq!(small.shared().status().size, 1);
    assert_eq!(small.status().size, 1);
}
