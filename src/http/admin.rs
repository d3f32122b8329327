//! Operators' views of a running instance: `GET /admin/hot-keys`. Guarded like the writes:
//! with `WRITE_TOKEN` set, only a request carrying it is answered (which ids are hot says
//! something about the clients).

use actix_web::{HttpResponse, web};

use crate::hot_keys::TOP;
use crate::http::AppState;
use crate::http::middleware::WriteAccess;
use crate::http::openapi;

/// The most read ids
///
/// The ids this instance read most over the last one to two minutes (`GET /items/{id}` and
/// batch reads; ids not found count too), most read first, at most 10. Counted in a random
/// sample of one read in 8 by a space-saving sketch of 1024 counters: any id with more than
/// 1/1024 of the sampled reads is listed, its sampled count never under and at most
/// `error` over; `count` and `error` are the sample's times 8, and `share` is the id's
/// share of the sample, which estimates its share of all reads. Each instance counts its
/// own reads. Needs the bearer token when the service has one.
#[utoipa::path(
    get,
    path = "/admin/hot-keys",
    tag = "admin",
    responses(
        (status = 200, description = "The most read ids, most read first",
            body = Vec<openapi::HotKey>),
        openapi::HotKeysProblems,
    ),
)]
pub async fn hot_keys(_: WriteAccess, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.hot_keys().top(TOP))
}
