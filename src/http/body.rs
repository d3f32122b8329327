//! `JsonBody`: a request body read as a JSON value, with our own errors for each way that
//! fails (actix's `Json` extractor answers some of them in its own plain format).
//! The order of checks is the order a client should fix things in: media type (415), size
//! (413), syntax (400). What the fields mean is `items::model`'s job (422).

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest};
use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::Value;

use crate::http::errors::ApiError;

/// The largest body we read: 64 KiB, the contract's limit (an item is at most ~41 KiB of
/// UTF-8: a 10,000-character description of 4-byte characters).
pub const BODY_LIMIT: usize = 64 * 1024;

pub struct JsonBody(pub Value);

impl FromRequest for JsonBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let media_ok = is_json(req);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            if !media_ok {
                return Err(ApiError::UnsupportedMediaType);
            }
            if declared.is_some_and(|len| len > BODY_LIMIT) {
                return Err(ApiError::PayloadTooLarge(BODY_LIMIT));
            }
            let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(BODY_LIMIT));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| ApiError::MalformedJson(e.to_string()))?;
                if body.len() + chunk.len() > BODY_LIMIT {
                    return Err(ApiError::PayloadTooLarge(BODY_LIMIT));
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice(&body)
                .map(JsonBody)
                .map_err(|e| ApiError::MalformedJson(e.to_string()))
        })
    }
}

/// `application/json`, or any `application/*+json`, with or without parameters.
fn is_json(req: &HttpRequest) -> bool {
    let Some(value) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}
