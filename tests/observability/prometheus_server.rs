//! A real Prometheus (Debian's `prometheus` binary) on a free loopback port, scraping test
//! instances every second, with the repo's alert rules loaded. Its config and storage
//! live in a scratch directory.
//!
//! Like the harness's servers it has a guardian: a `sh` that waits on a pipe from this
//! process and kills Prometheus (and removes the directory) when the pipe closes, that is
//! when the [`Prometheus`] is dropped or the test process exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::servers::free_port;

/// Scrape (and rule evaluation) interval: the shortest that keeps Prometheus honest, so
/// that a few seconds of traffic give rates.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Prometheus {
    pub address: String,
    dir: PathBuf,
    child: Child,
    guardian: Option<Child>,
    client: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port` each, one `instance` label each) as
    /// job `itemcache`, with the rules of `rules`; returns once it answers `/-/ready`.
    pub async fn start(targets: &[String], rules: &Path) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "itemcache-test-{}-prometheus-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("prometheus scratch dir");
        let secs = SCRAPE_INTERVAL.as_secs();
        let config = format!(
            "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n  \
             evaluation_interval: {secs}s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: itemcache\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: {targets:?}\n",
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("log")).expect("prometheus log file");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect(
                "prometheus is installed (Debian package prometheus; scripts/test installs it)",
            );
        // Kills only our child: until we reap it, its pid cannot be reused.
        let guardian = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _ignored; kill -9 {} 2>/dev/null; rm -rf '{}'",
                child.id(),
                dir.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn guardian");
        let prometheus = Prometheus {
            address: format!("http://127.0.0.1:{port}"),
            dir,
            child,
            guardian: Some(guardian),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        };
        let ready = || async {
            let response = prometheus
                .client
                .get(format!("{}/-/ready", prometheus.address))
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        };
        // Not `eventually`: a Prometheus that fails to start should say why (its log).
        for _ in 0..1500 {
            if ready().await.is_some() {
                return prometheus;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("prometheus did not get ready:\n{}", prometheus.log());
    }

    /// Prometheus's own output, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// `GET /api/v1/{path}` with `params`: the body, whatever the status (errors are JSON
    /// too, with `status: "error"`).
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let response = self
            .client
            .get(format!("{}/api/v1/{path}", self.address))
            .query(params)
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: not JSON: {e}"))
    }

    /// An instant query now: `Ok(result)` or `Err(what Prometheus said)`.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = self.api("query", &[("query", expr)]).await;
        match (body["status"].as_str(), body["data"]["result"].as_array()) {
            (Some("success"), Some(result)) => Ok(result.clone()),
            _ => Err(format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or(&body.to_string())
            )),
        }
    }

    /// The single number an instant query returns, if it returns exactly one.
    pub async fn scalar(&self, expr: &str) -> Option<f64> {
        match self.query(expr).await.ok()?.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Closing the guardian's stdin makes it kill Prometheus and remove the directory.
        if let Some(mut guardian) = self.guardian.take() {
            drop(guardian.stdin.take());
            let _ = guardian.wait();
        }
        let _ = self.child.wait();
    }
}
