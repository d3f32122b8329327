//! Item handlers: extract, call one `ItemService` method, build the response.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{BufMut, Bytes, BytesMut};

use crate::http::AppState;
use crate::http::body::JsonBody;
use crate::http::errors::ApiError;
use crate::http::headers::{self, CACHE_STATUS, SERVER_TIMING, X_CACHE};
use crate::http::middleware::WriteAccess;
use crate::http::openapi;
use crate::items::model::{Item, ItemId, ItemJson, ItemPatch, NAME_MAX_CHARS, NewItem};
use crate::items::service::{Batch, CACHED_NAME_PAGE, Lookup, NamePage};

/// Most ids in one batch read.
pub const BATCH_MAX: usize = 100;
/// Largest page of a listing, and the default (the page a name lookup caches).
pub const LIST_MAX: i64 = 1000;
pub const LIST_DEFAULT: i64 = CACHED_NAME_PAGE;

type State = web::Data<AppState>;

/// Read an item
///
/// A cache-aside read: from Redis while it holds the item, else from Postgres (and then
/// cached); `X-Cache` and `Cache-Status` (RFC 9211) say which. A "not found" is cached too. While Postgres is down, a
/// cached item is still served (`STALE`). With `If-None-Match` naming the current `ETag`:
/// 304, no body.
#[utoipa::path(
    get,
    path = "/items/{id}",
    tag = "items",
    params(openapi::ItemPath, openapi::IfNoneMatch),
    responses(
        (status = 200, description = "The item", body = openapi::Item,
            headers(("ETag"), ("X-Cache"), ("Cache-Status"), ("Server-Timing"))),
        (status = 304, description = "Not modified: the item is at the version in `If-None-Match`",
            headers(("ETag"), ("X-Cache"), ("Cache-Status"))),
        openapi::GetItemProblems,
    ),
)]
pub async fn get_item(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = ItemId::parse(&path).ok_or(ApiError::InvalidId)?;
    let lookup = state.service.get(id).await?;
    state.hot_keys().record(id);
    match &lookup.value {
        None => {
            // Not an error of ours, but still a read: keep its cache headers.
            let mut error = actix_web::ResponseError::error_response(&ApiError::ItemNotFound);
            copy_read_headers(&lookup, &mut error);
            Ok(error)
        }
        Some(item) => {
            let etag = headers::etag(item.version);
            if headers::if_none_match(&req).is_some_and(|c| c.matches(item.version)) {
                return Ok(HttpResponse::NotModified()
                    .insert_header((header::ETAG, etag))
                    .insert_header((X_CACHE, headers::x_cache(lookup.status)))
                    .insert_header((CACHE_STATUS, cache_status(&lookup)))
                    .finish());
            }
            Ok(read_response(&lookup)
                .insert_header((header::ETAG, etag))
                .body(item.json.clone()))
        }
    }
}

/// Batch-read or list items
///
/// With `ids`: a batch read, cache-aside like `GET /items/{id}` (one Redis round trip for all
/// ids, at most one SQL query for the misses): the items found in request order, each once,
/// and the ids not found in `missing`. With `name`: the items with exactly that name, a page
/// at a time; the first page is cached and never shows an old membership after a write.
/// Without either: a page of items by id, from Postgres.
#[utoipa::path(
    get,
    path = "/items",
    tag = "items",
    params(openapi::ItemsQuery),
    responses(
        (status = 200, description = "A batch (with `ids`) or a page", body = openapi::ItemList,
            headers(
                ("X-Cache", description = "Batch reads and name lookups only. `BYPASS` if \
                    the cache was not used, else `MISS` if anything was read from Postgres, \
                    else `STALE` if any entry was served stale, else `HIT`."),
                ("Cache-Status", description = "Batch reads and name lookups only: \
                    `X-Cache`'s outcome in RFC 9211 terms."),
                ("Server-Timing", description = "Batch reads and name lookups only."),
            )),
        openapi::GetItemsProblems,
    ),
)]
pub async fn get_items(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    match ItemsQuery::parse(req.query_string())? {
        ItemsQuery::Batch(ids) => {
            let lookup = state.service.get_many(&ids).await?;
            state.hot_keys().record_all(&ids);
            Ok(read_response(&lookup).body(batch_body(&lookup.value)))
        }
        ItemsQuery::Page { after_id, limit } => {
            Ok(HttpResponse::Ok().json(state.service.list(after_id, limit).await?))
        }
        ItemsQuery::ByName {
            name,
            after_id,
            limit,
        } => {
            let lookup = state.service.find_by_name(&name, after_id, limit).await?;
            Ok(read_response(&lookup).body(name_page_body(&lookup.value)))
        }
    }
}

