//! The item and the values that make one: valid by construction.
//!
//! Request bodies arrive as a JSON object and become a [`NewItem`] or [`ItemPatch`] in one
//! call that collects *every* field error, so a client fixes its request in one round.
//! Past this module no name is blank and no price is negative.

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::schema::items;

/// An item's id: an integer from 1 to 2^63 − 1 (a Postgres `bigint` identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(i64);

impl ItemId {
    /// Parses a path or query segment: digits only (no sign, no spaces), 1 ..= i64::MAX.
    pub fn parse(raw: &str) -> Option<ItemId> {
        if raw.is_empty() || raw.len() > 19 || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        raw.parse::<i64>().ok().filter(|&n| n >= 1).map(ItemId)
    }

    pub fn new(raw: i64) -> Option<ItemId> {
        (raw >= 1).then_some(ItemId(raw))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An item as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize, utoipa::ToSchema)]
#[diesel(table_name = items, check_for_backend(diesel::pg::Pg))]
#[schema(
    description = "An item, as every read and write returns it.",
    example = json!({
        "id": 42, "name": "Widget", "description": "A widget.", "price_cents": 1999,
        "version": 3, "created_at": "2026-11-24T10:00:00.123456Z",
        "updated_at": "2026-11-24T10:05:00.654321Z"
    })
)]
pub struct Item {
    #[schema(minimum = 1)]
    pub id: i64,
    /// Not blank.
    #[schema(min_length = 1)]
    pub name: String,
    pub description: String,
    #[schema(minimum = 0)]
    pub price_cents: i64,
    /// 1 when created, one more on each update. The `ETag` is this number in quotes.
    #[schema(minimum = 1)]
    pub version: i64,
    /// UTC, microseconds.
    #[serde(serialize_with = "rfc3339_micros")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_micros")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

/// Timestamps as the contract shows them: UTC, microseconds, `Z`.
fn rfc3339_micros<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&at.format("%Y-%m-%dT%H:%M:%S%.6fZ"))
}

/// An item serialized once: the same bytes go to Redis and to clients, and a cache hit
/// answers with them as they are (no JSON decoding on the hot path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemJson {
    pub version: i64,
    pub json: Bytes,
}

impl ItemJson {
    #[expect(
        clippy::expect_used,
        reason = "serializing a struct of strings, integers and timestamps into memory cannot fail"
    )]
    pub fn from_item(item: &Item) -> ItemJson {
        let json = serde_json::to_vec(item).expect("an item serializes");
        ItemJson {
            version: item.version,
            json: Bytes::from(json),
        }
    }
}

/// One field's problem, listed in a 422 `validation_failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's name; "" for the body as a whole.
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

pub type FieldErrors = Vec<FieldError>;

pub const NAME_MAX_CHARS: usize = 200;
pub const DESCRIPTION_MAX_CHARS: usize = 10_000;

/// A name of 1 to 200 characters that is not all whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemName(String);

