//! Around every request: its id (`X-Request-Id`), its span, and its metrics. And the write
//! token, as an extractor that write handlers take first.

use std::future::{Ready, ready};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpRequest, web};
use tracing::Instrument;

use crate::http::AppState;
use crate::http::ROUTES;
use crate::http::errors::ApiError;
use crate::http::headers::{X_CACHE, X_REQUEST_ID};
use crate::metrics;

/// Names the request, times it, and counts it under its route pattern.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let request_id = request_id(req.headers().get(&X_REQUEST_ID));
    let span = tracing::info_span!(
        "request",
        request.id = %request_id.to_str().unwrap_or(""),
        http.method = %req.method(),
        http.path = %req.path(),
    );
    let method = method_label(req.method());
    let mut res = next.call(req).instrument(span).await?;
    // Resources are named after their pattern (see `http::routes`); unmatched paths have no
    // name and share one label, so ids in paths can never explode the label set.
    let route = route_label(res.request().match_name());
    let cache = res
        .headers()
        .get(&X_CACHE)
        .map(cache_label)
        .unwrap_or("none");
    metrics::record_http_request(
        method,
        route,
        res.status().as_u16(),
        cache,
        started.elapsed(),
    );
    res.headers_mut().insert(X_REQUEST_ID, request_id);
    Ok(res)
}

/// The client's id when it is a sane token (1 to 128 visible ASCII characters), else a new one.
fn request_id(presented: Option<&HeaderValue>) -> HeaderValue {
    match presented {
        Some(v)
            if (1..=128).contains(&v.len())
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) =>
        {
            v.clone()
        }
        // A v4 UUID from the thread's RNG: `Uuid::new_v4` asks the OS for randomness on
        // every call, a system call per request on the hot path.
        _ => HeaderValue::from_str(
            &uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string(),
        )
        .unwrap_or(HeaderValue::from_static("-")),
    }
}

/// The `route` label: a pattern from the route table (`http::ROUTES`), or `unmatched`.
fn route_label(name: Option<&str>) -> &'static str {
    name.and_then(|n| ROUTES.iter().find(|r| **r == n).copied())
        .unwrap_or("unmatched")
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn cache_label(x_cache: &HeaderValue) -> &'static str {
    match x_cache.as_bytes() {
        b"HIT" => "hit",
        b"MISS" => "miss",
        b"STALE" => "stale",
        b"BYPASS" => "bypass",
        _ => "none",
    }
}

/// Proof that a write may proceed: `WRITE_TOKEN` is unset, or the request carries it as
/// `Authorization: Bearer <token>`. Write handlers take it as their first argument, so a
/// request without the token gets 401 before its body is even read. `GET /admin/hot-keys`
/// takes it too: the same token guards the operators' views.
pub struct WriteAccess;

impl FromRequest for WriteAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(token) = req
            .app_data::<web::Data<AppState>>()
            .and_then(|s| s.write_token.clone())
        else {
            return ready(Ok(WriteAccess));
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` is `Bearer`.
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        ready(match presented {
            Some(p) if token.matches(p.trim()) => Ok(WriteAccess),
            _ => Err(ApiError::Unauthorized),
        })
    }
}
