//! `/healthz` (the process is up) and `/readyz` (can it serve: Postgres answers; Redis is
//! nice to have), plus `/metrics`.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use serde_json::json;

use crate::db::replicas;
use crate::http::AppState;
use crate::http::openapi;
use crate::metrics::FollowerState;

/// Liveness
///
/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Up", body = openapi::Health)),
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(description = "`GET /readyz`: whether the service can serve.")]
pub(crate) struct Readiness {
    #[schema(value_type = openapi::ReadinessStatus)]
    status: &'static str,
    #[schema(value_type = openapi::Backend)]
    postgres: &'static str,
    #[schema(value_type = openapi::Backend)]
    redis: &'static str,
    /// The change feed follower: `applying` (this instance applies the feed), `standby`
    /// (following; another instance applies), `down` (not connected: changes made by
    /// other programs wait in Postgres until a follower applies them).
    change_feed: FollowerState,
    /// With `DATABASE_REPLICA_URL` only: `ok` (every replica up and within
    /// `DATABASE_REPLICA_MAX_LAG_MS`) or `degraded` (some misses go to the primary instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::ReplicaStatus>)]
    replicas: Option<&'static str>,
}

/// Readiness
///
/// 200 `ok` with both up, 200 `degraded` with Redis down (reads go to Postgres), the
/// change feed not followed, or a replica down or lagging (its misses go to the primary),
/// 503 `unavailable` with Postgres down. Each check is bounded
/// by its pool's timeouts.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: Postgres answers", body = openapi::Readiness),
        (status = 503, description = "Not ready: Postgres is down", body = openapi::Readiness),
    ),
)]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (postgres, redis) = tokio::join!(state.service.ping_postgres(), state.service.ping_redis());
    let change_feed = state.feed.state();
    let replicas = state.service.replica_health();
    let degraded = redis.is_err()
        || change_feed == FollowerState::Down
        || replicas == replicas::Health::Degraded;
    let readiness = Readiness {
        status: match (&postgres, degraded) {
            (Err(_), _) => "unavailable",
            (Ok(()), true) => "degraded",
            (Ok(()), false) => "ok",
        },
        postgres: if postgres.is_ok() { "ok" } else { "down" },
        redis: if redis.is_ok() { "ok" } else { "down" },
        change_feed,
        replicas: match replicas {
            replicas::Health::None => None,
            replicas::Health::Ok => Some("ok"),
            replicas::Health::Degraded => Some("degraded"),
        },
    };
    if postgres.is_ok() {
        HttpResponse::Ok().json(readiness)
    } else {
        HttpResponse::ServiceUnavailable().json(readiness)
    }
}

/// Metrics
///
/// Every metric, in the Prometheus text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String,
            content_type = "text/plain"),
    ),
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.sample_pools();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
