//! The OpenAPI 3.1 document that `/openapi.json` serves and `/docs` shows.
//!
//! Its operations come from the `#[utoipa::path]` on each handler, gathered by the route
//! table in `http/mod.rs`: a route that is served is a route that is documented. This module
//! owns what the handlers' annotations share:
//! - schemas of the bodies: the service parses requests as raw JSON and answers with bytes it
//!   built (or cached) itself, so there are no serde types to derive them from. These are
//!   schema-only types, checked against the real ones by the tests below;
//! - parameters (`{id}`, the `GET /items` query, the conditional headers);
//! - problem responses, made from real [`ApiError`]s: their statuses, `code` values,
//!   headers and examples are what the service sends;
//! - response headers, defined once under `components/headers`;
//! - the finishing pass over the whole document ([`document`]).

use std::collections::BTreeMap;

use actix_web::ResponseError;
use actix_web::body::MessageBody;
use actix_web::http::Method;
use serde_json::{Value, json};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi, Ref, RefOr};
use utoipa::{IntoParams, IntoResponses, OpenApi as _, ToSchema};

use crate::http::body::BODY_LIMIT;
use crate::http::errors::{ApiError, PROBLEM_JSON};
use crate::items::model::FieldError as ModelFieldError;

/// The document's frame: what is not an operation.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "itemcache",
        description = "Item lookups over HTTP: Redis in front of Postgres (cache-aside, \
            read-through). Reads say where they were answered from in `X-Cache`; writes are \
            visible to every later read at once. Every error is an RFC 9457 problem document \
            (`application/problem+json`) with a stable `code`.",
        license(name = "MIT", identifier = "MIT"),
    ),
    components(schemas(Problem, FieldError)),
    tags(
        (name = "items", description = "Items: cache-aside reads, and writes that invalidate"),
        (name = "cache", description = "The cache itself"),
        (name = "operations", description = "Health, readiness and metrics"),
        (name = "documentation", description = "This document and its Swagger UI"),
    ),
)]
struct Frame;

/// The name of the bearer-token security scheme (present when `WRITE_TOKEN` is set).
pub const BEARER: &str = "bearer";

/// The whole document. `writes_need_token`: `WRITE_TOKEN` is set, so every write carries the
/// bearer security scheme and may answer 401; without it, writes document neither.
pub fn document(writes_need_token: bool) -> OpenApi {
    let mut doc = Frame::openapi();
    doc.merge(super::ApiPaths::openapi());
    let shared = shared_headers();
    let components = doc.components.get_or_insert_with(Default::default);
    components.headers = shared.clone();
    // Every object the service sends or takes is closed: an unknown request field is a 422,
    // and a response field the document does not name is a bug a client should hear about.
    for schema in components.schemas.values_mut() {
        if let RefOr::T(Schema::Object(object)) = schema
            && object.schema_type == SchemaType::Type(Type::Object)
        {
            object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        }
    }
    if writes_need_token {
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`Authorization: Bearer <WRITE_TOKEN>`"))
                    .build(),
            ),
        );
    }
    for item in doc.paths.paths.values_mut() {
        for (method, operation) in operations_mut(item) {
            let write = method != Method::GET;
            if write && writes_need_token {
                operation.security = Some(vec![SecurityRequirement::new(BEARER, [""; 0])]);
            }
            let responses = &mut operation.responses.responses;
            if write && !writes_need_token {
                responses.remove("401");
            }
            for response in responses.values_mut() {
                if let RefOr::T(response) = response {
                    share_headers(response, &shared);
                }
            }
        }
    }
    doc
}

/// The document as served.
pub fn document_json(writes_need_token: bool) -> Vec<u8> {
    serde_json::to_vec(&document(writes_need_token)).unwrap_or_default()
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, item.get.as_mut()),
        (Method::POST, item.post.as_mut()),
        (Method::PUT, item.put.as_mut()),
        (Method::PATCH, item.patch.as_mut()),
        (Method::DELETE, item.delete.as_mut()),
        (Method::HEAD, item.head.as_mut()),
        (Method::OPTIONS, item.options.as_mut()),
        (Method::TRACE, item.trace.as_mut()),
    ]
    .into_iter()
    .filter_map(|(method, op)| Some((method, op?)))
}

// --- response headers --------------------------------------------------------------------

