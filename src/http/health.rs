//! `/healthz` (the process is up) and `/readyz` (can it serve: Postgres answers; Redis is
//! nice to have), plus `/metrics`.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    postgres: &'static str,
    redis: &'static str,
}

/// 200 `ok` with both up, 200 `degraded` with Redis down (reads go to Postgres),
/// 503 `unavailable` with Postgres down. Each check is bounded by its pool's timeouts.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (postgres, redis) = tokio::join!(state.service.repo().ping(), state.service.cache().ping());
    let readiness = Readiness {
        status: match (&postgres, &redis) {
            (Err(_), _) => "unavailable",
            (Ok(()), Err(_)) => "degraded",
            (Ok(()), Ok(())) => "ok",
        },
        postgres: if postgres.is_ok() { "ok" } else { "down" },
        redis: if redis.is_ok() { "ok" } else { "down" },
    };
    if postgres.is_ok() {
        HttpResponse::Ok().json(readiness)
    } else {
        HttpResponse::ServiceUnavailable().json(readiness)
    }
}

/// The Prometheus text exposition of every metric.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.sample_pools();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
