//! Hostile requests, as a table: each gets its exact status and problem `code` (never a
//! 5xx), and none of them changes the stored data. Contract §2: wrong JSON types and
//! unknown fields are 422 `validation_failed` naming the field, JSON that does not parse is
//! 400 `malformed_json`, bad `limit`/`after_id` 400 `invalid_query`.

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TestApp, header, spawn_app};

/// One hostile request and the problem it must get.
struct Case {
    what: String,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    /// For a 422: the field one of the `errors` must name.
    field: Option<&'static str>,
}

impl Case {
    fn new(what: impl Into<String>, method: Method, path: impl Into<String>) -> Case {
        Case {
            what: what.into(),
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            status: 0,
            code: "",
            field: None,
        }
    }

    fn get(what: impl Into<String>, path: impl Into<String>) -> Case {
        Case::new(what, Method::GET, path)
    }

    fn delete(what: impl Into<String>, path: impl Into<String>) -> Case {
        Case::new(what, Method::DELETE, path)
    }

    /// `POST /items` with `body` sent as `application/json`.
    fn post(what: impl Into<String>, body: impl Into<Vec<u8>>) -> Case {
        Case::new(what, Method::POST, "/items")
            .header("content-type", "application/json")
            .body(body)
    }

    /// `PATCH /items/{id}` with `body` sent as `application/json`.
    fn patch(what: impl Into<String>, id: &str, body: impl Into<Vec<u8>>) -> Case {
        Case::new(what, Method::PATCH, format!("/items/{id}"))
            .header("content-type", "application/json")
            .body(body)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Case {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.into()));
        self
    }

    fn without_header(mut self, name: &'static str) -> Case {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Case {
        self.body = Some(body.into());
        self
    }

    fn expect(mut self, status: u16, code: &'static str) -> Case {
        self.status = status;
        self.code = code;
        self
    }

    /// 422 `validation_failed`, with a field error naming `field`.
    fn invalid_field(self, field: &'static str) -> Case {
        let mut case = self.expect(422, "validation_failed");
        case.field = Some(field);
        case
    }

    /// Sends the request; describes every way the answer differs from the expected one.
    async fn mismatches(&self, app: &TestApp) -> Vec<String> {
        let mut request = app.client.request(self.method.clone(), app.url(&self.path));
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        if let Some(body) = &self.body {
            request = request.body(body.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return vec![format!("no answer: {e}")],
        };
        let status = response.status().as_u16();
        let content_type = header(&response, "content-type");
        let text = response.text().await.unwrap_or_default();
        let problem: Value = serde_json::from_str(&text).unwrap_or(Value::Null);

        let mut wrong = Vec::new();
        if status >= 500 {
            wrong.push(format!("a {status}: the service failed on it"));
        }
        if status != self.status {
            wrong.push(format!("status {status}, expected {}", self.status));
        }
        if content_type != "application/problem+json" {
            wrong.push(format!("content type {content_type:?}"));
        }
        if problem["code"] != self.code {
            wrong.push(format!(
                "code {}, expected {:?}",
                problem["code"], self.code
            ));
        }
        if problem["status"] != status {
            wrong.push(format!("problem status {}", problem["status"]));
        }
        if let Some(field) = self.field {
            let named = problem["errors"]
                .as_array()
                .is_some_and(|errors| errors.iter().any(|e| e["field"] == field));
            if !named {
                wrong.push(format!("no field error names {field:?}"));
            }
        }
        if !wrong.is_empty() {
            let shown: String = text.chars().take(300).collect();
            wrong.push(format!("body: {shown}"));
        }
        wrong
    }
}

