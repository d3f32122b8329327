//! The OpenAPI 3.1 document that `/openapi.json` serves and `/docs` shows.
//!
//! Its operations come from the `#[utoipa::path]` on each handler, gathered by the route
//! table in `http/mod.rs`: a route that is served is a route that is documented. This module
//! owns what the handlers' annotations share:
//! - schemas of the bodies. Where the service has a serde type for a body, the schema is
//!   derived on it and re-exported here, where the annotations name it: [`Item`] and
//!   [`FieldError`] (`items/model.rs`), [`Page`] (`items/service.rs`), [`HotKey`]
//!   (`hot_keys.rs`), `Problem`
//!   (`http/errors.rs`), `Readiness` (`http/health.rs`). Where it has none, the type here
//!   is schema-only: request bodies are parsed as raw JSON, the batch body is spliced from
//!   cached bytes, `/healthz` answers a literal;
//! - the limits the service enforces ([`apply_limits`]), from the constants that enforce
//!   them: derive attributes take only literals;
//! - parameters (`{id}`, the `GET /items` query, the conditional headers);
//! - problem responses, made from real [`ApiError`]s: their statuses, `code` values,
//!   headers and examples are what the service sends;
//! - response headers, defined once under `components/headers`;
//! - the finishing pass over the whole document ([`document`]), which runs once per
//!   process for each of its two variants ([`document_json`]).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use actix_web::ResponseError;
use actix_web::body::MessageBody;
use actix_web::http::Method;
use bytes::Bytes;
use serde_json::{Value, json};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, KnownFormat, Object, ObjectBuilder, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi, Ref, RefOr, Required};
use utoipa::{IntoParams, IntoResponses, OpenApi as _, ToSchema};

use crate::http::body::BODY_LIMIT;
use crate::http::errors::{ApiError, PROBLEM_JSON};
use crate::http::items::{BATCH_MAX, LIST_DEFAULT, LIST_MAX};
use crate::items::model::{DESCRIPTION_MAX_CHARS, NAME_MAX_CHARS};

pub use crate::hot_keys::HotKey;
pub(crate) use crate::http::errors::Problem;
pub(crate) use crate::http::health::Readiness;
pub use crate::items::model::{FieldError, Item};
pub use crate::items::service::Page;

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
        (name = "admin", description = "Operators' views of a running instance"),
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
    apply_limits(&mut components.schemas);
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
        for (_, operation) in operations_mut(item) {
            // Guarded by the token: the writes and the admin views, each of which lists
            // the 401 it answers without it.
            let guarded = operation.responses.responses.contains_key("401");
            if guarded && writes_need_token {
                operation.security = Some(vec![SecurityRequirement::new(BEARER, [""; 0])]);
            }
            let responses = &mut operation.responses.responses;
            if guarded && !writes_need_token {
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

/// The document as served, built and serialized once per process for each variant: it
/// depends on nothing but the code and whether `WRITE_TOKEN` is set, so every request
/// answers with the same bytes (a `Bytes` clone shares them).
pub fn document_json(writes_need_token: bool) -> Bytes {
    static OPEN: LazyLock<Bytes> = LazyLock::new(|| serialized(false));
    static WITH_TOKEN: LazyLock<Bytes> = LazyLock::new(|| serialized(true));
    if writes_need_token {
        WITH_TOKEN.clone()
    } else {
        OPEN.clone()
    }
}

#[expect(
    clippy::expect_used,
    reason = "a document of strings, numbers and maps always serializes; an empty document \
              would be a plausible wrong answer"
)]
fn serialized(writes_need_token: bool) -> Bytes {
    Bytes::from(serde_json::to_vec(&document(writes_need_token)).expect("the document serializes"))
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
            "Cache-Status",
            "How the cache handled the read (RFC 9211), `X-Cache` in the standard's terms: \
             `hit` (answered from the cache); `fwd=miss; stored` (read from Postgres, now \
             cached); `fwd=stale; fwd-status=503` (the entry was past freshness and Postgres \
             could not be read: the stale entry was served); `fwd=bypass` (the cache was not \
             used). A hit on one item adds `ttl`, the entry's remaining freshness in \
             seconds (negative: served past freshness while it is revalidated), and \
             `detail=early-refresh` or `detail=stale-while-revalidate` when it started a \
             background refresh, else `detail=near` when the in-process near cache \
             answered (`CACHE_L1_MAX_MB`).",
            string(Some(
                r"^itemcache; (hit(; ttl=-?[0-9]+)?(; detail=(early-refresh|stale-while-revalidate|near))?|fwd=miss; stored|fwd=stale; fwd-status=503|fwd=bypass)$",
            ))
            .build(),
            json!("itemcache; hit"),
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
    ApiError::InvalidIds(format!(
        "ids must be integers from 1 to {}, got \"x\"",
        i64::MAX
    ))
}

