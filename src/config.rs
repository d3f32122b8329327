//! Settings: every variable of the contract's configuration table, read once at start,
//! typed and validated. Nothing else in the crate reads the environment.
//!
//! A bad value is a [`ConfigError`] that names the variable and the reason; `main` prints it
//! as one line and exits 2.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// A setting that could not be used: `CACHE_TTL_JITTER: must be between 0 and 1, got 1.5`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether reads use Redis at all (`CACHE_ENABLED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    Enabled,
    Disabled,
}

/// The bearer token writes need when `WRITE_TOKEN` is set. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteToken(String);

impl WriteToken {
    /// Whether `presented` is the token, in time that depends only on what was presented:
    /// neither how much of a guess was right nor the token's length shows in it.
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        let (token, presented) = (self.0.as_bytes(), presented.as_bytes());
        // subtle's slice comparison returns at once when the lengths differ, which would
        // time the token's length. So the presented bytes are compared with the token
        // repeated to their length, byte by byte, and the lengths on their own.
        let same_length = (token.len() as u64).ct_eq(&(presented.len() as u64));
        let same_bytes = presented
            .iter()
            .zip(token.iter().cycle())
            .fold(subtle::Choice::from(1), |same, (p, t)| same & p.ct_eq(t));
        bool::from(same_length & same_bytes)
    }
}

impl fmt::Debug for WriteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The service's configuration. Durations inside; `_ms`/`_secs` only at the env boundary.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    /// Streaming replicas for cache misses (`DATABASE_REPLICA_URL`, comma-separated).
    pub database_replica_urls: Vec<String>,
    /// A replica further behind than this is not read.
    pub database_replica_max_lag: Duration,
    pub redis_url: String,
    /// Seed URLs of a Redis Cluster (`REDIS_CLUSTER_NODES`); when set, `redis_url` is unused.
    pub redis_cluster_nodes: Vec<String>,
    pub listen_addr: SocketAddr,
    pub cache_mode: CacheMode,
    pub cache_ttl: Duration,
    /// Fraction in [0, 1): the fresh TTL is drawn from `ttl * (1 ± jitter)`.
    pub cache_ttl_jitter: f64,
    pub cache_negative_ttl: Duration,
    pub cache_stale: Duration,
    /// Past freshness, how long a hit still answers while one background refresh runs.
    pub cache_swr: Duration,
    /// The fraction of hits re-checked against Postgres off the request path.
    pub cache_verify_sample: f64,
    /// The near cache's bound in bytes (`CACHE_L1_MAX_MB`); 0 = off.
    pub cache_l1_max_bytes: u64,
    /// The longest life of a near-cache entry (`CACHE_L1_TTL_MS`).
    pub cache_l1_ttl: Duration,
    pub cache_key_prefix: String,
    pub redis_timeout: Duration,
    pub db_pool_size: usize,
    pub redis_pool_size: usize,
    pub write_token: Option<WriteToken>,
    pub log_format: LogFormat,
    pub log_filter: String,
}

