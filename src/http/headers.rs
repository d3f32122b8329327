//! Conditional requests and the read headers: `ETag`, `If-None-Match`, `If-Match`,
//! `X-Cache`, `Cache-Status` and `Server-Timing`.

use actix_web::HttpRequest;
use actix_web::http::header::{self, HeaderName, HeaderValue};

use crate::items::service::{Freshness, Refresh, Timing};
use crate::metrics::CacheStatus;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// An item's entity tag: its version, which grows on every change.
#[expect(
    clippy::expect_used,
    reason = "quotes around an integer's digits are always a valid header value"
)]
pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("a quoted integer is a header value")
}

pub fn x_cache(status: CacheStatus) -> HeaderValue {
    HeaderValue::from_static(status.header_value())
}

/// `Cache-Status` (RFC 9211): one list member, `itemcache`, saying how this cache handled
/// the read. Our four outcomes in the RFC's terms:
/// - `HIT`: `hit`, answered from the cache without going forward (a background refresh is
///   not this request's forward). With `ttl`, the entry's remaining freshness in whole
///   seconds, rounded down: negative for an entry served past freshness while it is
///   revalidated, which the RFC calls a stale hit; and `detail=early-refresh` or
///   `detail=stale-while-revalidate` when the hit started a background refresh; otherwise
///   `detail=near` when the near cache answered (not Redis).
/// - `MISS`: `fwd=miss; stored`, went forward to Postgres, and the answer was cached. `miss`
///   rather than `uri-miss` or `stale`: the lookup does not say whether an expired entry
///   was there.
/// - `STALE`: `fwd=stale; fwd-status=503`, went forward because the entry was past
///   freshness, Postgres could not answer (what we would have answered is a 503), and the
///   stale entry was served. Without `fwd-status` the RFC reads the forward as having
///   answered with the response's own status, 200, which it did not.
/// - `BYPASS`: `fwd=bypass`, the cache was not used for this read (disabled, unavailable,
///   an invalidation still pending, or a page not cached).
///
/// The service reports `freshness` for single-item hits; other reads carry neither `ttl`
/// nor `detail`.
#[expect(
    clippy::expect_used,
    reason = "the value is ASCII letters, digits and punctuation, always a valid header value"
)]
pub fn cache_status(status: CacheStatus, freshness: Freshness) -> HeaderValue {
    let base = match status {
        CacheStatus::Hit => "itemcache; hit",
        CacheStatus::Miss => "itemcache; fwd=miss; stored",
        CacheStatus::Stale => "itemcache; fwd=stale; fwd-status=503",
        CacheStatus::Bypass => "itemcache; fwd=bypass",
    };
    if status != CacheStatus::Hit || freshness == Freshness::default() {
        return HeaderValue::from_static(base);
    }
    let mut value = base.to_owned();
    if let Some(ms) = freshness.ttl_ms {
        // Whole seconds, rounded down; an entry at or past its expiry is stale, negative
        // even in its first millisecond (0 ms left would round to a fresh-looking 0).
        let seconds = if ms <= 0 {
            ms.div_euclid(1000).min(-1)
        } else {
            ms.div_euclid(1000)
        };
        value.push_str(&format!("; ttl={seconds}"));
    }
    match freshness.refresh {
        Some(Refresh::RefreshEarly) => value.push_str("; detail=early-refresh"),
        Some(Refresh::Revalidate) => value.push_str("; detail=stale-while-revalidate"),
        Some(Refresh::Fresh | Refresh::Expired) | None if freshness.near => {
            value.push_str("; detail=near")
        }
        Some(Refresh::Fresh | Refresh::Expired) | None => {}
    }
    HeaderValue::from_str(&value).expect("Cache-Status is a header value")
}