/// Headers the annotations name (by name alone), each defined once here. Required where it
/// is named: an annotation that describes a header itself marks it as sometimes absent
/// there (`GET /items` has `X-Cache` on batch reads only), and gets the schema inline.
fn shared_headers() -> BTreeMap<String, RefOr<Header>> {
    let string = |pattern: Option<&str>| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(pattern)
    };
    [
        (
            "X-Request-Id",
            "The request's id, in every response: the client's own when it sent a sane one \
             (1 to 128 visible ASCII characters), else a new UUID.",
            string(Some(r"^[!-~]{1,128}$")).build(),
            json!("5b0c6a1e-8f52-4b7e-9d1a-6f0e3c2d4b1a"),
        ),
        (
            "ETag",
            "The item's version as a strong entity tag; it changes whenever the item does. \
             Send it back in `If-None-Match` (reads) or `If-Match` (writes).",
            string(Some(r#"^"[0-9]+"$"#)).build(),
            json!("\"3\""),
        ),
        (
            "X-Cache",
            "Where the read was answered from. `HIT`: the cache (a cached \"not found\" too); \
             `MISS`: Postgres, now cached; `STALE`: the cache past freshness, because Postgres \
             could not be read; `BYPASS`: Postgres, the cache disabled or unavailable.",
            string(None)
                .enum_values(Some(["HIT", "MISS", "STALE", "BYPASS"]))
                .build(),
            json!("HIT"),
        ),
        (
            "Server-Timing",
            "W3C Server Timing, in milliseconds: `cache;dur=…`, and `db;dur=…` when Postgres \
             was read.",
            string(Some(
                r"^cache;dur=[0-9]+\.[0-9]+(, db;dur=[0-9]+\.[0-9]+)?$",
            ))
            .build(),
            json!("cache;dur=0.120, db;dur=1.800"),
        ),
        (
            "Location",
            "The new item's path.",
            string(Some(r"^/items/[1-9][0-9]*$")).build(),
            json!("/items/42"),
        ),
        (
            "Retry-After",
            "Seconds to wait before retrying.",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .build(),
            json!(super::errors::RETRY_AFTER_SECS),
        ),
        (
            "WWW-Authenticate",
            "The scheme writes need: `Bearer`.",
            string(None).enum_values(Some(["Bearer"])).build(),
            json!("Bearer"),
        ),
    ]
    .into_iter()
    .map(|(name, description, schema, example)| {
        let mut header = HeaderBuilder::new()
            .schema(Some(schema))
            .description(Some(description))
            .example(Some(example))
            .build();
        header.extensions = Some(required());
        (name.to_owned(), RefOr::T(header))
    })
    .collect()
}

/// utoipa 6's `Header` has no `required` (OpenAPI's Header Object does): it goes through
/// the extension map, which is flattened into the header object.
fn required() -> Extensions {
    let mut extensions = Extensions::default();
    extensions.insert("required".to_owned(), Value::Bool(true));
    extensions
}

/// Points a response's headers at their shared definitions, and adds `X-Request-Id`.
fn share_headers(response: &mut Response, shared: &BTreeMap<String, RefOr<Header>>) {
    for (name, header) in response.headers.iter_mut() {
        let Some(RefOr::T(definition)) = shared.get(name) else {
            continue;
        };
        match header {
            RefOr::T(own) if own.description.is_some() => {
                own.schema = definition.schema.clone();
            }
            _ => *header = RefOr::Ref(Ref::new(format!("#/components/headers/{name}"))),
        }
    }
    response.headers.insert(
        "X-Request-Id".to_owned(),
        RefOr::Ref(Ref::new("#/components/headers/X-Request-Id")),
    );
}

// --- problem responses -------------------------------------------------------------------

/// Problem responses for these errors: one per status, its `code` limited to theirs, with
/// each error's real body as an example and its real headers (`Retry-After`,
/// `WWW-Authenticate`) declared.
fn problems(errors: &[ApiError]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<&ApiError>> = BTreeMap::new();
    for error in errors {
        by_status
            .entry(error.status_code().as_u16())
            .or_default()
            .push(error);
    }
    by_status
        .into_iter()
        .map(|(status, errors)| (status.to_string(), RefOr::T(problem_response(&errors))))
        .collect()
}

fn problem_response(errors: &[&ApiError]) -> Response {
    let codes: Vec<&str> = errors.iter().map(|e| e.code()).collect();
    let description = errors
        .iter()
        .map(|e| format!("{} (`{}`)", e.title(), e.code()))
        .collect::<Vec<_>>()
        .join(", or ");
    let schema = AllOfBuilder::new()
        .item(Ref::from_schema_name("Problem"))
        .item(
            ObjectBuilder::new().property(
                "code",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(codes)),
            ),
        );
    let mut response = ResponseBuilder::new().description(description);
    let mut examples = Vec::new();
    for error in errors {
        let sent = error.error_response();
        for name in sent.headers().keys() {
            if name != actix_web::http::header::CONTENT_TYPE {
                response = response.header(canonical(name.as_str()), Header::default());
            }
        }
        let body = sent
            .into_body()
            .try_into_bytes()
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
        examples.push((error.code(), ExampleBuilder::new().value(body).build()));
    }
    response
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(schema))
                .examples_from_iter(examples)
                .build(),
        )
        .build()
}

