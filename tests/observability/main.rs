//! Observability, end to end: the service's metrics move by exactly what the traffic did,
//! `/metrics` is valid Prometheus text with every contract metric (CONTRACT.md §3), and
//! every query of the bundled Grafana dashboard returns data from a real Prometheus that
//! scrapes a real instance.
//!
//! A test binary of its own because the metrics recorder is global per process: the API
//! tests run concurrently in theirs, so their counters move under each other's feet. Here
//! every test holds [`serial`] for its whole run, so between two snapshots only the test's
//! own requests are counted, and deltas can be asserted exactly.
//!
//! The harness (Postgres and Redis on free ports, `spawn_app()`, `TestApp`) is the API
//! tests' own, compiled into this binary too.

// Clippy's allow-*-in-tests covers `#[test]` functions only, not the helpers they call;
// in a test binary a failed `expect` is a failed test, with its message.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test binary: a failed expectation is a test failure"
)]

#[path = "../api/support/mod.rs"]
#[allow(dead_code)]
mod support;

mod exposition;
mod prometheus_server;

mod consistency;
mod dashboard;
mod exported_metrics;
mod fleet;

/// Held by every test for its whole run: counters are process-wide, so one test's traffic
/// must not land between another's snapshots. (A tokio mutex does not poison: one failed
/// test does not fail the others.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}