/// Create an item
///
/// Every field error is reported at once (422 `validation_failed`). Needs the bearer token
/// when the service has one.
#[utoipa::path(
    post,
    path = "/items",
    tag = "items",
    request_body(content = openapi::CreateItem, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = openapi::Item,
            headers(("Location"), ("ETag"))),
        openapi::CreateItemProblems,
    ),
)]
pub async fn create_item(
    _: WriteAccess,
    state: State,
    body: JsonBody,
) -> Result<HttpResponse, ApiError> {
    let new = NewItem::parse(&body.0).map_err(ApiError::Validation)?;
    let item = state.service.create(&new).await?;
    Ok(item_response(
        HttpResponse::Created().insert_header((header::LOCATION, format!("/items/{}", item.id))),
        &item,
    ))
}

/// Update an item
///
/// Changes the fields given (at least one); the version grows by one. With `If-Match`, only
/// while the item is at that version. Every later read sees the new state.
#[utoipa::path(
    patch,
    path = "/items/{id}",
    tag = "items",
    params(openapi::ItemPath, openapi::IfMatch),
    request_body(content = openapi::UpdateItem, content_type = "application/json"),
    responses(
        (status = 200, description = "The updated item", body = openapi::Item,
            headers(("ETag"))),
        openapi::UpdateItemProblems,
    ),
)]
pub async fn update_item(
    _: WriteAccess,
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: JsonBody,
) -> Result<HttpResponse, ApiError> {
    let id = ItemId::parse(&path).ok_or(ApiError::InvalidId)?;
    let patch = ItemPatch::parse(&body.0).map_err(ApiError::Validation)?;
    let item = state
        .service
        .update(id, &patch, headers::if_match(&req).as_deref())
        .await?;
    Ok(item_response(&mut HttpResponse::Ok(), &item))
}

/// Delete an item
///
/// With `If-Match`, only while the item is at that version. Every later read is a 404.
#[utoipa::path(
    delete,
    path = "/items/{id}",
    tag = "items",
    params(openapi::ItemPath, openapi::IfMatch),
    responses(
        (status = 204, description = "Deleted"),
        openapi::DeleteItemProblems,
    ),
)]
pub async fn delete_item(
    _: WriteAccess,
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = ItemId::parse(&path).ok_or(ApiError::InvalidId)?;
    state
        .service
        .delete(id, headers::if_match(&req).as_deref())
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Evict an item from the cache
///
/// Removes the cache entry only; the next read is a `MISS`. A write: needs the bearer token
/// when the service has one.
#[utoipa::path(
    delete,
    path = "/cache/items/{id}",
    tag = "cache",
    params(openapi::ItemPath),
    responses(
        (status = 204, description = "Evicted (or was not cached)"),
        openapi::EvictItemProblems,
    ),
)]
pub async fn evict_item(
    _: WriteAccess,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = ItemId::parse(&path).ok_or(ApiError::InvalidId)?;
    state.service.evict(id).await;
    Ok(HttpResponse::NoContent().finish())
}

fn read_response<T>(lookup: &Lookup<T>) -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Ok();
    response
        .content_type("application/json")
        .insert_header((X_CACHE, headers::x_cache(lookup.status)))
        .insert_header((CACHE_STATUS, cache_status(lookup)))
        .insert_header((SERVER_TIMING, headers::server_timing(&lookup.timing)));
    response
}