fn invalid_query() -> ApiError {
    ApiError::InvalidQuery(format!(
        "limit must be an integer from 1 to {LIST_MAX}, got \"0\""
    ))
}

fn malformed_json() -> ApiError {
    ApiError::MalformedJson("expected value at line 1 column 1".into())
}

fn validation_failed() -> ApiError {
    ApiError::Validation(vec![FieldError {
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
            ApiError::DatabaseUnavailable(None),
            ApiError::Overloaded,
        ]);
        if let Some(RefOr::T(not_found)) = responses.get_mut("404") {
            for name in ["X-Cache", "Cache-Status", "Server-Timing"] {
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
        ApiError::DatabaseUnavailable(None),
        ApiError::Overloaded,
    ];
    /// `POST /items`.
    CreateItemProblems: [
        malformed_json(),
        ApiError::Unauthorized,
        ApiError::PayloadTooLarge(BODY_LIMIT),
        ApiError::UnsupportedMediaType,
        validation_failed(),
        ApiError::DatabaseUnavailable(None),
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
        ApiError::DatabaseUnavailable(None),
        ApiError::Overloaded,
    ];
    /// `DELETE /items/{id}`.
    DeleteItemProblems: [
        ApiError::InvalidId,
        ApiError::Unauthorized,
        ApiError::ItemNotFound,
        ApiError::VersionConflict,
        ApiError::DatabaseUnavailable(None),
        ApiError::Overloaded,
    ];
    /// `DELETE /cache/items/{id}`.
    EvictItemProblems: [ApiError::InvalidId, ApiError::Unauthorized];
    /// `GET /admin/hot-keys`.
    HotKeysProblems: [ApiError::Unauthorized];
}

// --- schemas -----------------------------------------------------------------------------

/// Sets the limits the service enforces on the schemas that carry them, from the constants
/// that enforce them. A schema or property missing here is a bug the tests below catch.
fn apply_limits(schemas: &mut BTreeMap<String, RefOr<Schema>>) {
    for schema in ["Item", "CreateItem", "UpdateItem"] {
        let Some(RefOr::T(Schema::Object(object))) = schemas.get_mut(schema) else {
            continue;
        };
        if let Some(name) = property(object, "name") {
            name.max_length = Some(NAME_MAX_CHARS);
        }
        if let Some(description) = property(object, "description") {
            description.max_length = Some(DESCRIPTION_MAX_CHARS);
        }
        // Postgres `bigint`: a larger number is a 422, not a wrapped price.
        if let Some(price) = property(object, "price_cents") {
            price.maximum = Some(i64::MAX.into());
        }
    }
}

fn property<'a>(object: &'a mut Object, name: &str) -> Option<&'a mut Object> {
    match object.properties.get_mut(name)? {
        RefOr::T(Schema::Object(property)) => Some(property),
        _ => None,
    }
}

// The name pattern spells out Unicode `White_Space`, which `ItemName::parse` trims:
// ECMA-262's `\s` differs from it in U+0085 (not in `\s`) and U+FEFF (not `White_Space`).
/// The body of `POST /items`. The patterns (ECMA-262, as in JSON Schema): a name has a
/// character that is not whitespace (Unicode `White_Space`); no text has U+0000, which
/// Postgres text cannot hold.
#[derive(ToSchema)]
#[schema(example = json!({"name": "Widget", "description": "A widget.", "price_cents": 1999}))]
pub struct CreateItem {
    /// Not blank (at least one character that is not whitespace); no U+0000.
    #[schema(
        min_length = 1,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub name: String,
    /// No U+0000; "" when absent.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
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
    /// Not blank (at least one character that is not whitespace); no U+0000.
    #[serde(default)]
    #[schema(
        min_length = 1,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub name: String,
    /// No U+0000.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
    pub description: String,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub price_cents: i64,
}

