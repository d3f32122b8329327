//! Dashboard truth: a real Prometheus scrapes a fleet of two real instances under mixed
//! traffic, and every query of the bundled Grafana dashboard (every panel target, rows
//! included, and the `instance` variable) runs against it and returns data; a query that
//! groups `by (instance)` returns a series for each instance. A query naming a metric or
//! label the service does not export, or one Prometheus refuses, fails here with its
//! panel's name. The alert rules are loaded too, and must evaluate without error.
//!
//! Every hit is checked for staleness (`CACHE_VERIFY_SAMPLE=1`), and one entry is made stale
//! (its old version planted in Redis), so the consistency panels (the checks, the nines, the
//! age of stale entries) have their series.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::consistency::plant_old_version;
use crate::fleet::ProcessInstance;
use crate::prometheus_server::Prometheus;
use crate::serial;
use crate::support::{Spawn, TestApp, eventually, header};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/grafana/dashboards/itemcache.json"
);
const ALERT_RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/prometheus/alerts.yml");

/// Far beyond any id a test database hands out.
const ABSENT_ID_BASE: i64 = 1_000_000_000;

/// What Grafana would put for each variable with every instance selected, against a
/// Prometheus scraping every second. `$__rate_interval` is 10 s: Grafana makes it at least
/// 4 scrape intervals; 10 s holds ~10 scrapes, so a rate never lacks its two samples.
fn variable(name: &str) -> Option<&'static str> {
    Some(match name {
        "instance" => ".*",
        "__rate_interval" => "10s",
        "__interval" => "2s",
        "__interval_ms" => "2000",
        "__range" => "1m",
        "__range_s" => "60",
        "__range_ms" => "60000",
        _ => return None,
    })
}