/// `retry-after` -> `Retry-After`, as the shared header definitions are named.
fn canonical(name: &str) -> String {
    match name {
        "www-authenticate" => "WWW-Authenticate".to_owned(),
        _ => name
            .split('-')
            .map(|word| {
                let mut chars = word.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("-"),
    }
}

fn invalid_ids() -> ApiError {
    ApiError::InvalidIds("ids must be integers from 1 to 9223372036854775807, got \"x\"".into())
}

fn invalid_query() -> ApiError {
    ApiError::InvalidQuery("limit must be an integer from 1 to 1000, got \"0\"".into())
}

fn malformed_json() -> ApiError {
    ApiError::MalformedJson("expected value at line 1 column 1".into())
}

fn validation_failed() -> ApiError {
    ApiError::Validation(vec![ModelFieldError {
        field: "name".into(),
        message: "must not be blank".into(),
    }])
}

/// Declares, per operation, the errors it can answer with.
macro_rules! problem_responses {
    ($($(#[$doc:meta])* $name:ident: [$($error:expr),+ $(,)?];)+) => {$(
        $(#[$doc])*
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                problems(&[$($error),+])
            }
        }
    )+};
}

/// `GET /items/{id}`. Its 404 is still a read: it carries the read's cache headers.
pub struct GetItemProblems;

impl IntoResponses for GetItemProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = problems(&[
            ApiError::InvalidId,
            ApiError::ItemNotFound,
            ApiError::DatabaseUnavailable,
            ApiError::Overloaded,
        ]);
        if let Some(RefOr::T(not_found)) = responses.get_mut("404") {
            for name in ["X-Cache", "Server-Timing"] {
                not_found
                    .headers
                    .insert(name.to_owned(), RefOr::T(Header::default()));
            }
        }
        responses
    }
}

problem_responses! {
    /// `GET /items`.
    GetItemsProblems: [
        invalid_ids(),
        invalid_query(),
        ApiError::DatabaseUnavailable,
        ApiError::Overloaded,
    ];
    /// `POST /items`.
    CreateItemProblems: [
        malformed_json(),
        ApiError::Unauthorized,
        ApiError::PayloadTooLarge(BODY_LIMIT),
        ApiError::UnsupportedMediaType,
        validation_failed(),
        ApiError::DatabaseUnavailable,
        ApiError::Overloaded,
    ];
    /// `PATCH /items/{id}`.
    UpdateItemProblems: [
        ApiError::InvalidId,
        malformed_json(),
        ApiError::Unauthorized,
        ApiError::ItemNotFound,
        ApiError::VersionConflict,
        ApiError::PayloadTooLarge(BODY_LIMIT),
        ApiError::UnsupportedMediaType,
        validation_failed(),
        ApiError::DatabaseUnavailable,
        ApiError::Overloaded,
    ];
    /// `DELETE /items/{id}`.
    DeleteItemProblems: [
        ApiError::InvalidId,
        ApiError::Unauthorized,
        ApiError::ItemNotFound,
        ApiError::VersionConflict,
        ApiError::DatabaseUnavailable,
        ApiError::Overloaded,
    ];
    /// `DELETE /cache/items/{id}`.
    EvictItemProblems: [ApiError::InvalidId, ApiError::Unauthorized];
}

// --- schemas -----------------------------------------------------------------------------

