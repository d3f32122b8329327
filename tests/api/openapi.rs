//! `/openapi.json` and `/docs`: the document is OpenAPI 3.1, it lists exactly the operations
//! the app serves (the route table's, and the live app answers each and only those), and
//! Swagger UI is served by the binary itself with no asset from another host. The limits
//! and header syntax it documents are the ones the service enforces.
//!
//! Whether the document is *valid* OpenAPI, and whether responses match it, is checked by
//! tests/conformance/run (openapi-spec-validator and schemathesis against a live instance).

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Spawn, TestApp, assert_problem, header, spawn_app};

async fn document(app: &TestApp) -> Value {
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "application/json");
    response.json().await.expect("the document is JSON")
}

/// Every (METHOD, path) in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item");
            item.keys()
                .filter(|key| !matches!(key.as_str(), "parameters" | "summary" | "description"))
                .map(|method| (method.to_uppercase(), path.clone()))
        })
        .collect()
}

/// A concrete path for a pattern: `{id}` becomes 1.
fn concrete(pattern: &str) -> String {
    pattern.replace("{id}", "1")
}

#[tokio::test]
async fn the_document_is_openapi_3_1() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3.1"), "openapi: {version}");
    assert_eq!(doc["info"]["title"], "itemcache");
}

#[tokio::test]
async fn the_document_lists_exactly_the_operations_of_the_route_table() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let table: BTreeSet<(String, String)> = itemcache::http::OPERATIONS
        .iter()
        .map(|(method, pattern)| ((*method).to_owned(), (*pattern).to_owned()))
        .collect();
    assert_eq!(documented(&doc), table);
    // The contract's surface, so the table itself cannot quietly lose a route.
    for operation in [
        ("GET", "/items/{id}"),
        ("GET", "/items"),
        ("POST", "/items"),
        ("PATCH", "/items/{id}"),
        ("DELETE", "/items/{id}"),
        ("DELETE", "/cache/items/{id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ] {
        let operation = (operation.0.to_owned(), operation.1.to_owned());
        assert!(table.contains(&operation), "{operation:?} is not served");
    }
}

#[tokio::test]
async fn the_app_serves_every_documented_operation_and_no_other_method() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let documented = documented(&doc);
    let paths: BTreeSet<&String> = documented.iter().map(|(_, path)| path).collect();
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ];
    for path in paths {
        let mut allowed: BTreeSet<String> = documented
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(method, _)| method.clone())
            .collect();
        // HEAD is served wherever GET is (RFC 9110 §9.1), without being documented.
        if allowed.contains("GET") {
            allowed.insert("HEAD".to_owned());
        }
        for method in &methods {
            let response = app.request(method.clone(), &concrete(path)).await;
            let status = response.status().as_u16();
            let what = format!("{method} {path}: {status}");
            if allowed.contains(method.as_str()) {
                // Served: whatever the answer, it is not "no such route" or "wrong method".
                assert_ne!(status, 405, "{what}");
                // (A HEAD answer has no body to tell which 404 it is.)
                if status == 404 && *method != Method::HEAD {
                    let problem: Value = response.json().await.expect("a problem");
                    assert_ne!(problem["code"], "not_found", "{what}: {problem}");
                }
            } else {
                assert_eq!(status, 405, "{what}");
                let allow: BTreeSet<String> = header(&response, "allow")
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .collect();
                assert_eq!(allow, allowed, "{what}: Allow");
            }
        }
    }
}

#[tokio::test]
async fn docs_is_swagger_ui_with_every_asset_served_here() {
    let app = spawn_app().await;
    let response = app.get("/docs").await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/html"));
    let html = response.text().await.expect("html");
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "a URL to another host in /docs: {html}"
    );
    let assets = referenced(&html);
    assert!(assets.len() >= 4, "{assets:?}");
    for asset in &assets {
        assert!(
            asset.starts_with("/docs/") && !asset.starts_with("//"),
            "{asset} is not one of ours"
        );
        let response = app.get(asset).await;
        assert_eq!(response.status(), 200, "{asset}");
        let bytes = response.bytes().await.expect("asset");
        assert!(!bytes.is_empty(), "{asset} is empty");
    }
    // The initializer points the UI at our document, and at no validator elsewhere.
    let init = app.get("/docs/swagger-initializer.js").await;
    let init = init.text().await.expect("initializer");
    assert!(init.contains("\"/openapi.json\""), "{init}");
    assert!(
        !init.contains("http://") && !init.contains("https://"),
        "{init}"
    );
    // A file Swagger UI does not have is a problem document like any other 404.
    let missing = app.get("/docs/no-such-file.js").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(header(&missing, "content-type"), "application/problem+json");
}