impl ItemName {
    pub fn parse(raw: String) -> Result<ItemName, String> {
        let chars = raw.chars().count();
        if raw.trim().is_empty() {
            Err("must not be blank".into())
        } else if chars > NAME_MAX_CHARS {
            Err(format!(
                "must be at most {NAME_MAX_CHARS} characters, got {chars}"
            ))
        } else {
            Ok(ItemName(raw))
        }
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A new item, ready to insert.
#[derive(Debug, Clone, PartialEq, Eq, Insertable)]
#[diesel(table_name = items)]
pub struct NewItem {
    pub name: String,
    pub description: String,
    pub price_cents: i64,
}

/// The fields a PATCH changes; at least one is set.
#[derive(Debug, Clone, PartialEq, Eq, Default, AsChangeset)]
#[diesel(table_name = items)]
pub struct ItemPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
}

const FIELDS: [&str; 3] = ["name", "description", "price_cents"];

impl NewItem {
    /// `POST /items` body: `name` required, `description` and `price_cents` optional.
    pub fn parse(body: &Value) -> Result<NewItem, FieldErrors> {
        let fields = Fields::of(body)?;
        let mut errors = fields.unknown();
        let name = fields.name(&mut errors, Presence::Required);
        let description = fields.description(&mut errors);
        let price_cents = fields.price(&mut errors);
        match (errors.is_empty(), name) {
            (true, Some(name)) => Ok(NewItem {
                name: name.into_inner(),
                description: description.unwrap_or_default(),
                price_cents: price_cents.unwrap_or(0),
            }),
            _ => Err(errors),
        }
    }
}

impl ItemPatch {
    /// `PATCH /items/{id}` body: any of the three fields, at least one.
    pub fn parse(body: &Value) -> Result<ItemPatch, FieldErrors> {
        let fields = Fields::of(body)?;
        let mut errors = fields.unknown();
        let patch = ItemPatch {
            name: fields
                .name(&mut errors, Presence::Optional)
                .map(ItemName::into_inner),
            description: fields.description(&mut errors),
            price_cents: fields.price(&mut errors),
        };
        if errors.is_empty() && patch == ItemPatch::default() {
            errors.push(FieldError::new(
                "",
                "must set at least one of name, description, price_cents",
            ));
        }
        if errors.is_empty() {
            Ok(patch)
        } else {
            Err(errors)
        }
    }
}

#[derive(PartialEq)]
enum Presence {
    Required,
    Optional,
}

/// A request body's object, read field by field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn of(body: &'a Value) -> Result<Fields<'a>, FieldErrors> {
        match body {
            Value::Object(map) => Ok(Fields(map)),
            _ => Err(vec![FieldError::new("", "must be a JSON object")]),
        }
    }

    fn unknown(&self) -> FieldErrors {
        self.0
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()))
            .map(|k| FieldError::new(k, "unknown field"))
            .collect()
    }

    fn string(&self, errors: &mut FieldErrors, field: &str) -> Option<String> {
        match self.0.get(field)? {
            // Postgres text cannot hold U+0000: let through, it would fail the INSERT (a 500).
            Value::String(s) if s.contains('\0') => {
                errors.push(FieldError::new(field, "must not contain U+0000 (NUL)"));
                None
            }
            Value::String(s) => Some(s.clone()),
            other => {
                errors.push(FieldError::new(
                    field,
                    format!("must be a string, got {}", kind(other)),
                ));
                None
            }
        }
    }

    fn name(&self, errors: &mut FieldErrors, presence: Presence) -> Option<ItemName> {
        if presence == Presence::Required && !self.0.contains_key("name") {
            errors.push(FieldError::new("name", "is required"));
            return None;
        }
        let raw = self.string(errors, "name")?;
        ItemName::parse(raw)
            .map_err(|message| errors.push(FieldError::new("name", message)))
            .ok()
    }

    fn description(&self, errors: &mut FieldErrors) -> Option<String> {
        let raw = self.string(errors, "description")?;
        let chars = raw.chars().count();
        if chars > DESCRIPTION_MAX_CHARS {
            errors.push(FieldError::new(
                "description",
                format!("must be at most {DESCRIPTION_MAX_CHARS} characters, got {chars}"),
            ));
            return None;
        }
        Some(raw)
    }

    fn price(&self, errors: &mut FieldErrors) -> Option<i64> {
        let value = self.0.get("price_cents")?;
        match value.as_i64() {
            Some(p) if p >= 0 => Some(p),
            _ => {
                let message = match value {
                    Value::Number(_) => {
                        format!("must be an integer from 0 to {}, got {value}", i64::MAX)
                    }
                    other => format!("must be an integer, got {}", kind(other)),
                };
                errors.push(FieldError::new("price_cents", message));
                None
            }
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_positive_63_bit_integers_in_plain_digits() {
        assert_eq!(ItemId::parse("1").map(ItemId::get), Some(1));
        assert_eq!(
            ItemId::parse("9223372036854775807").map(ItemId::get),
            Some(i64::MAX)
        );
        for bad in [
            "0",
            "-1",
            "9223372036854775808",
            "+1",
            " 1",
            "1.0",
            "abc",
            "",
            "01x",
        ] {
            assert_eq!(ItemId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_new_item_collects_every_field_error() {
        let errors = NewItem::parse(&json!({"name": " ", "price_cents": -1, "colour": "red"}))
            .err()
            .unwrap_or_default();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["colour", "name", "price_cents"]);
    }

    #[test]
    fn nul_characters_are_refused_as_postgres_cannot_store_them() {
        let errors = NewItem::parse(&json!({"name": "a\0", "description": "\0"}))
            .err()
            .unwrap_or_default();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "description"]);
    }

    #[test]
    fn a_new_item_takes_defaults() {
        let item = NewItem::parse(&json!({"name": "Widget"}));
        assert_eq!(
            item,
            Ok(NewItem {
                name: "Widget".into(),
                description: String::new(),
                price_cents: 0
            })
        );
    }

    #[test]
    fn names_count_characters_not_bytes() {
        assert!(ItemName::parse("é".repeat(200)).is_ok());
        assert!(ItemName::parse("é".repeat(201)).is_err());
    }

    #[test]
    fn an_empty_patch_is_refused() {
        assert!(ItemPatch::parse(&json!({})).is_err());
        assert!(ItemPatch::parse(&json!({"price_cents": 5})).is_ok());
        assert!(ItemPatch::parse(&json!({"description": null})).is_err());
    }

    #[test]
    fn timestamps_serialize_with_microseconds_and_z() {
        let at = DateTime::from_timestamp(1_764_000_000, 123_456_000).unwrap_or_default();
        let item = Item {
            id: 1,
            name: "n".into(),
            description: String::new(),
            price_cents: 0,
            version: 1,
            created_at: at,
            updated_at: at,
        };
        let json = String::from_utf8(ItemJson::from_item(&item).json.to_vec()).unwrap_or_default();
        assert!(
            json.contains("\"created_at\":\"2025-11-24T16:00:00.123456Z\""),
            "{json}"
        );
    }
}
