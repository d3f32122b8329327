//! Conditional requests and the read headers: `ETag`, `If-None-Match`, `If-Match`,
//! `X-Cache` and `Server-Timing`.

use actix_web::HttpRequest;
use actix_web::http::header::{self, HeaderName, HeaderValue};

use crate::items::service::Timing;
use crate::metrics::CacheStatus;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

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