impl Settings {
    /// Reads the process environment (after `.env`, which `main` loads).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Builds settings from `(name, value)` pairs; unnamed variables take their defaults.
    /// Tests use this to configure an instance without touching the process environment.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, ConfigError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let env = Env(&vars);
        let redis_cluster_nodes = env.urls("REDIS_CLUSTER_NODES", &["redis"])?;
        if !redis_cluster_nodes.is_empty() && env.raw("REDIS_URL").is_some() {
            return Err(env.invalid(
                "REDIS_CLUSTER_NODES",
                "cannot be set together with REDIS_URL: a cluster is reached through its \
                 seed nodes; unset one of them"
                    .to_owned(),
            ));
        }
        if !redis_cluster_nodes.is_empty()
            && vars
                .get("CACHE_KEY_PREFIX")
                .is_some_and(|prefix| prefix.contains(['{', '}']))
        {
            // Redis Cluster hashes a key's first `{...}`: braces in the prefix would take
            // the place of the hash tags that keep an id's keys in one slot.
            return Err(env.invalid(
                "CACHE_KEY_PREFIX",
                "must not contain { or } with REDIS_CLUSTER_NODES (they are Redis Cluster's \
                 hash tags)"
                    .to_owned(),
            ));
        }
        // Off by default: see README, "The near cache".
        let cache_l1_mb = env.int("CACHE_L1_MAX_MB", 0, 0, 65_536)?;
        if cache_l1_mb > 0 && !redis_cluster_nodes.is_empty() {
            return Err(env.invalid(
                "CACHE_L1_MAX_MB",
                "the near cache follows one Redis's invalidations; with REDIS_CLUSTER_NODES \
                 set it to 0"
                    .to_owned(),
            ));
        }
        Ok(Settings {
            database_url: env.url(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/itemcache",
                &["postgres", "postgresql"],
            )?,
            database_replica_urls: env.urls("DATABASE_REPLICA_URL", &["postgres", "postgresql"])?,
            // At most 30 s: a write's stamp, which carries the position a replica must have
            // replayed, lives a minute; past it a reader knows no position and relies on
            // the replica being within this lag (see db::replicas).
            database_replica_max_lag: Duration::from_millis(env.int(
                "DATABASE_REPLICA_MAX_LAG_MS",
                1000,
                1,
                30_000,
            )?),
            redis_url: env.url("REDIS_URL", "redis://127.0.0.1:6379", &["redis"])?,
            redis_cluster_nodes,
            listen_addr: env.parsed(
                "LISTEN_ADDR",
                "127.0.0.1:8080",
                "a socket address like 127.0.0.1:8080",
            )?,
            cache_mode: if env.bool("CACHE_ENABLED", true)? {
                CacheMode::Enabled
            } else {
                CacheMode::Disabled
            },
            cache_ttl: env.secs("CACHE_TTL_SECS", 300, 1)?,
            cache_ttl_jitter: env.fraction("CACHE_TTL_JITTER", 0.1)?,
            cache_negative_ttl: env.secs("CACHE_NEGATIVE_TTL_SECS", 30, 1)?,
            cache_stale: env.secs("CACHE_STALE_SECS", 600, 0)?,
            cache_swr: env.secs("CACHE_SWR_SECS", 10, 0)?,
            cache_verify_sample: env.share("CACHE_VERIFY_SAMPLE", 0.001)?,
            cache_l1_max_bytes: cache_l1_mb * 1024 * 1024,
            cache_l1_ttl: Duration::from_millis(env.int("CACHE_L1_TTL_MS", 1000, 1, 60_000)?),
            cache_key_prefix: env.prefix("CACHE_KEY_PREFIX", "itemcache:")?,
            redis_timeout: Duration::from_millis(env.int("REDIS_TIMEOUT_MS", 100, 1, 60_000)?),
            db_pool_size: env.int("DB_POOL_SIZE", 16, 1, 1000)? as usize,
            redis_pool_size: env.int("REDIS_POOL_SIZE", 16, 1, 1000)? as usize,
            write_token: env.write_token("WRITE_TOKEN")?,
            log_format: match env.raw("LOG_FORMAT").unwrap_or("text") {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(
                        env.invalid("LOG_FORMAT", format!("must be text or json, got {other:?}"))
                    );
                }
            },
            log_filter: env.log_filter("RUST_LOG")?,
        })
    }
}