/// The `src` and `href` values of a page.
fn referenced(html: &str) -> Vec<String> {
    ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| html.split(attr).skip(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn swagger_ui_files_count_as_docs_in_the_metrics() {
    let app = spawn_app().await;
    for path in ["/docs", "/docs/swagger-ui.css", "/openapi.json"] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    let count = |route: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("itemcache_http_requests_total{"))
            .filter(|l| l.contains(&format!("route=\"{route}\"")) && l.contains("status=\"200\""))
            .count()
    };
    assert!(count("/docs") >= 1, "{metrics}");
    assert!(count("/openapi.json") >= 1, "{metrics}");
    assert!(!metrics.contains("route=\"/docs/"), "{metrics}");
}

#[tokio::test]
async fn with_a_write_token_writes_need_the_bearer_scheme() {
    let app = Spawn::default().var("WRITE_TOKEN", "s3cret").start().await;
    let doc = document(&app).await;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (method, path) in documented(&doc) {
        let operation = &doc["paths"][&path][method.to_lowercase()];
        let secured = operation["security"][0]["bearer"].is_array();
        // The writes, and the admin views (reads).
        let guarded = method != "GET" || path.starts_with("/admin/");
        assert_eq!(secured, guarded, "{method} {path}");
        assert_eq!(
            operation["responses"]["401"].is_object(),
            guarded,
            "{method} {path}: 401"
        );
    }
    // Without one, neither.
    let open = spawn_app().await;
    let doc = document(&open).await;
    assert!(doc["components"]["securitySchemes"].is_null());
    assert!(doc["paths"]["/items"]["post"]["responses"]["401"].is_null());
}

/// The schema of a component, by name.
fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    &doc["components"]["schemas"][name]
}

/// A parameter of an operation, by name.
fn parameter(doc: &Value, path: &str, method: &str, name: &str) -> Value {
    doc["paths"][path][method]["parameters"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{method} {path}: no parameter {name}"))
}

fn as_usize(value: &Value) -> usize {
    let n = value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"));
    usize::try_from(n).expect("a count")
}

#[tokio::test]
async fn the_documented_limits_are_the_ones_the_service_enforces() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let item = &schema(&doc, "CreateItem")["properties"];

    let name_max = as_usize(&item["name"]["maxLength"]);
    let response = app.post_item(&json!({"name": "n".repeat(name_max)})).await;
    assert_eq!(response.status(), 201, "a name of maxLength characters");
    let response = app
        .post_item(&json!({"name": "n".repeat(name_max + 1)}))
        .await;
    assert_problem(response, 422, "validation_failed").await;

    let description_max = as_usize(&item["description"]["maxLength"]);
    let body = json!({"name": "n", "description": "d".repeat(description_max)});
    assert_eq!(app.post_item(&body).await.status(), 201);
    let body = json!({"name": "n", "description": "d".repeat(description_max + 1)});
    assert_problem(app.post_item(&body).await, 422, "validation_failed").await;

    let limit = parameter(&doc, "/items", "get", "limit");
    let limit_max = as_usize(&limit["schema"]["maximum"]);
    assert_eq!(limit["schema"]["minimum"], 1);
    let page = app.get(&format!("/items?limit={limit_max}")).await;
    assert_eq!(page.status(), 200);
    let too_many = app.get(&format!("/items?limit={}", limit_max + 1)).await;
    assert_problem(too_many, 400, "invalid_query").await;

    // `^[0-9]+(,[0-9]+){0,N}$`: at most N + 1 ids.
    let ids = parameter(&doc, "/items", "get", "ids");
    let pattern = ids["schema"]["pattern"].as_str().expect("a pattern");
    let repeats = pattern
        .rsplit_once("{0,")
        .and_then(|(_, rest)| rest.split_once('}'))
        .and_then(|(n, _)| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no count in {pattern}"));
    let ids = |count: usize| {
        (1..=count)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let batch = app.get(&format!("/items?ids={}", ids(repeats + 1))).await;
    assert_eq!(batch.status(), 200);
    let too_many = app.get(&format!("/items?ids={}", ids(repeats + 2))).await;
    assert_problem(too_many, 400, "invalid_ids").await;
}

#[tokio::test]
async fn if_match_takes_what_the_document_says_it_takes() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let if_match = parameter(&doc, "/items/{id}", "patch", "If-Match");
    assert_eq!(if_match["schema"]["anyOf"][0]["enum"], json!(["*"]));

    let id = app.create_item("Widget", 100).await["id"]
        .as_i64()
        .expect("an id");
    let patch = |tag: &'static str| {
        app.client
            .patch(app.url(&format!("/items/{id}")))
            .header("If-Match", tag)
            .json(&json!({"price_cents": 1}))
            .send()
    };
    // `*`: the item exists.
    let response = patch("*").await.expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "etag"), "\"2\"");
    // The current ETag, strong or weak, and in a list.
    assert_eq!(patch("\"2\"").await.expect("sent").status(), 200);
    assert_eq!(patch("W/\"3\"").await.expect("sent").status(), 200);
    assert_eq!(patch("\"1\", \"4\"").await.expect("sent").status(), 200);
    // A version the item has left: 412.
    let stale = patch("\"1\"").await.expect("sent");
    assert_problem(stale, 412, "version_conflict").await;
}
