//! `/openapi.json` and `/docs`: the API's description, and Swagger UI over it. The UI's
//! files are compiled into the binary (utoipa-swagger-ui's `vendored` feature): no CDN, and
//! nothing is fetched at build or run time.

use std::borrow::Cow;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use bytes::Bytes;
use utoipa_swagger_ui::Config;

use crate::http::AppState;
use crate::http::errors::ApiError;
use crate::http::openapi;

/// Where the document is served, and what Swagger UI loads.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// Swagger UI's page. Its own `index.html` links its files relative to the page (`./…`),
/// which would miss them at `/docs` (no trailing slash); this one names them absolutely.
const INDEX: &str = r#"<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>itemcache API</title>
    <link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="/docs/index.css">
    <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
    <link rel="icon" type="image/png" href="/docs/favicon-16x16.png" sizes="16x16">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="/docs/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="/docs/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"#;

/// The OpenAPI 3.1 document of this API
///
/// Generated from the code once, at the first request: the operations from the handlers'
/// annotations, so it cannot drift from what is served. With `WRITE_TOKEN` set, writes carry
/// the `bearer` security scheme.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "documentation",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", body = Object,
            content_type = "application/json"),
    ),
)]
pub async fn openapi_json(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi::document_json(state.write_token.is_some()))
}

/// Swagger UI
///
/// Browse the operations and run them ("Try it out"). Its files are under `/docs/`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "documentation",
    responses(
        (status = 200, description = "Swagger UI's page", body = String,
            content_type = "text/html"),
    ),
)]
pub async fn swagger_ui() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(INDEX)
}

/// `/docs/{file}`: Swagger UI's own files (script, styles, icons, and the initializer that
/// points it at `/openapi.json`). Not an operation of the API, so not in the document.
pub async fn swagger_file(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let file = file.into_inner();
    if file.is_empty() || file == "index.html" {
        return Ok(swagger_ui().await);
    }
    // validator_url "none": Swagger UI would otherwise send the document to an online
    // validator; this page makes no request to any other host.
    let config = Arc::new(Config::new([OPENAPI_PATH]).validator_url("none"));
    match utoipa_swagger_ui::serve(&file, config) {
        Ok(Some(found)) => {
            let bytes = match found.bytes {
                Cow::Borrowed(bytes) => Bytes::from_static(bytes),
                Cow::Owned(bytes) => Bytes::from(bytes),
            };
            Ok(HttpResponse::Ok()
                .content_type(found.content_type)
                .body(bytes))
        }
        Ok(None) => Err(ApiError::RouteNotFound),
        Err(cause) => Err(ApiError::Internal(
            format!("serving the swagger ui file {file}: {cause}").into(),
        )),
    }
}
