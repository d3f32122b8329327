//! HTTP: routes, handlers, errors and headers. Knows no SQL and no Redis.

pub mod body;
pub mod errors;
pub mod headers;
pub mod health;
pub mod items;
pub mod middleware;

use actix_web::web;

use crate::http::errors::method_not_allowed;

/// Every route, in one place. Each resource is named after its pattern: the request
/// metrics use that name as the `route` label.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/items")
            .name("/items")
            .route(web::get().to(items::get_items))
            .route(web::post().to(items::create_item))
            .default_service(method_not_allowed("GET, POST")),
    )
    .service(
        web::resource("/items/{id}")
            .name("/items/{id}")
            .route(web::get().to(items::get_item))
            .route(web::patch().to(items::update_item))
            .route(web::delete().to(items::delete_item))
            .default_service(method_not_allowed("GET, PATCH, DELETE")),
    )
    .service(
        web::resource("/cache/items/{id}")
            .name("/cache/items/{id}")
            .route(web::delete().to(items::evict_item))
            .default_service(method_not_allowed("DELETE")),
    )
    .service(
        web::resource("/healthz")
            .name("/healthz")
            .route(web::get().to(health::healthz))
            .default_service(method_not_allowed("GET")),
    )
    .service(
        web::resource("/readyz")
            .name("/readyz")
            .route(web::get().to(health::readyz))
            .default_service(method_not_allowed("GET")),
    )
    .service(
        web::resource("/metrics")
            .name("/metrics")
            .route(web::get().to(health::metrics))
            .default_service(method_not_allowed("GET")),
    );
}