/// An item, as every read and write returns it.
#[derive(ToSchema)]
#[schema(example = json!({
    "id": 42, "name": "Widget", "description": "A widget.", "price_cents": 1999, "version": 3,
    "created_at": "2026-11-24T10:00:00.123456Z", "updated_at": "2026-11-24T10:05:00.654321Z"
}))]
pub struct Item {
    #[schema(minimum = 1)]
    pub id: i64,
    /// 1 to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// 0 to 10,000 characters.
    #[schema(max_length = 10000)]
    pub description: String,
    #[schema(minimum = 0)]
    pub price_cents: i64,
    /// 1 when created, one more on each update. The `ETag` is this number in quotes.
    #[schema(minimum = 1)]
    pub version: i64,
    /// UTC, microseconds.
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// The body of `POST /items`. The patterns (ECMA-262, as in JSON Schema): a name has a
/// character that is not whitespace; no text has U+0000, which Postgres text cannot hold.
#[derive(ToSchema)]
#[schema(example = json!({"name": "Widget", "description": "A widget.", "price_cents": 1999}))]
pub struct CreateItem {
    /// 1 to 200 characters, not blank (at least one that is not whitespace); no U+0000.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    )]
    pub name: String,
    /// 0 to 10,000 characters, no U+0000; "" when absent.
    #[serde(default)]
    #[schema(max_length = 10000, pattern = r"^[^\u0000]*$")]
    pub description: String,
    /// 0 when absent.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub price_cents: i64,
}

/// The body of `PATCH /items/{id}`: the fields to change, at least one.
#[derive(ToSchema)]
#[schema(min_properties = 1, example = json!({"price_cents": 1499}))]
pub struct UpdateItem {
    /// 1 to 200 characters, not blank; no U+0000.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    )]
    pub name: String,
    /// 0 to 10,000 characters, no U+0000.
    #[serde(default)]
    #[schema(max_length = 10000, pattern = r"^[^\u0000]*$")]
    pub description: String,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub price_cents: i64,
}

/// `GET /items`: a batch read (`ids=`) or a page (`limit`, `after_id`).
#[derive(ToSchema)]
#[serde(untagged)]
pub enum ItemList {
    Batch(Batch),
    Page(Page),
}

/// A batch read: the items found, in request order, each once; the ids not found.
#[derive(ToSchema)]
#[schema(example = json!({"items": [], "missing": [7]}))]
pub struct Batch {
    pub items: Vec<Item>,
    pub missing: Vec<i64>,
}

/// A page, by id: pass `next_after_id` as `after_id` for the next page; `null` on the last.
#[derive(ToSchema)]
#[schema(example = json!({"items": [], "next_after_id": null}))]
pub struct Page {
    pub items: Vec<Item>,
    #[schema(required = true, minimum = 1)]
    pub next_after_id: Option<i64>,
}

/// An RFC 9457 problem document: the body of every error.
#[derive(ToSchema)]
#[schema(example = json!({
    "type": "urn:itemcache:problem:item_not_found", "title": "Item not found", "status": 404,
    "detail": "no item has this id", "code": "item_not_found"
}))]
pub struct Problem {
    /// `urn:itemcache:problem:` and the code.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    /// The response's status.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// Stable snake_case: what clients branch on.
    pub code: String,
    /// `validation_failed` only: every field's problem.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// One field's problem in a `validation_failed`.
#[derive(ToSchema)]
pub struct FieldError {
    /// The field's name; "" for the body as a whole.
    pub field: String,
    pub message: String,
}

/// `GET /healthz`: the process is up.
#[derive(ToSchema)]
pub struct Health {
    pub status: HealthStatus,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
}

/// `GET /readyz`.
#[derive(ToSchema)]
pub struct Readiness {
    /// `ok`: both up; `degraded`: Redis down (reads go to Postgres); `unavailable`:
    /// Postgres down (503).
    pub status: ReadinessStatus,
    pub postgres: Backend,
    pub redis: Backend,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadinessStatus {
    Ok,
    Degraded,
    Unavailable,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ok,
    Down,
}

// --- parameters --------------------------------------------------------------------------

/// `{id}` in an item's path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ItemPath {
    /// The item's id: an integer from 1 to 2^63 − 1; anything else is 400 `invalid_id`.
    #[param(minimum = 1, example = 42)]
    pub id: i64,
}

/// The query of `GET /items`: `ids` for a batch read, or `limit` and `after_id` for a page.
/// These parameters and the conditional headers have no `example`: Swagger UI fills examples
/// into "Try it out", and `ids` with `limit`, or a stale `If-Match`, would fail the request.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ItemsQuery {
    /// A batch read of 1 to 100 comma-separated ids, e.g. `3,1,2`: items in request order,
    /// duplicates once. Not with `limit` or `after_id`. Bad ids: 400 `invalid_ids`.
    #[param(pattern = "^[0-9]+(,[0-9]+)*$", nullable = false)]
    pub ids: Option<String>,
    /// Page size, 1 to 1000.
    #[param(minimum = 1, maximum = 1000, default = 50, nullable = false)]
    pub limit: Option<i64>,
    /// The page starts after this id.
    #[param(minimum = 0, default = 0, nullable = false)]
    pub after_id: Option<i64>,
}