fn copy_read_headers<T>(lookup: &Lookup<T>, response: &mut HttpResponse) {
    let headers = response.headers_mut();
    headers.insert(X_CACHE, headers::x_cache(lookup.status));
    headers.insert(CACHE_STATUS, cache_status(lookup));
    headers.insert(SERVER_TIMING, headers::server_timing(&lookup.timing));
}

fn cache_status<T>(lookup: &Lookup<T>) -> HeaderValue {
    headers::cache_status(lookup.status, lookup.freshness)
}

fn item_response(response: &mut actix_web::HttpResponseBuilder, item: &Item) -> HttpResponse {
    let json = ItemJson::from_item(item);
    response
        .content_type("application/json")
        .insert_header((header::ETAG, headers::etag(json.version)))
        .body(json.json)
}

/// `{"items": [...], "missing": [...]}` from the cached bytes as they are.
fn batch_body(batch: &Batch) -> Bytes {
    let mut out = items_array(&batch.items, 32 + batch.missing.len() * 20);
    out.put_slice(b",\"missing\":[");
    for (n, id) in batch.missing.iter().enumerate() {
        if n > 0 {
            out.put_u8(b',');
        }
        out.put_slice(id.to_string().as_bytes());
    }
    out.put_slice(b"]}");
    out.freeze()
}

/// `{"items": [...], "next_after_id": n | null}` from the items' bytes as they are.
fn name_page_body(page: &NamePage) -> Bytes {
    let mut out = items_array(&page.items, 48);
    out.put_slice(b",\"next_after_id\":");
    match page.next_after_id {
        Some(id) => out.put_slice(id.to_string().as_bytes()),
        None => out.put_slice(b"null"),
    }
    out.put_u8(b'}');
    out.freeze()
}

/// `{"items":[...]` from each item's bytes, the body left open for what follows; `extra`
/// bytes of room for it.
fn items_array(items: &[ItemJson], extra: usize) -> BytesMut {
    let size = items.iter().map(|i| i.json.len() + 1).sum::<usize>() + 16 + extra;
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(b"{\"items\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.put_u8(b',');
        }
        out.put_slice(&item.json);
    }
    out.put_u8(b']');
    out
}

/// The three readings of `GET /items`.
#[derive(Debug, PartialEq, Eq)]
enum ItemsQuery {
    /// Distinct ids, in request order.
    Batch(Vec<ItemId>),
    Page {
        after_id: i64,
        limit: i64,
    },
    /// The items with exactly this name, a page at a time.
    ByName {
        name: String,
        after_id: i64,
        limit: i64,
    },
}

impl ItemsQuery {
    fn parse(query: &str) -> Result<ItemsQuery, ApiError> {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
            .map_err(|_| ApiError::InvalidQuery("the query string is not valid".into()))?
            .into_inner();
        let mut ids = None;
        let mut limit = None;
        let mut after_id = None;
        let mut by_name = None;
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "ids" => &mut ids,
                "limit" => &mut limit,
                "after_id" => &mut after_id,
                "name" => &mut by_name,
                other => {
                    return Err(ApiError::InvalidQuery(format!(
                        "unknown query parameter {:?}; expected ids, or name, limit and after_id",
                        truncate(other)
                    )));
                }
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::InvalidQuery(format!(
                    "{name} is given more than once"
                )));
            }
        }
        if ids.is_some() && by_name.is_some() {
            return Err(ApiError::InvalidQuery(
                "ids cannot be combined with name".into(),
            ));
        }
        if let Some(ids) = ids {
            return match (limit, after_id) {
                (None, None) => parse_ids(&ids).map(ItemsQuery::Batch),
                _ => Err(ApiError::InvalidQuery(
                    "ids cannot be combined with limit or after_id".into(),
                )),
            };
        }
        let limit = parse_bounded("limit", limit.as_deref(), LIST_DEFAULT, 1, LIST_MAX)?;
        let after_id = parse_bounded("after_id", after_id.as_deref(), 0, 0, i64::MAX)?;
        Ok(match by_name {
            None => ItemsQuery::Page { after_id, limit },
            Some(name) => ItemsQuery::ByName {
                name: parse_name(name)?,
                after_id,
                limit,
            },
        })
    }
}

