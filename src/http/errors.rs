//! `ApiError`: every way a request fails, as an RFC 9457 problem document. The only place
//! that knows statuses and `code` strings. Causes are logged here, never sent.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::items::model::FieldError;
use crate::items::service::ServiceError;

/// Seconds a client should wait before retrying while Postgres is down.
pub const RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_id`: the path id is not an integer from 1 to 2^63 − 1.
    #[error("the item id must be an integer from 1 to 9223372036854775807")]
    InvalidId,
    /// 400 `invalid_ids`: `ids=` is not 1 to 100 valid ids.
    #[error("{0}")]
    InvalidIds(String),
    /// 400 `invalid_query`: an unknown, repeated or out-of-range query parameter.
    #[error("{0}")]
    InvalidQuery(String),
    /// 400 `malformed_json`: the body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    /// 401 `unauthorized`: a write without the right bearer token.
    #[error("this request needs an Authorization: Bearer token")]
    Unauthorized,
    /// 404 `item_not_found`.
    #[error("no item has this id")]
    ItemNotFound,
    /// 404 `not_found`: no route.
    #[error("no such resource")]
    RouteNotFound,
    /// 405 `method_not_allowed`; carries the `Allow` value.
    #[error("method not allowed here; allowed: {0}")]
    MethodNotAllowed(&'static str),
    /// 412 `version_conflict`: `If-Match` names a version the item is no longer at.
    #[error("the item has changed since the version in If-Match")]
    VersionConflict,
    /// 413 `payload_too_large`: a body over 64 KiB.
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415 `unsupported_media_type`: a body that is not `application/json`.
    #[error("the body must be sent as Content-Type: application/json")]
    UnsupportedMediaType,
    /// 422 `validation_failed`: the body parsed, but its fields are wrong.
    #[error("the item is not valid")]
    Validation(Vec<FieldError>),
    /// 503 `overloaded`, with `Retry-After`: shed because too much Postgres work waits.
    #[error("the service is overloaded; retry shortly")]
    Overloaded,
    /// 503 `database_unavailable`, with `Retry-After`; the cause is logged (at debug: an
    /// outage is logged where it starts and ends, in `items::repo`).
    #[error("the database is unavailable; retry shortly")]
    DatabaseUnavailable(#[source] Option<ServiceError>),
    /// 500 `internal_error`: a bug; the cause is logged, not sent.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidId => "invalid_id",
            ApiError::InvalidIds(_) => "invalid_ids",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::Unauthorized => "unauthorized",
            ApiError::ItemNotFound => "item_not_found",
            ApiError::RouteNotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::VersionConflict => "version_conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Validation(_) => "validation_failed",
            ApiError::DatabaseUnavailable(_) => "database_unavailable",
            ApiError::Overloaded => "overloaded",
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn title(&self) -> &'static str {
        match self {
            ApiError::InvalidId => "Invalid item id",
            ApiError::InvalidIds(_) => "Invalid ids",
            ApiError::InvalidQuery(_) => "Invalid query",
            ApiError::MalformedJson(_) => "Malformed JSON",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::ItemNotFound => "Item not found",
            ApiError::RouteNotFound => "Not found",
            ApiError::MethodNotAllowed(_) => "Method not allowed",
            ApiError::VersionConflict => "Version conflict",
            ApiError::PayloadTooLarge(_) => "Payload too large",
            ApiError::UnsupportedMediaType => "Unsupported media type",
            ApiError::Validation(_) => "Validation failed",
            ApiError::DatabaseUnavailable(_) => "Database unavailable",
            ApiError::Overloaded => "Overloaded",
            ApiError::Internal(_) => "Internal error",
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound => ApiError::ItemNotFound,
            ServiceError::VersionConflict => ApiError::VersionConflict,
            ServiceError::DatabaseUnavailable(_) => ApiError::DatabaseUnavailable(Some(e)),
            ServiceError::Overloaded => ApiError::Overloaded,
            ServiceError::Database(_) | ServiceError::Unanswered(_) => {
                ApiError::Internal(Box::new(e))
            }
        }
    }
}

/// The problem document (RFC 9457), plus `code` and, for 422, the field errors.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(
    description = "An RFC 9457 problem document: the body of every error.",
    example = json!({
        "type": "urn:itemcache:problem:item_not_found", "title": "Item not found",
        "status": 404, "detail": "no item has this id", "code": "item_not_found"
    })
)]
pub(crate) struct Problem<'a> {
    /// `urn:itemcache:problem:` and the code.
    #[serde(rename = "type")]
    #[schema(pattern = "^urn:itemcache:problem:[a-z][a-z0-9_]*$")]
    kind: String,
    title: &'a str,
    /// The response's status.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What went wrong, for a person.
    detail: String,
    /// Stable snake_case: what clients branch on.
    #[schema(pattern = "^[a-z][a-z0-9_]*$")]
    code: &'a str,
    /// `validation_failed` only: every field's problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    errors: Option<&'a [FieldError]>,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidId
            | ApiError::InvalidIds(_)
            | ApiError::InvalidQuery(_)
            | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ItemNotFound | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::VersionConflict => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::DatabaseUnavailable(_) | ApiError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    #[expect(
        clippy::expect_used,
        reason = "a problem document is strings and numbers: serializing it cannot fail"
    )]
    fn error_response(&self) -> HttpResponse {
        // The one place a failure is logged: where its response is made.
        match self {
            ApiError::Internal(_) => {
                tracing::error!(error = %crate::report::chain(self), "answering 500");
            }
            ApiError::DatabaseUnavailable(Some(_)) => {
                tracing::debug!(error = %crate::report::chain(self), "answering 503");
            }
            _ => {}
        }
        let status = self.status_code();
        let problem = Problem {
            kind: format!("urn:itemcache:problem:{}", self.code()),
            title: self.title(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: self.code(),
            errors: match self {
                ApiError::Validation(errors) => Some(errors),
                _ => None,
            },
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, PROBLEM_JSON));
        match self {
            ApiError::DatabaseUnavailable(_) | ApiError::Overloaded => {
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
            }
            ApiError::Unauthorized => {
                response
                    .insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            ApiError::MethodNotAllowed(allow) => {
                response.insert_header((header::ALLOW, *allow));
            }
            _ => {}
        }
        response.body(serde_json::to_vec(&problem).expect("a problem document serializes"))
    }
}

/// The app's `default_service`: no route matched.
pub async fn route_not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}

/// A resource's `default_service`: the path exists, the method does not.
pub fn method_not_allowed(allow: &'static str) -> actix_web::Route {
    actix_web::web::to(
        move || async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow)) },
    )
}