/// A conditional read.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfNoneMatch {
    /// The `ETag` you hold: 304 without a body while the item is at that version.
    #[param(rename = "If-None-Match", nullable = false)]
    pub if_none_match: Option<String>,
}

/// A conditional write.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatch {
    /// The `ETag` the write is meant for: 412 `version_conflict` if the item has moved on.
    #[param(rename = "If-Match", nullable = false)]
    pub if_match: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::model::{Item as ModelItem, ItemJson};

    fn doc() -> Value {
        serde_json::from_slice(&document_json(true)).unwrap_or_default()
    }

    #[test]
    fn the_item_schema_names_exactly_the_fields_an_item_serializes_to() {
        let at = chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap_or_default();
        let item = ModelItem {
            id: 1,
            name: "n".into(),
            description: String::new(),
            price_cents: 0,
            version: 1,
            created_at: at,
            updated_at: at,
        };
        let served: Value =
            serde_json::from_slice(&ItemJson::from_item(&item).json).unwrap_or_default();
        let mut served: Vec<&String> = served
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        let doc = doc();
        let schema = &doc["components"]["schemas"]["Item"];
        let mut documented: Vec<&String> = schema["properties"]
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        served.sort();
        documented.sort();
        assert_eq!(served, documented);
        assert_eq!(schema["required"].as_array().map(Vec::len), Some(7));
    }

    #[test]
    fn every_header_named_is_defined_once() {
        let doc = doc();
        let shared = doc["components"]["headers"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut named = 0;
        for item in doc["paths"]
            .as_object()
            .into_iter()
            .flat_map(|p| p.values())
        {
            for operation in item.as_object().into_iter().flat_map(|o| o.values()) {
                for response in operation["responses"]
                    .as_object()
                    .into_iter()
                    .flat_map(|r| r.values())
                {
                    for (name, header) in response["headers"].as_object().into_iter().flatten() {
                        named += 1;
                        assert!(
                            shared.contains_key(name),
                            "{name} is not in components/headers"
                        );
                        assert!(
                            header.get("$ref").is_some() || header["schema"].is_object(),
                            "{name}: {header}"
                        );
                    }
                    assert!(
                        response["headers"]["X-Request-Id"].is_object(),
                        "{response}"
                    );
                }
            }
        }
        assert!(named > 20, "{named}");
    }

    #[test]
    fn problem_examples_are_the_bodies_the_service_sends() {
        let doc = doc();
        let not_found = &doc["paths"]["/items/{id}"]["get"]["responses"]["404"];
        let content = &not_found["content"][PROBLEM_JSON];
        assert_eq!(
            content["examples"]["item_not_found"]["value"]["code"],
            "item_not_found"
        );
        assert_eq!(
            content["schema"]["allOf"][1]["properties"]["code"]["enum"],
            json!(["item_not_found"])
        );
        let unavailable = &doc["paths"]["/items/{id}"]["get"]["responses"]["503"];
        assert!(
            unavailable["headers"]["Retry-After"].is_object(),
            "{unavailable}"
        );
    }

    #[test]
    fn writes_carry_the_bearer_scheme_only_when_a_token_is_set() {
        let with: Value = serde_json::from_slice(&document_json(true)).unwrap_or_default();
        let without: Value = serde_json::from_slice(&document_json(false)).unwrap_or_default();
        let post = |doc: &Value| doc["paths"]["/items"]["post"].clone();
        assert_eq!(post(&with)["security"], json!([{BEARER: []}]));
        assert!(post(&with)["responses"]["401"].is_object());
        assert!(post(&without)["security"].is_null());
        assert!(post(&without)["responses"]["401"].is_null());
        assert!(without["components"]["securitySchemes"].is_null());
        assert!(with["paths"]["/items"]["get"]["security"].is_null());
    }
}