/// Everything stored, as the API lists it.
async fn stored_items(app: &TestApp) -> Value {
    let response = app.get("/items?limit=1000").await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn hostile_requests(existing: i64) -> Vec<Case> {
    let id = existing.to_string();
    let hundred_and_one = (1..=101)
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let long_id = "9".repeat(10_000);
    let nested = "[".repeat(10_000);
    let too_big = format!(
        "{{\"name\": \"big\", \"description\": \"{}\"}}",
        "a".repeat(65 * 1024)
    );
    let long_name = json!({"name": "n".repeat(201)}).to_string();
    let long_description = json!({"name": "ok", "description": "d".repeat(10_001)}).to_string();

    vec![
        // -- ids in the path
        Case::get("id 0", "/items/0").expect(400, "invalid_id"),
        Case::get("id -1", "/items/-1").expect(400, "invalid_id"),
        Case::get("id 2^63", "/items/9223372036854775808").expect(400, "invalid_id"),
        Case::get("id 2^63 - 1: valid, missing", "/items/9223372036854775807")
            .expect(404, "item_not_found"),
        Case::get("non-numeric id", "/items/abc").expect(400, "invalid_id"),
        Case::get("fractional id", "/items/1.0").expect(400, "invalid_id"),
        Case::get("id with a plus sign", "/items/+1").expect(400, "invalid_id"),
        Case::get("hex id", "/items/0x10").expect(400, "invalid_id"),
        Case::get("10,000-digit id", format!("/items/{long_id}")).expect(400, "invalid_id"),
        Case::get("id in spaces", "/items/%201%20").expect(400, "invalid_id"),
        Case::get("id with an encoded NUL", "/items/1%00").expect(400, "invalid_id"),
        Case::patch("PATCH id 0", "0", r#"{"name": "x"}"#).expect(400, "invalid_id"),
        Case::patch(
            "PATCH id 2^63 - 1",
            "9223372036854775807",
            r#"{"name": "x"}"#,
        )
        .expect(404, "item_not_found"),
        Case::delete("DELETE id -1", "/items/-1").expect(400, "invalid_id"),
        Case::delete("DELETE id 2^63 - 1", "/items/9223372036854775807")
            .expect(404, "item_not_found"),
        Case::delete("evict a non-numeric id", "/cache/items/abc").expect(400, "invalid_id"),
        // -- bodies that are not JSON
        Case::post("invalid JSON", "{name: 'Widget'}").expect(400, "malformed_json"),
        Case::post("truncated JSON", r#"{"name": "Widget", "price_cents": 1"#)
            .expect(400, "malformed_json"),
        Case::post("empty body", "").expect(400, "malformed_json"),
        Case::post("trailing garbage", r#"{"name": "Widget"} x"#).expect(400, "malformed_json"),
        Case::post("invalid UTF-8", b"{\"name\": \"\xff\xfe\"}".to_vec())
            .expect(400, "malformed_json"),
        Case::post("lone surrogate", r#"{"name": "\ud800"}"#).expect(400, "malformed_json"),
        Case::post("10,000 nested arrays", nested.clone()).expect(400, "malformed_json"),
        Case::patch("PATCH 10,000 nested arrays", &id, nested).expect(400, "malformed_json"),
        Case::patch("PATCH invalid JSON", &id, "{").expect(400, "malformed_json"),
        // -- JSON of the wrong shape or types
        Case::post("an array", "[]").expect(422, "validation_failed"),
        Case::post("a string", r#""Widget""#).expect(422, "validation_failed"),
        Case::post("null", "null").expect(422, "validation_failed"),
        Case::post("a number", "42").expect(422, "validation_failed"),
        Case::post("name is a number", r#"{"name": 5}"#).invalid_field("name"),
        Case::post("name is an object", r#"{"name": {"en": "x"}}"#).invalid_field("name"),
        Case::post("name is missing", r#"{"price_cents": 5}"#).invalid_field("name"),
        Case::post(
            "price_cents is a string",
            r#"{"name": "x", "price_cents": "5"}"#,
        )
        .invalid_field("price_cents"),
        Case::post("price_cents is 1.5", r#"{"name": "x", "price_cents": 1.5}"#)
            .invalid_field("price_cents"),
        Case::post(
            "price_cents is a boolean",
            r#"{"name": "x", "price_cents": true}"#,
        )
        .invalid_field("price_cents"),
        Case::post(
            "description is null",
            r#"{"name": "x", "description": null}"#,
        )
        .invalid_field("description"),
        Case::post("blank name", r#"{"name": "   "}"#).invalid_field("name"),
        Case::post("empty name", r#"{"name": ""}"#).invalid_field("name"),
        Case::post("name of tabs and newlines", r#"{"name": "\t\n\r"}"#).invalid_field("name"),
        Case::post("201-character name", long_name).invalid_field("name"),
        Case::post("10,001-character description", long_description).invalid_field("description"),
        Case::post("negative price", r#"{"name": "x", "price_cents": -1}"#)
            .invalid_field("price_cents"),
        Case::post("price 1e30", r#"{"name": "x", "price_cents": 1e30}"#)
            .invalid_field("price_cents"),
        Case::post(
            "price 2^63",
            r#"{"name": "x", "price_cents": 9223372036854775808}"#,
        )
        .invalid_field("price_cents"),
        Case::post("unknown field", r#"{"name": "x", "colour": "red"}"#).invalid_field("colour"),
        Case::post("setting the id", r#"{"name": "x", "id": 1}"#).invalid_field("id"),
        // Postgres cannot store a NUL in text: the API must refuse it, not fail on it.
        Case::post("name with a NUL", r#"{"name": "a\u0000b"}"#).invalid_field("name"),
        Case::post(
            "description with a NUL",
            r#"{"name": "x", "description": "\u0000"}"#,
        )
        .invalid_field("description"),
        // -- PATCH bodies
        Case::patch("PATCH {}", &id, "{}").expect(422, "validation_failed"),
        Case::patch("PATCH blank name", &id, r#"{"name": " "}"#).invalid_field("name"),
        Case::patch("PATCH null name", &id, r#"{"name": null}"#).invalid_field("name"),
        Case::patch("PATCH negative price", &id, r#"{"price_cents": -5}"#)
            .invalid_field("price_cents"),
        Case::patch("PATCH the version", &id, r#"{"version": 99}"#).invalid_field("version"),
        Case::patch("PATCH name with a NUL", &id, r#"{"name": "\u0000"}"#).invalid_field("name"),
        // -- size and media type
        Case::post("65 KiB body", too_big).expect(413, "payload_too_large"),
        Case::post(
            "64 KiB and one byte",
            format!("{}{}", r#"{"name": "x"}"#, " ".repeat(64 * 1024 - 12)),
        )
        .expect(413, "payload_too_large"),
        Case::post("text/plain", r#"{"name": "x"}"#)
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        Case::post("form-encoded", "name=x")
            .header("content-type", "application/x-www-form-urlencoded")
            .expect(415, "unsupported_media_type"),
        Case::post("no content type", r#"{"name": "x"}"#)
            .without_header("content-type")
            .expect(415, "unsupported_media_type"),
        Case::patch("PATCH as text/plain", &id, r#"{"name": "x"}"#)
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        // -- conditions
        Case::patch("PATCH If-Match garbage", &id, r#"{"name": "x"}"#)
            .header("if-match", "garbage")
            .expect(412, "version_conflict"),
        Case::patch("PATCH If-Match a stale version", &id, r#"{"name": "x"}"#)
            .header("if-match", "\"999\"")
            .expect(412, "version_conflict"),
        Case::delete("DELETE If-Match garbage", format!("/items/{id}"))
            .header("if-match", "W/garbage")
            .expect(412, "version_conflict"),
        // -- query strings
        Case::get("101 ids", format!("/items?ids={hundred_and_one}")).expect(400, "invalid_ids"),
        Case::get("empty id in ids", "/items?ids=1,,2").expect(400, "invalid_ids"),
        Case::get("non-numeric ids", "/items?ids=abc").expect(400, "invalid_ids"),
        Case::get("no ids", "/items?ids=").expect(400, "invalid_ids"),
        Case::get("id 0 in ids", "/items?ids=1,0").expect(400, "invalid_ids"),
        Case::get("id 2^63 in ids", "/items?ids=9223372036854775808").expect(400, "invalid_ids"),
        Case::get("10,000-digit id in ids", format!("/items?ids={long_id}"))
            .expect(400, "invalid_ids"),
        Case::get("limit=0", "/items?limit=0").expect(400, "invalid_query"),
        Case::get("limit=1001", "/items?limit=1001").expect(400, "invalid_query"),
        Case::get("limit=abc", "/items?limit=abc").expect(400, "invalid_query"),
        Case::get("limit=1e3", "/items?limit=1e3").expect(400, "invalid_query"),
        Case::get("after_id=-1", "/items?after_id=-1").expect(400, "invalid_query"),
        Case::get("after_id=abc", "/items?after_id=abc").expect(400, "invalid_query"),
        Case::get("unknown query parameter", "/items?colour=red").expect(400, "invalid_query"),
        Case::get("limit twice", "/items?limit=1&limit=2").expect(400, "invalid_query"),
        Case::get("ids with a limit", "/items?ids=1&limit=5").expect(400, "invalid_query"),
    ]
}

#[tokio::test]
async fn hostile_requests_get_their_exact_problem_and_change_nothing() {
    let app = spawn_app().await;
    let ids = app.insert_items(3).await;
    let target = ids[0];
    // Cached too, so a hostile write that slipped through would show in reads as well.
    let cached: Value = app.get_item(target).await.json().await.unwrap();
    let before = stored_items(&app).await;

    let cases = hostile_requests(target);
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let wrong = case.mismatches(&app).await;
        if !wrong.is_empty() {
            failures.push(format!(
                "{} ({} {:.80}):\n    {}",
                case.what,
                case.method,
                case.path,
                wrong.join("\n    ")
            ));
        }
    }
    // Checked before the verdict on the cases, so that one report shows both.
    let after = stored_items(&app).await;
    if after != before {
        failures.push(format!(
            "the stored items changed:\n    {before}\n -> {after}"
        ));
    }
    if ids_of(&after) != ids {
        failures.push(format!(
            "the stored ids are {:?}, not {ids:?}",
            ids_of(&after)
        ));
    }
    let read = app.get_item(target).await;
    let read: Value = read.json().await.unwrap_or(Value::Null);
    if read != cached {
        failures.push(format!("item {target} reads {read}, was {cached}"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile requests were answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn ids_of(listing: &Value) -> Vec<i64> {
    listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn an_oversized_body_without_a_content_length_is_a_413() {
    let app = spawn_app().await;
    let before = stored_items(&app).await;
    // Chunked: the size is only known while reading, past the 64 KiB limit.
    let chunk = "a".repeat(8 * 1024);
    let mut request = format!(
        "POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{{\"name\": \"x\", \"description\": \"\r\n",
        r#"{"name": "x", "description": ""#.len()
    );
    for _ in 0..9 {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("2\r\n\"}\r\n0\r\n\r\n");

    let mut stream = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);

    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:.300}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer:.300}"
    );
    assert_eq!(stored_items(&app).await, before);
}
