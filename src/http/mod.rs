//! HTTP: routes, handlers, errors and headers. Knows no SQL and no Redis.

pub mod admin;
pub mod body;
pub mod docs;
pub mod errors;
pub mod headers;
pub mod health;
pub mod items;
pub mod middleware;
pub mod openapi;
pub mod state;

pub use state::AppState;

use actix_web::web;

use crate::http::errors::method_not_allowed;

/// `get` -> `"GET"`: the methods the route table uses.
macro_rules! method_name {
    (get) => {
        "GET"
    };
    (post) => {
        "POST"
    };
    (patch) => {
        "PATCH"
    };
    (delete) => {
        "DELETE"
    };
}

/// `get` -> `"GET, HEAD"`: the methods a row's method serves (its 405's `Allow`).
macro_rules! allow_name {
    (get) => {
        "GET, HEAD"
    };
    ($method:ident) => {
        method_name!($method)
    };
}

/// The route table: every route, once. From each row (a pattern and its methods' handlers)
/// it makes
/// - the resource in [`routes`], named after its pattern (the `route` metrics label), with a
///   405 problem whose `Allow` lists the row's methods;
/// - an entry in [`ROUTES`] and [`OPERATIONS`];
/// - the row's handlers in [`ApiPaths`], whose `#[utoipa::path]` annotations make the
///   document's `paths`.
///
/// So a route cannot be served without being documented. What the table cannot see, a
/// handler annotated with another pattern or method than its row, tests/api/openapi.rs does:
/// it compares the document's operations with [`OPERATIONS`] and asks the live app for each.
macro_rules! route_table {
    ($($pattern:literal => { $($method:ident: $($handler:ident)::+),+ $(,)? }),+ $(,)?) => {
        /// Every route pattern served: the values of the `route` metrics label, with one for
        /// every path that matched no route.
        pub const ROUTES: &[&str] = &[$($pattern,)+ "unmatched"];

        /// Every operation served, as (method, pattern): what `/openapi.json` documents.
        pub const OPERATIONS: &[(&str, &str)] = &[$($((method_name!($method), $pattern),)+)+];

        fn table_routes(cfg: &mut web::ServiceConfig) {
            $(
                let resource = web::resource($pattern).name($pattern);
                $(let resource = route_table!(@route resource, $method, $($handler)::+);)+
                cfg.service(resource.default_service(method_not_allowed(
                    route_table!(@allow $($method),+),
                )));
            )+
        }

        /// The documented operations: the table's handlers, by their `#[utoipa::path]`.
        #[derive(utoipa::OpenApi)]
        #[openapi(paths($($($($handler)::+),+),+))]
        pub struct ApiPaths;
    };
    // HEAD wherever GET (RFC 9110 §9.1): the GET handler answers, and the server sends
    // its status and headers without the body.
    (@route $resource:ident, get, $handler:path) => {
        $resource
            .route(web::get().to($handler))
            .route(web::head().to($handler))
    };
    (@route $resource:ident, $method:ident, $handler:path) => {
        $resource.route(web::$method().to($handler))
    };
    (@allow $first:ident $(, $rest:ident)*) => {
        concat!(allow_name!($first) $(, ", ", allow_name!($rest))*)
    };
}

route_table! {
    "/items" => { get: items::get_items, post: items::create_item },
    "/items/{id}" => {
        get: items::get_item,
        patch: items::update_item,
        delete: items::delete_item,
    },
    "/cache/items/{id}" => { delete: items::evict_item },
    "/admin/hot-keys" => { get: admin::hot_keys },
    "/healthz" => { get: health::healthz },
    "/readyz" => { get: health::readyz },
    "/metrics" => { get: health::metrics },
    "/openapi.json" => { get: docs::openapi_json },
    "/docs" => { get: docs::swagger_ui },
}

/// Every route: the table's, and Swagger UI's files, which count as `/docs` in metrics.
pub fn routes(cfg: &mut web::ServiceConfig) {
    table_routes(cfg);
    cfg.service(
        web::resource("/docs/{file:.*}")
            .name("/docs")
            .route(web::get().to(docs::swagger_file))
            .route(web::head().to(docs::swagger_file))
            .default_service(method_not_allowed("GET, HEAD")),
    );
}
