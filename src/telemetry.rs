//! Logs: a `tracing` subscriber writing text or JSON lines to stdout, installed once.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the subscriber. Safe to call more than once (tests do): later calls keep the
/// first subscriber.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