fn parse_ids(raw: &str) -> Result<Vec<ItemId>, ApiError> {
    let mut ids: Vec<ItemId> = Vec::new();
    for part in raw.split(',') {
        if ids.len() >= BATCH_MAX {
            break;
        }
        let id = ItemId::parse(part.trim()).ok_or_else(|| {
            ApiError::InvalidIds(format!(
                "ids must be integers from 1 to 9223372036854775807, got {:?}",
                truncate(part)
            ))
        })?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let given = raw.split(',').count();
    if given > BATCH_MAX {
        return Err(ApiError::InvalidIds(format!(
            "at most {BATCH_MAX} ids, got {given}"
        )));
    }
    Ok(ids)
}

/// A name to look up: 1 to 200 characters, matched exactly (no pattern characters).
fn parse_name(name: String) -> Result<String, ApiError> {
    let chars = name.chars().count();
    if chars == 0 || chars > NAME_MAX_CHARS {
        return Err(ApiError::InvalidQuery(format!(
            "name must be 1 to {NAME_MAX_CHARS} characters, got {chars}"
        )));
    }
    Ok(name)
}

fn parse_bounded(
    name: &str,
    raw: Option<&str>,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::InvalidQuery(format!(
            "{name} must be an integer from {min} to {max}, got {:?}",
            truncate(raw)
        ))),
    }
}

/// Echo at most 40 characters of a client's input back in an error.
fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[i64]) -> Vec<ItemId> {
        raw.iter().filter_map(|&n| ItemId::new(n)).collect()
    }

    #[test]
    fn batch_ids_keep_order_and_drop_duplicates() {
        assert_eq!(
            ItemsQuery::parse("ids=3,1,3,2").ok(),
            Some(ItemsQuery::Batch(ids(&[3, 1, 2])))
        );
    }

    #[test]
    fn bad_queries_are_refused() {
        let cases = [
            ("ids=", "invalid_ids"),
            ("ids=1,,2", "invalid_ids"),
            ("ids=0", "invalid_ids"),
            ("ids=1&limit=5", "invalid_query"),
            ("limit=0", "invalid_query"),
            ("limit=1001", "invalid_query"),
            ("after_id=-1", "invalid_query"),
            ("limit=1&limit=2", "invalid_query"),
            ("colour=red", "invalid_query"),
            ("name=", "invalid_query"),
            ("name=a&ids=1", "invalid_query"),
            ("name=a&name=b", "invalid_query"),
            ("name=a&limit=0", "invalid_query"),
        ];
        for (query, code) in cases {
            let got = ItemsQuery::parse(query).err().map(|e| e.code());
            assert_eq!(got, Some(code), "{query}");
        }
        let hundred_and_one = (1..=101)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(ItemsQuery::parse(&format!("ids={hundred_and_one}")).is_err());
    }

    #[test]
    fn a_name_lookup_keeps_the_name_as_given() {
        assert_eq!(
            ItemsQuery::parse("name=50%25%20off_%27x%27&after_id=7").ok(),
            Some(ItemsQuery::ByName {
                name: "50% off_'x'".to_owned(),
                after_id: 7,
                limit: 50
            })
        );
        let long = "é".repeat(NAME_MAX_CHARS);
        assert!(ItemsQuery::parse(&format!("name={long}")).is_ok());
        assert!(ItemsQuery::parse(&format!("name={long}x")).is_err());
    }

    #[test]
    fn a_page_has_defaults() {
        assert_eq!(
            ItemsQuery::parse("").ok(),
            Some(ItemsQuery::Page {
                after_id: 0,
                limit: 50
            })
        );
    }
}