/// `cache;dur=0.120, db;dur=1.800` in milliseconds (W3C Server Timing).
#[expect(
    clippy::expect_used,
    reason = "the value is ASCII letters, digits and punctuation, always a valid header value"
)]
pub fn server_timing(timing: &Timing) -> HeaderValue {
    let cache = timing.cache.as_secs_f64() * 1000.0;
    let value = match timing.db {
        Some(db) => format!(
            "cache;dur={cache:.3}, db;dur={:.3}",
            db.as_secs_f64() * 1000.0
        ),
        None => format!("cache;dur={cache:.3}"),
    };
    HeaderValue::from_str(&value).expect("Server-Timing is a header value")
}

/// The entity tags of a conditional header: `*`, or a list of (possibly weak) tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Any,
    /// The versions named; tags that are not one of ours match nothing.
    Versions(Vec<i64>),
}

impl Condition {
    fn parse(raw: &str) -> Condition {
        if raw.trim() == "*" {
            return Condition::Any;
        }
        Condition::Versions(
            raw.split(',')
                .filter_map(|tag| {
                    let tag = tag.trim();
                    let tag = tag.strip_prefix("W/").unwrap_or(tag);
                    tag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
                })
                .collect(),
        )
    }

    fn of(req: &HttpRequest, name: header::HeaderName) -> Option<Condition> {
        let values: Vec<&str> = req
            .headers()
            .get_all(name)
            .map(|v| v.to_str().unwrap_or(""))
            .collect();
        (!values.is_empty()).then(|| Condition::parse(&values.join(",")))
    }

    pub fn matches(&self, version: i64) -> bool {
        match self {
            Condition::Any => true,
            Condition::Versions(versions) => versions.contains(&version),
        }
    }
}

/// `If-None-Match`, for a 304 on reads.
pub fn if_none_match(req: &HttpRequest) -> Option<Condition> {
    Condition::of(req, header::IF_NONE_MATCH)
}

/// `If-Match` on writes, as the versions the write may apply to (`None`: unconditional).
/// A tag that is not one of ours becomes an empty list, which no version matches: 412.
pub fn if_match(req: &HttpRequest) -> Option<Vec<i64>> {
    match Condition::of(req, header::IF_MATCH)? {
        Condition::Any => None,
        Condition::Versions(versions) => Some(versions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_status_names_each_outcome_in_rfc_9211_terms() {
        let value = |status, ttl_ms, refresh| {
            let freshness = Freshness {
                ttl_ms,
                refresh,
                near: false,
            };
            cache_status(status, freshness)
                .to_str()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert_eq!(value(CacheStatus::Hit, None, None), "itemcache; hit");
        assert_eq!(
            value(CacheStatus::Hit, Some(123_900), Some(Refresh::Fresh)),
            "itemcache; hit; ttl=123"
        );
        assert_eq!(
            value(CacheStatus::Hit, Some(900), Some(Refresh::RefreshEarly)),
            "itemcache; hit; ttl=0; detail=early-refresh"
        );
        // At its expiry to the millisecond: stale already.
        assert_eq!(
            value(CacheStatus::Hit, Some(0), Some(Refresh::Revalidate)),
            "itemcache; hit; ttl=-1; detail=stale-while-revalidate"
        );
        // Past freshness by half a second: stale, so below zero.
        assert_eq!(
            value(CacheStatus::Hit, Some(-500), Some(Refresh::Revalidate)),
            "itemcache; hit; ttl=-1; detail=stale-while-revalidate"
        );
        assert_eq!(
            value(CacheStatus::Miss, None, None),
            "itemcache; fwd=miss; stored"
        );
        assert_eq!(
            value(CacheStatus::Stale, None, None),
            "itemcache; fwd=stale; fwd-status=503"
        );
        assert_eq!(
            value(CacheStatus::Bypass, Some(5_000), None),
            "itemcache; fwd=bypass"
        );
    }

    #[test]
    fn conditions_parse_strong_weak_lists_and_star() {
        assert_eq!(Condition::parse("*"), Condition::Any);
        assert_eq!(Condition::parse("\"3\""), Condition::Versions(vec![3]));
        assert_eq!(
            Condition::parse("W/\"3\", \"4\""),
            Condition::Versions(vec![3, 4])
        );
        assert_eq!(Condition::parse("garbage"), Condition::Versions(vec![]));
    }
}
