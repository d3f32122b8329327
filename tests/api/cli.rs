//! The `itemcache` binary itself: configuration errors, `--help`, `migrate`, `seed`, and a
//! graceful stop on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::servers::{free_port, wait_for_port};
use crate::support::{Backends, spawn_app};

const BIN: &str = env!("CARGO_BIN_EXE_itemcache");

/// The binary with a clean environment: only what the test sets (no `.env` either, as the
/// working directory is a fresh temp dir).
fn itemcache(args: &[&str], vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    let dir = std::env::temp_dir();
    cmd.args(args)
        .env_clear()
        .current_dir(dir)
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn a_cluster_and_a_single_redis_together_exit_2_naming_both() {
    let out = itemcache(
        &[],
        &[
            ("REDIS_URL", "redis://127.0.0.1:1".to_owned()),
            (
                "REDIS_CLUSTER_NODES",
                "redis://127.0.0.1:2,redis://127.0.0.1:3".to_owned(),
            ),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("REDIS_CLUSTER_NODES: ") && stderr.contains("REDIS_URL"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_bad_setting_exits_2_with_one_line_naming_it() {
    let cases = [
        (
            "CACHE_TTL_JITTER",
            "1.5",
            "CACHE_TTL_JITTER: must be between 0 and 1, got 1.5",
        ),
        (
            "LISTEN_ADDR",
            "nowhere",
            "LISTEN_ADDR: must be a socket address like 127.0.0.1:8080, got \"nowhere\"",
        ),
        (
            "REDIS_TIMEOUT_MS",
            "0",
            "REDIS_TIMEOUT_MS: must be an integer from 1 to 60000, got \"0\"",
        ),
        (
            "DATABASE_URL",
            "mysql://x",
            "DATABASE_URL: must be a URL starting with postgres://",
        ),
    ];
    for (var, value, line) in cases {
        for args in [&[][..], &["migrate"], &["seed", "--count", "5"]] {
            let out = itemcache(args, &[(var, value.to_owned())])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{var}={value} {args:?}");
            assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{line}\n"));
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["seed", "--help"],
    ] {
        let out = itemcache(args, &[]).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: itemcache"), "{args:?}: {text}");
    }
    let out = itemcache(&["seed"], &[]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "seed without --count is a usage error"
    );
}

#[tokio::test]
async fn migrate_then_seed_fill_a_new_database() {
    let backends = Backends::shared().await;
    backends
        .run_sql("postgres", "CREATE DATABASE cli_seed")
        .await;
    let url = vec![("DATABASE_URL", backends.pg.url("cli_seed"))];
    let migrate = itemcache(&["migrate"], &url).output().unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let seed = itemcache(&["seed", "--count", "120000"], &url)
        .output()
        .unwrap();
    assert!(
        seed.status.success(),
        "{}",
        String::from_utf8_lossy(&seed.stderr)
    );
    assert!(String::from_utf8_lossy(&seed.stderr).contains("seeded 120000 items"));

    // Realistic rows, all valid by the table's own checks, ids 1..=N.
    let mut conn = backends.connect("cli_seed").await;
    #[derive(diesel::QueryableByName)]
    struct Stats {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        max_id: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        names: i64,
    }
    let stats: Stats = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT count(*) AS n, max(id) AS max_id, count(DISTINCT name) AS names FROM items",
        ),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!((stats.n, stats.max_id), (120_000, 120_000));
    assert!(stats.names > 100_000, "names are varied: {}", stats.names);
}

#[tokio::test]
async fn serve_stops_gracefully_on_sigterm() {
    let app = spawn_app().await; // a migrated database and a Redis
    let port = free_port();
    let mut child = itemcache(
        &["serve"],
        &[
            ("DATABASE_URL", app.backends.pg.url(&app.database)),
            ("REDIS_URL", app.backends.redis.url()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("RUST_LOG", "warn".to_owned()),
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "serve listens"
    );
    let health = app
        .client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    terminate(&child);
    assert_eq!(stopped(&mut child).await.code(), Some(0));
}

/// Sends SIGTERM to `child`.
fn terminate(child: &std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
}

/// Waits (15 s at most) for `child` to exit.
async fn stopped(child: &mut std::process::Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "serve did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a backend of `database` other than ours is waiting for a lock.
async fn a_read_waits_for_the_lock(app: &crate::support::TestApp) {
    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = app.backends.connect(&app.database).await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: Waiting = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ),
            &mut conn,
        )
        .await
        .unwrap();
        if waiting.n > 0 {
            return;
        }
        assert!(Instant::now() < until, "no read blocked on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A read inside Postgres when SIGTERM arrives still gets its answer (contract: in-flight
/// requests finish). The pool's one connection is made by the worker that serves the first
/// read; the held read lands on the other worker (actix hands new connections to workers in
/// turn), so the worker that made the connection is idle when the stop begins and stops
/// first. Its runtime must not take the connection's driver with it.
#[tokio::test]
async fn a_read_in_flight_at_sigterm_finishes() {
    use diesel_async::RunQueryDsl;
    let app = spawn_app().await;
    let id = app.insert_items(1).await[0];
    let port = free_port();
    let mut child = itemcache(
        &["serve"],
        &[
            ("DATABASE_URL", app.backends.pg.url(&app.database)),
            ("REDIS_URL", app.backends.redis.url()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("CACHE_ENABLED", "false".to_owned()),
            ("DB_POOL_SIZE", "1".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "serve listens"
    );
    let url = format!("http://127.0.0.1:{port}/items/{id}");
    // A client per request: each read comes on a new connection, so on another worker.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let first = fresh().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);

    let mut locker = app.lock_items().await;
    let held = tokio::spawn({
        let url = url.clone();
        async move { fresh().get(&url).send().await.map(|r| r.status().as_u16()) }
    });
    a_read_waits_for_the_lock(&app).await;

    terminate(&child);
    // Give the server time to stop its idle worker before the read can finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    diesel::sql_query("COMMIT")
        .execute(&mut locker)
        .await
        .unwrap();

    assert_eq!(
        held.await.unwrap().ok(),
        Some(200),
        "the held read's answer"
    );
    assert_eq!(stopped(&mut child).await.code(), Some(0));
}
