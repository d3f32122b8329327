//! The API over real HTTP against real Postgres and Redis (started by `support`).
//! One binary, one module per area.

mod support;

mod cache_behaviour;
