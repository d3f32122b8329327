//! Another instance of the service as a process of its own (the built binary), on a test
//! app's database, Redis and key prefix: with the app, a fleet of two for the dashboard's
//! per-instance panels. Not a second `TestApp`: instances in this process share one metrics
//! recorder (it is global), so a second would export the first's numbers under another
//! `instance` label; a process has its own.
//!
//! Like Prometheus here it has a guardian: a `sh` that waits on a pipe from this process and
//! kills the instance (and removes its log) when the pipe closes, that is when the
//! [`ProcessInstance`] is dropped or the test process exits, however it exits.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::servers::free_port;

pub struct ProcessInstance {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    log: PathBuf,
    child: Child,
    guardian: Option<Child>,
}

impl ProcessInstance {
    /// Starts `itemcache serve` on `app`'s database, Redis and key prefix with `vars` on top;
    /// returns once it answers `/healthz`.
    pub async fn start(app: &TestApp, vars: &[(&str, &str)]) -> ProcessInstance {
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "itemcache-test-{}-instance-{port}.log",
            std::process::id()
        ));
        let log_file = std::fs::File::create(&log).expect("instance log file");
        let child = Command::new(env!("CARGO_BIN_EXE_itemcache"))
            .arg("serve")
            // Only the settings given here: none from the environment, and no `.env`.
            .env_clear()
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", app.backends.pg.url(&app.database))
            .env("REDIS_URL", app.backends.redis.url())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("CACHE_KEY_PREFIX", &app.prefix)
            .env("DB_POOL_SIZE", "8")
            .env("REDIS_POOL_SIZE", "4")
            .env("RUST_LOG", "warn")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("start the itemcache binary");
        // Kills only our child: until we reap it, its pid cannot be reused.
        let guardian = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _ignored; kill -9 {} 2>/dev/null; rm -f '{}'",
                child.id(),
                log.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn guardian");
        let mut instance = ProcessInstance {
            address: format!("http://127.0.0.1:{port}"),
            port,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            log,
            child,
            guardian: Some(guardian),
        };
        // Not `eventually`: an instance that fails to start should say why (its log).
        for _ in 0..1500 {
            if let Ok(Some(status)) = instance.child.try_wait() {
                panic!("itemcache exited ({status}):\n{}", instance.log());
            }
            let healthy = instance
                .client
                .get(instance.url("/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy {
                return instance;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("itemcache did not answer /healthz:\n{}", instance.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `GET path`; a transport error fails the test.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.address))
    }

    /// The instance's output, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        // Closing the guardian's stdin makes it kill the instance and remove its log.
        if let Some(mut guardian) = self.guardian.take() {
            drop(guardian.stdin.take());
            let _ = guardian.wait();
        }
        let _ = self.child.wait();
    }
}
