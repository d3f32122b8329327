//! itemcache: item lookups over REST, Redis in front of Postgres (cache-aside,
//! read-through), race-safe on writes, observable on `/metrics`.
//!
//! - [`config`]: every setting, read once and validated.
//! - [`app`]: start-up and shutdown.
//! - [`http`]: routes, handlers, problem documents, headers, middleware; [`http::AppState`]
//!   is what handlers reach.
//! - [`items`]: the item model, its Postgres queries, and the cache-aside service.
//! - [`cache`]: Redis entries and write stamps, coalescing, the circuit breaker, retries.
//! - [`feed`]: the change feed follower: invalidates what any Postgres client changed.
//! - [`hot_keys`]: the most read ids (a space-saving sketch), for `/metrics` and
//!   `GET /admin/hot-keys`.
//! - [`db`]: the Postgres pools and embedded migrations; [`seed`]: bulk demo data.
//! - [`workers`]: which thread is an HTTP worker (connections of its own, for no hops).
//! - [`verify`]: the sampled staleness checker ("nines of consistency").
//! - [`metrics`]: every metric name and label; [`telemetry`]: logs; [`report`]: an error
//!   and its causes on one line.

pub mod app;
pub mod cache;
pub mod config;
pub mod db;
pub mod failpoints;
pub mod feed;
pub mod hot_keys;
pub mod http;
pub mod items;
pub mod metrics;
pub mod report;
pub mod schema;
pub mod seed;
pub mod telemetry;
pub mod verify;
pub mod workers;