/// `GET /items`: a batch read (`ids=`), or a page (`limit`, `after_id`; with `name`, of the
/// items with that name).
#[derive(ToSchema)]
#[serde(untagged)]
pub enum ItemList {
    Batch(Batch),
    Page(Page),
}

// Spliced from each item's cached bytes (`http/items.rs`): no type to derive from.
/// A batch read: the items found, in request order, each once; the ids not found.
#[derive(ToSchema)]
#[schema(example = json!({"items": [], "missing": [7]}))]
pub struct Batch {
    pub items: Vec<Item>,
    pub missing: Vec<i64>,
}

// The handler answers a literal: no type to derive from.
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

// The values of `Readiness::status` (a `&str` there).
/// `ok`: both up; `degraded`: Redis down (reads go to Postgres) or the change feed not
/// followed; `unavailable`: Postgres down (503).
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadinessStatus {
    Ok,
    Degraded,
    Unavailable,
}

// The values of `Readiness::replicas`.
/// `ok`: every replica up and within `DATABASE_REPLICA_MAX_LAG_MS`; `degraded`: some
/// misses go to the primary instead.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaStatus {
    Ok,
    Degraded,
}

// The values of `Readiness::postgres` and `::redis`.
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

/// The query of `GET /items`: `ids` for a batch read, or `limit` and `after_id` for a page,
/// of all items or (with `name`) of those with one name.
/// Written out rather than derived, for its limits come from `http/items.rs`. These
/// parameters have no `example`: Swagger UI fills examples into "Try it out", and `ids`
/// with `limit` would fail the request.
pub struct ItemsQuery;

impl IntoParams for ItemsQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let int64 = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        };
        [
            (
                "ids",
                format!(
                    "A batch read of 1 to {BATCH_MAX} comma-separated ids, e.g. `3,1,2`: items \
                     in request order, duplicates once. Not with `limit` or `after_id`. Bad \
                     ids: 400 `invalid_ids`."
                ),
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(format!("^[0-9]+(,[0-9]+){{0,{}}}$", BATCH_MAX - 1))),
            ),
            (
                "name",
                format!(
                    "A lookup by name: the items whose name is exactly this (no pattern \
                     matching), in id order, paged by `limit` and `after_id`. 1 to \
                     {NAME_MAX_CHARS} characters. Not with `ids`. The first page with the \
                     default `limit` is cached (`X-Cache` as for items); other pages come \
                     from Postgres (`BYPASS`)."
                ),
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(NAME_MAX_CHARS)),
            ),
            (
                "limit",
                format!("Page size, 1 to {LIST_MAX}."),
                int64()
                    .minimum(Some(1))
                    .maximum(Some(LIST_MAX))
                    .default(Some(json!(LIST_DEFAULT))),
            ),
            (
                "after_id",
                "The page starts after this id.".to_owned(),
                int64().minimum(Some(0)).default(Some(json!(0))),
            ),
        ]
        .into_iter()
        .map(|(name, description, schema)| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(schema))
                .build()
        })
        .collect()
    }
}

/// A conditional read. No `example`: Swagger UI would fill it into "Try it out", and a
/// matching tag makes the read a 304.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfNoneMatch {
    /// The `ETag` you hold: 304 without a body while the item is at that version.
    #[param(rename = "If-None-Match", nullable = false)]
    pub if_none_match: Option<String>,
}

/// A conditional write. The header takes `*` (the item exists) or entity tags as `ETag`
/// sends them (`"3"`; a weak `W/"3"` compares the same), comma-separated. Other values are
/// well-formed HTTP but name no version of ours, so the write is always refused (412): the
/// schema says what can succeed. `*` and the tags are apart (`anyOf`) so that a generator
/// that cannot produce quotes in a header (schemathesis' coverage phase sends only letters
/// and digits there) still finds `*`, rather than sending a value that can never match. No
/// `example`: Swagger UI would fill it into "Try it out".
pub struct IfMatch;

