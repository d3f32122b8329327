//! The API over real HTTP against real Postgres and Redis (started by `support`).
//! One binary, one module per area.

// Tests and their helpers may panic: a failed expectation is the test's answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The harness also serves tests/observability; each binary uses part of it.
#[allow(dead_code)]
mod support;

mod bad_input;
mod cache_behaviour;
mod cache_races;
mod cache_status;
mod change_feed;
mod cli;
mod fleet;
mod freshness;
mod hot_keys;
mod items_api;
mod lookup_by_name;
mod near_cache;
mod openapi;
mod pools;
mod redis_cluster;
mod redis_permissions;
mod replicas;
mod resilience;