/// `expr` with Grafana's variables (`$name`, `${name}`, `${name:format}`) replaced. `$1` and
/// `${1}` are left alone: they are `label_replace` backreferences, not variables.
fn substitute(expr: &str) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced
                    .find('}')
                    .ok_or_else(|| format!("unclosed ${{ in {expr:?}"))?;
                let name = braced[..end].split(':').next().unwrap_or("");
                (name, end + 2)
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&rest[at..at + 1 + len]);
        } else {
            let value =
                variable(name).ok_or_else(|| format!("unknown variable ${name} in {expr:?}"))?;
            out.push_str(value);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One panel target.
struct Target {
    /// `panel 3 "Cache hit ratio" (row "Overview") query A`
    panel: String,
    expr: String,
}

/// Every target of every panel, rows' nested panels included.
fn targets(dashboard: &Value) -> Vec<Target> {
    fn walk(panels: &Value, row: Option<&str>, out: &mut Vec<Target>) {
        let mut row = row.map(str::to_owned);
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("<untitled>");
            if panel["type"] == "row" {
                row = Some(title.to_owned());
                walk(&panel["panels"], Some(title), out);
                continue;
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(Target {
                    panel: format!(
                        "panel {} {title:?}{} query {}",
                        panel["id"],
                        row.as_deref()
                            .map(|r| format!(" (row {r:?})"))
                            .unwrap_or_default(),
                        target["refId"].as_str().unwrap_or("?")
                    ),
                    expr: target["expr"].as_str().unwrap_or("").to_owned(),
                });
            }
            walk(&panel["panels"], row.as_deref(), out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], None, &mut out);
    out
}

/// `label_values(metric, label)` (or `label_values(label)`): the metric selector, if any,
/// and the label.
fn label_values_query(query: &str) -> Option<(Option<&str>, &str)> {
    let args = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    match args.rsplit_once(',') {
        Some((metric, label)) => Some((Some(metric.trim()), label.trim())),
        None => Some((None, args.trim())),
    }
}

/// One round of mixed traffic: hits, a miss, a "not found" (a miss, then a hit), a batch,
/// a listing, a write, an eviction, a bad request, an unknown route and the probes.
async fn traffic_round(app: &TestApp, round: usize, hot: i64, cold: &[i64]) {
    let cold = cold[round % cold.len()];
    let absent = ABSENT_ID_BASE + round as i64;
    for _ in 0..3 {
        app.get_item(hot).await;
    }
    app.get_item(cold).await;
    app.get_item(absent).await;
    app.get_item(absent).await;
    app.get(&format!("/items?ids={hot},{cold},{absent}")).await;
    app.get("/items?limit=5").await;
    app.patch_item(cold, &serde_json::json!({"price_cents": round}))
        .await;
    app.evict(hot).await;
    app.get("/items/not-a-number").await;
    app.get("/no/such/route").await;
    app.get("/healthz").await;
    app.get("/readyz").await;
}

/// The second instance's round: reads only (hits, a miss, a batch), enough for its request,
/// hit ratio, latency and hot key series.
async fn fleet_round(instance: &ProcessInstance, round: usize, hot: i64, cold: &[i64]) {
    let cold = cold[(round + 1) % cold.len()];
    for _ in 0..3 {
        instance.get(&format!("/items/{hot}")).await;
    }
    instance.get(&format!("/items/{cold}")).await;
    instance.get(&format!("/items?ids={hot},{cold}")).await;
}

/// The fewest samples any series of the service's counters and histograms has in the last
/// minute (`None` before the first scrape). Family by family: `count_over_time` drops the
/// metric name, and `_sum` and `_count` of one histogram would collide. The staleness age
/// appears once the planted stale entry has been found.
async fn least_scraped(prometheus: &Prometheus) -> Option<f64> {
    let mut least: Option<f64> = None;
    for family in [
        "itemcache_http_requests_total",
        "itemcache_http_request_duration_seconds_count",
        "itemcache_cache_lookups_total",
        "itemcache_cache_operation_duration_seconds_count",
        "itemcache_db_query_duration_seconds_count",
        "itemcache_consistency_checks_total",
        "itemcache_staleness_age_seconds_count",
    ] {
        let n = prometheus
            .scalar(&format!("min(count_over_time({family}[1m]))"))
            .await?;
        least = Some(least.map_or(n, |l| l.min(n)));
    }
    least
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let _serial = serial().await;
    let started = Instant::now();
    let app = Spawn::default().var("CACHE_VERIFY_SAMPLE", 1).start().await;
    let second = ProcessInstance::start(&app, &[("CACHE_VERIFY_SAMPLE", "1")]).await;
    let ids = app.insert_items(50).await;
    let (hot, cold) = (ids[0], &ids[1..]);
    let instances = [
        format!("127.0.0.1:{}", app.port),
        format!("127.0.0.1:{}", second.port),
    ];
    let prometheus = Prometheus::start(&instances, std::path::Path::new(ALERT_RULES)).await;

    // A stale entry for the checker to find (what a lost invalidation leaves behind).
    let stale = plant_old_version(&app).await;
    assert_eq!(header(&app.get_item(stale).await, "etag"), "\"1\"");

    // Traffic until every itemcache series has been scraped 3 times: then every rate over
    // $__rate_interval has its samples.
    let until = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        traffic_round(&app, round, hot, cold).await;
        fleet_round(&second, round, hot, cold).await;
        round += 1;
        let scraped = least_scraped(&prometheus).await;
        if scraped.is_some_and(|n| n >= 3.0) {
            break;
        }
        // Pacing, not waiting: ~10 rounds a second is traffic enough for every rate.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if Instant::now() > until {
            let targets = prometheus.api("targets", &[]).await;
            panic!(
                "prometheus did not scrape the instances 3 times in 30 s (last: {scraped:?})\n\
                 targets: {targets}\nits log:\n{}\nthe second instance's log:\n{}",
                prometheus.log(),
                second.log()
            );
        }
    }

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard JSON"))
            .expect("the dashboard is JSON");
    let targets = targets(&dashboard);
    assert!(!targets.is_empty(), "the dashboard has no panel queries");
    let mut failures = Vec::new();
    for target in &targets {
        let expr = match substitute(&target.expr) {
            Ok(expr) => expr,
            Err(e) => {
                failures.push(format!("{}: {e}", target.panel));
                continue;
            }
        };
        match prometheus.query(&expr).await {
            Err(e) => failures.push(format!("{}: {e}\n    {expr}", target.panel)),
            Ok(result) if result.is_empty() => {
                failures.push(format!("{}: no data\n    {expr}", target.panel));
            }
            Ok(result) => {
                // A panel whose every value is NaN (0/0, a quantile of no observations)
                // draws nothing, however non-empty its result.
                let numbers = result
                    .iter()
                    .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
                    .filter(|v| !v.is_nan())
                    .count();
                if numbers == 0 {
                    failures.push(format!(
                        "{}: only NaN: {}\n    {expr}",
                        target.panel,
                        Value::from(result.clone())
                    ));
                }
                // Per-instance panels: a series (a number) for each instance.
                if by_instance(&expr) {
                    let seen: Vec<&str> = result
                        .iter()
                        .filter(|r| {
                            r["value"][1]
                                .as_str()
                                .and_then(|v| v.parse::<f64>().ok())
                                .is_some_and(|v| !v.is_nan())
                        })
                        .filter_map(|r| r["metric"]["instance"].as_str())
                        .collect();
                    let missing: Vec<&String> = instances
                        .iter()
                        .filter(|i| !seen.contains(&i.as_str()))
                        .collect();
                    if !missing.is_empty() {
                        failures.push(format!(
                            "{}: no series for {missing:?}: {}\n    {expr}",
                            target.panel,
                            Value::from(result)
                        ));
                    }
                }
            }
        }
    }

    // The `instance` variable: `label_values(metric, label)` lists the label's values on
    // the metric's series; both instances must be among them.
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = var["name"].as_str().unwrap_or("?");
        let query = match &var["query"] {
            Value::String(q) => q.as_str(),
            q => q["query"].as_str().unwrap_or(""),
        };
        if var["type"] != "query" {
            continue;
        }
        let Some((Some(metric), label)) = label_values_query(query) else {
            failures.push(format!(
                "variable {name}: not a label_values(metric, label) query: {query:?}"
            ));
            continue;
        };
        let series = prometheus.api("series", &[("match[]", metric)]).await;
        let values: Vec<&str> = series["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[label].as_str())
            .collect();
        if series["status"] != "success" || values.is_empty() {
            failures.push(format!("variable {name}: {query} lists nothing: {series}"));
        } else if name == "instance"
            && let Some(absent) = instances.iter().find(|i| !values.contains(&i.as_str()))
        {
            failures.push(format!(
                "variable {name}: {query} lists {values:?}, not {absent}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries fail against Prometheus:\n{}",
        failures.len(),
        targets.len(),
        failures.join("\n")
    );
    nines_are_finite_and_capped(&prometheus, &dashboard, &instances).await;

    // The alert rules, evaluated every second over the same data: none may error.
    let rules = eventually(
        "every alert rule to be evaluated",
        Duration::from_secs(10),
        || async {
            let body = prometheus.api("rules", &[]).await;
            let rules: Vec<Value> = body["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let evaluated = !rules.is_empty()
                && rules.iter().all(|r| {
                    r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001-"))
                });
            evaluated.then_some(rules)
        },
    )
    .await;
    let broken: Vec<String> = rules
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(
        broken.is_empty(),
        "alert rules that fail to evaluate:\n{}",
        broken.join("\n")
    );
    eprintln!(
        "dashboard: {} queries ok after {round} traffic rounds, {:.1} s",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The nines of consistency per instance, as the dashboard computes them: finite on both
/// instances, though the second found no stale hit (its share is 0, −log10 of which is
/// infinite): there they are log10(checks / 3), the most the sample supports; on the first,
/// which found the planted one, positive and no more than that.
async fn nines_are_finite_and_capped(
    prometheus: &Prometheus,
    dashboard: &Value,
    instances: &[String],
) {
    const TITLE: &str = "Nines of consistency by instance (trailing hour)";
    let target = targets(dashboard)
        .into_iter()
        .find(|t| t.panel.contains(&format!("{TITLE:?}")))
        .unwrap_or_else(|| panic!("no panel {TITLE:?}"));
    let nines = substitute(&target.expr).unwrap();
    let cap = "log10(sum by (instance) (increase(itemcache_consistency_checks_total[1h])) / 3)";
    // One query for both, so that they are evaluated at the same instant.
    let result = prometheus
        .query(&format!(
            "label_replace({nines}, \"of\", \"nines\", \"\", \"\") \
             or label_replace({cap}, \"of\", \"cap\", \"\", \"\")"
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}\n    {nines}"));
    let value = |instance: &str, of: &str| {
        result
            .iter()
            .find(|r| r["metric"]["instance"] == instance && r["metric"]["of"] == of)
            .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {of} for {instance} in {}", Value::from(result.clone())))
    };
    let (first, second) = (&instances[0], &instances[1]);
    let (nines_1, cap_1) = (value(first, "nines"), value(first, "cap"));
    let (nines_2, cap_2) = (value(second, "nines"), value(second, "cap"));
    assert!(
        nines_2.is_finite() && nines_2 > 0.0 && (nines_2 - cap_2).abs() < 1e-9,
        "no stale hit on {second}: nines {nines_2}, want log10(checks / 3) = {cap_2}"
    );
    assert!(
        nines_1.is_finite() && nines_1 > 0.0 && nines_1 <= cap_1 + 1e-9,
        "a stale hit on {first}: nines {nines_1}, want in (0, {cap_1}]"
    );
}

/// Whether a query is per instance: its first grouping (in the dashboard's queries, the
/// outermost aggregation) keeps `instance`, as `by (instance)` or `by (instance, le)` do.
fn by_instance(expr: &str) -> bool {
    let squeezed: String = expr.split_whitespace().collect();
    squeezed.find("by(").is_some_and(|at| {
        squeezed[at + 3..]
            .split(')')
            .next()
            .is_some_and(|labels| labels.split(',').any(|l| l == "instance"))
    })
}

#[test]
fn per_instance_queries_are_recognised() {
    assert!(by_instance(
        "histogram_quantile(0.99, sum by (instance, le) (rate(x[1m])))"
    ));
    assert!(by_instance("sum by(instance)(x) / sum by (instance) (y)"));
    assert!(!by_instance("sum by (le, cache) (rate(x[1m]))"));
    assert!(!by_instance("sum(x{instance=~\".*\"})"));
    assert!(!by_instance(
        "histogram_quantile(0.99, sum by (le) (sum by (instance, le) (x)))"
    ));
}

#[test]
fn grafana_variables_are_substituted_and_backreferences_kept() {
    assert_eq!(
        substitute(r#"rate(x{instance=~"$instance"}[$__rate_interval])"#).unwrap(),
        r#"rate(x{instance=~".*"}[10s])"#
    );
    assert_eq!(
        substitute(r#"label_replace(x{i=~"${instance:regex}"}, "c", "${1}xx$1", "s", "(.)")"#)
            .unwrap(),
        r#"label_replace(x{i=~".*"}, "c", "${1}xx$1", "s", "(.)")"#
    );
    assert!(substitute("x[$__nonsense]").is_err());
}