impl IntoParams for IfMatch {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        const TAG: &str = r#"(W/)?"[0-9]+""#;
        let schema = AnyOfBuilder::new()
            .schema_type(Type::String)
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["*"])),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(format!("^{TAG}([ \\t]*,[ \\t]*{TAG})*$"))),
            );
        vec![
            ParameterBuilder::new()
                .name("If-Match")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "`*`, or the `ETag` the write is meant for (or several, comma-separated): \
                     412 `version_conflict` if the item is at none of them.",
                ))
                .schema(Some(schema))
                .build(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::model::ItemJson;

    fn doc() -> Value {
        serde_json::from_slice(&document_json(true)).unwrap_or_default()
    }

    #[test]
    fn the_item_schema_names_exactly_the_fields_an_item_serializes_to() {
        let at = chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap_or_default();
        let item = Item {
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
        // The admin views are reads, guarded like the writes.
        let hot_keys = |doc: &Value| doc["paths"]["/admin/hot-keys"]["get"].clone();
        assert_eq!(hot_keys(&with)["security"], json!([{BEARER: []}]));
        assert!(hot_keys(&with)["responses"]["401"].is_object());
        assert!(hot_keys(&without)["responses"]["401"].is_null());
    }

    #[test]
    fn the_limits_are_the_constants_the_service_enforces() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for schema in ["Item", "CreateItem", "UpdateItem"] {
            let properties = &schemas[schema]["properties"];
            assert_eq!(
                properties["name"]["maxLength"],
                json!(NAME_MAX_CHARS),
                "{schema}"
            );
            assert_eq!(
                properties["description"]["maxLength"],
                json!(DESCRIPTION_MAX_CHARS),
                "{schema}"
            );
            assert_eq!(
                properties["price_cents"]["maximum"],
                json!(i64::MAX),
                "{schema}"
            );
        }
        let query = doc["paths"]["/items"]["get"]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let parameter = |name: &str| {
            query
                .iter()
                .find(|p| p["name"] == name)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(parameter("limit")["schema"]["maximum"], json!(LIST_MAX));
        assert_eq!(parameter("limit")["schema"]["default"], json!(LIST_DEFAULT));
        let ids = parameter("ids")["schema"]["pattern"].clone();
        assert_eq!(
            ids,
            json!(format!("^[0-9]+(,[0-9]+){{0,{}}}$", BATCH_MAX - 1))
        );
        let too_large = &doc["paths"]["/items"]["post"]["responses"]["413"];
        let example = &too_large["content"][PROBLEM_JSON]["examples"]["payload_too_large"];
        let detail = example["value"]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&BODY_LIMIT.to_string()), "{detail}");
    }

    #[test]
    fn every_problem_the_service_sends_fits_the_problem_schema() {
        let doc = doc();
        let schema = &doc["components"]["schemas"]["Problem"];
        let properties = schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for error in [validation_failed(), ApiError::DatabaseUnavailable(None)] {
            let body = error.error_response().into_body().try_into_bytes();
            let sent: Value = body
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let sent = sent.as_object().cloned().unwrap_or_default();
            for key in sent.keys() {
                assert!(properties.contains_key(key), "{key} is not documented");
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap_or_default();
                assert!(sent.contains_key(required), "{required} is not sent");
            }
        }
        // Sent only with field errors, never as null.
        assert_eq!(properties["errors"]["type"], "array");
    }

    #[test]
    fn the_document_is_built_once() {
        assert_eq!(
            document_json(true).as_ptr(),
            document_json(true).as_ptr(),
            "each request would build the document again"
        );
        assert_ne!(document_json(true), document_json(false));
    }

    #[test]
    fn if_match_is_a_star_or_our_entity_tags() {
        let doc = doc();
        for method in ["patch", "delete"] {
            let parameters = doc["paths"]["/items/{id}"][method]["parameters"].clone();
            let if_match = parameters
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "If-Match")
                .cloned()
                .unwrap_or_default();
            let any_of = &if_match["schema"]["anyOf"];
            assert_eq!(any_of[0]["enum"], json!(["*"]), "{method}: {if_match}");
            let tags = any_of[1]["pattern"].as_str().unwrap_or_default();
            assert!(tags.starts_with(r#"^(W/)?"[0-9]+""#), "{method}: {tags}");
            assert_eq!(if_match["required"], false, "{method}");
        }
    }
}