/// The variables, read with one rule each.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    /// A set variable; an empty value counts as unset so `FOO=` in `.env` means "default".
    fn raw(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn invalid(&self, variable: &'static str, reason: String) -> ConfigError {
        ConfigError { variable, reason }
    }

    fn parsed<T: std::str::FromStr>(
        &self,
        name: &'static str,
        default: &str,
        what: &str,
    ) -> Result<T, ConfigError> {
        let value = self.raw(name).unwrap_or(default);
        value
            .parse()
            .map_err(|_| self.invalid(name, format!("must be {what}, got {value:?}")))
    }

    fn int(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let Some(value) = self.raw(name) else {
            return Ok(default);
        };
        match value.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(
                name,
                format!("must be an integer from {min} to {max}, got {value:?}"),
            )),
        }
    }

    fn secs(&self, name: &'static str, default: u64, min: u64) -> Result<Duration, ConfigError> {
        // A year bounds every TTL: Redis takes milliseconds as a 64-bit integer, and larger
        // values are certainly typos.
        self.int(name, default, min, 365 * 24 * 3600)
            .map(Duration::from_secs)
    }

    fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(self.invalid(name, format!("must be true or false, got {other:?}"))),
        }
    }

    /// A fraction from 0 to 1, both included.
    fn share(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        let Some(value) = self.raw(name) else {
            return Ok(default);
        };
        match value.parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
            _ => Err(self.invalid(name, format!("must be from 0 to 1, got {value}"))),
        }
    }

    fn fraction(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        let Some(value) = self.raw(name) else {
            return Ok(default);
        };
        match value.parse::<f64>() {
            Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
            _ => Err(self.invalid(name, format!("must be between 0 and 1, got {value}"))),
        }
    }

    fn url(
        &self,
        name: &'static str,
        default: &str,
        schemes: &[&str],
    ) -> Result<String, ConfigError> {
        let value = self.raw(name).unwrap_or(default);
        let scheme = value.split_once("://").map(|(s, _)| s);
        match scheme {
            Some(s) if schemes.contains(&s) => Ok(value.to_owned()),
            // The value may hold a password: name the scheme we expected, never echo it.
            _ => Err(self.invalid(
                name,
                format!("must be a URL starting with {}://", schemes[0]),
            )),
        }
    }

    /// A comma-separated list of URLs (none when unset or empty).
    fn urls(&self, name: &'static str, schemes: &[&str]) -> Result<Vec<String>, ConfigError> {
        let Some(value) = self.raw(name) else {
            return Ok(Vec::new());
        };
        value
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| match url.split_once("://") {
                Some((scheme, _)) if schemes.contains(&scheme) => Ok(url.to_owned()),
                _ => Err(self.invalid(
                    name,
                    format!(
                        "must be URLs starting with {}://, separated by commas",
                        schemes[0]
                    ),
                )),
            })
            .collect()
    }

    fn prefix(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        // Unlike other variables, an explicitly empty prefix is meaningful (keys unprefixed).
        let value = self.0.get(name).map(String::as_str).unwrap_or(default);
        if value.len() > 128 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.invalid(
                name,
                "must be at most 128 characters without spaces".to_owned(),
            ));
        }
        Ok(value.to_owned())
    }

    fn log_filter(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self.raw(name).unwrap_or("info");
        tracing_subscriber::EnvFilter::try_new(value)
            .map(|_| value.to_owned())
            .map_err(|e| self.invalid(name, format!("not a valid log filter ({e}), got {value:?}")))
    }

    fn write_token(&self, name: &'static str) -> Result<Option<WriteToken>, ConfigError> {
        match self.0.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(t) if t.chars().any(|c| c.is_whitespace() || c.is_control()) => Err(self.invalid(
                name,
                "must not contain spaces or control characters".to_owned(),
            )),
            Some(t) => Ok(Some(WriteToken(t.to_owned()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_token_matches_itself_only() {
        let token = WriteToken("ab".to_owned());
        assert!(token.matches("ab"));
        for other in ["", "a", "b", "ba", "abc", "abab", "AB", "ab "] {
            assert!(!token.matches(other), "{other:?}");
        }
    }

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_contract() -> Result<(), ConfigError> {
        let s = settings(&[])?;
        assert_eq!(s.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.cache_mode, CacheMode::Enabled);
        assert_eq!(s.cache_ttl, Duration::from_secs(300));
        assert!((s.cache_ttl_jitter - 0.1).abs() < f64::EPSILON);
        assert_eq!(s.cache_negative_ttl, Duration::from_secs(30));
        assert_eq!(s.cache_stale, Duration::from_secs(600));
        assert_eq!(s.cache_key_prefix, "itemcache:");
        assert_eq!(s.redis_timeout, Duration::from_millis(100));
        assert_eq!((s.db_pool_size, s.redis_pool_size), (16, 16));
        assert!(s.write_token.is_none());
        assert_eq!(s.log_format, LogFormat::Text);
        Ok(())
    }

    #[test]
    fn cluster_settings_that_cannot_work_are_refused() {
        let seeds = ("REDIS_CLUSTER_NODES", "redis://127.0.0.1:7000");
        let variable = |vars: &[(&str, &str)]| settings(vars).err().map(|e| e.variable);
        assert_eq!(
            variable(&[seeds, ("REDIS_URL", "redis://127.0.0.1:6379")]),
            Some("REDIS_CLUSTER_NODES")
        );
        assert_eq!(
            variable(&[seeds, ("CACHE_KEY_PREFIX", "app{")]),
            Some("CACHE_KEY_PREFIX")
        );
        assert_eq!(
            variable(&[seeds, ("CACHE_L1_MAX_MB", "16")]),
            Some("CACHE_L1_MAX_MB")
        );
        assert!(settings(&[seeds, ("CACHE_KEY_PREFIX", "app:")]).is_ok());
        assert!(
            settings(&[("CACHE_KEY_PREFIX", "app{")]).is_ok(),
            "one Redis: any prefix"
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_reason() {
        let cases = [
            (
                "CACHE_TTL_JITTER",
                "1.5",
                "CACHE_TTL_JITTER: must be between 0 and 1, got 1.5",
            ),
            (
                "CACHE_TTL_SECS",
                "-3",
                "CACHE_TTL_SECS: must be an integer from 1 to 31536000, got \"-3\"",
            ),
            (
                "LISTEN_ADDR",
                "nowhere",
                "LISTEN_ADDR: must be a socket address like 127.0.0.1:8080, got \"nowhere\"",
            ),
            (
                "CACHE_ENABLED",
                "maybe",
                "CACHE_ENABLED: must be true or false, got \"maybe\"",
            ),
            (
                "REDIS_URL",
                "http://x",
                "REDIS_URL: must be a URL starting with redis://",
            ),
            (
                "LOG_FORMAT",
                "xml",
                "LOG_FORMAT: must be text or json, got \"xml\"",
            ),
            (
                "DB_POOL_SIZE",
                "0",
                "DB_POOL_SIZE: must be an integer from 1 to 1000, got \"0\"",
            ),
        ];
        for (var, value, message) in cases {
            let err = settings(&[(var, value)]).err().map(|e| e.to_string());
            assert_eq!(err.as_deref(), Some(message), "{var}={value}");
        }
    }

    #[test]
    fn a_bad_log_filter_is_a_config_error() {
        let err = settings(&[("RUST_LOG", "info,[")])
            .err()
            .map(|e| e.variable);
        assert_eq!(err, Some("RUST_LOG"));
    }

    #[test]
    fn the_write_token_never_prints() -> Result<(), ConfigError> {
        let s = settings(&[("WRITE_TOKEN", "s3cret")])?;
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(
            s.write_token
                .as_ref()
                .is_some_and(|t| t.matches("s3cret") && !t.matches("s3cre"))
        );
        Ok(())
    }
}
