//! The near cache's invalidations, from Redis itself: RESP3 client-side caching in
//! broadcasting mode (`CLIENT TRACKING ON BCAST PREFIX {prefix}item:`), on a connection of
//! its own. Redis then pushes the name of every entry key that any client changes (a
//! write's invalidation, a fill, an eviction, the change feed's, an expiry), and a `nil`
//! when the database is flushed; each evicts here.
//!
//! The near cache is served only while this connection is up and subscribed. When it drops
//! (or stops answering its once-a-second `PING` within a second), the near cache is
//! flushed and bypassed until a new connection has subscribed: invalidations sent during
//! the gap are lost, so nothing stored before it may be served after it.

use std::sync::Arc;
use std::time::Duration;

use ::redis::{PushKind, Value};
use tokio::sync::{mpsc, watch};

use crate::cache::near::Near;
use crate::items::model::ItemId;
use crate::metrics;

/// How often the connection proves it is alive, and how long it has to answer.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Reconnecting: first after this, then twice as long each time, up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The connection's name in `CLIENT LIST` (for operators, and the test that kills it):
/// this, then the key prefix.
pub const CLIENT_NAME: &str = "itemcache-tracking:";

/// Follows Redis's invalidations into `near` until `stop`; reconnects after every failure.
pub async fn follow(
    redis_url: String,
    prefix: String,
    near: Arc<Near>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    // Logged once per outage, not once per attempt.
    let mut down_logged = false;
    loop {
        near.set_live(false);
        let mut went_live = false;
        let result = tokio::select! {
            result = session(&redis_url, &prefix, &near, &mut went_live) => result,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        near.set_live(false);
        if went_live {
            backoff = BACKOFF_MIN;
            down_logged = false;
        }
        if let Err(e) = result
            && !down_logged
        {
            tracing::warn!(error = %e, "near cache: no invalidations from Redis; bypassing it until they resume");
            down_logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life: subscribe, then apply pushes until it fails.
async fn session(
    redis_url: &str,
    prefix: &str,
    near: &Arc<Near>,
    went_live: &mut bool,
) -> Result<(), ::redis::RedisError> {
    let separator = if redis_url.contains('?') { '&' } else { '?' };
    let client = ::redis::Client::open(format!("{redis_url}{separator}protocol=resp3"))?;
    let (pushes, mut received) = mpsc::unbounded_channel();
    let config = ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PING_EVERY))
        .set_response_timeout(Some(PING_EVERY))
        .set_push_sender(pushes);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    ::redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(format!("{CLIENT_NAME}{prefix}"))
        .query_async::<()>(&mut conn)
        .await?;
    let entries = format!("{prefix}item:");
    ::redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(&entries)
        .query_async::<()>(&mut conn)
        .await?;
    near.set_live(true);
    *went_live = true;
    tracing::info!("near cache: following Redis's invalidations");
    // The liveness check runs beside the pushes, so that a slow `PING` (up to its
    // one-second deadline) never holds back the invalidations queued behind it.
    let (failed, mut ping_failed) = tokio::sync::oneshot::channel();
    let pinger = tokio::spawn(ping_until_failure(conn.clone(), near.clone(), failed));
    let _stop_pinger = AbortOnDrop(pinger);
    loop {
        tokio::select! {
            push = received.recv() => {
                let Some(push) = push else {
                    return Err(disconnected());
                };
                match push.kind {
                    PushKind::Invalidate => apply(near, &entries, push.data),
                    PushKind::Disconnection => return Err(disconnected()),
                    _ => {}
                }
            }
            e = &mut ping_failed => {
                return Err(e.unwrap_or_else(|_| disconnected()));
            }
        }
    }
}

/// `PING`s every [`PING_EVERY`] until one fails, and says why; meanwhile keeps the near
/// cache's size gauge current.
async fn ping_until_failure(
    mut conn: ::redis::aio::MultiplexedConnection,
    near: Arc<Near>,
    failed: tokio::sync::oneshot::Sender<::redis::RedisError>,
) {
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        ping.tick().await;
        if let Err(e) = ::redis::cmd("PING").query_async::<()>(&mut conn).await {
            let _ = failed.send(e);
            return;
        }
        metrics::record_near_bytes(near.weighted_size());
    }
}

/// Aborts a task when dropped (the session ended, however it ended).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn disconnected() -> ::redis::RedisError {
    ::redis::RedisError::from((::redis::ErrorKind::Io, "the tracking connection closed"))
}

/// An `invalidate` push: the changed keys, or `nil` for "everything" (a flush).
fn apply(near: &Near, entries: &str, data: Vec<Value>) {
    match data.into_iter().next() {
        Some(Value::Array(keys)) => {
            metrics::record_near_invalidations(keys.len());
            for key in keys {
                if let Some(id) = id_of(entries, &key) {
                    near.invalidate(id);
                }
            }
        }
        _ => {
            metrics::record_near_invalidations(1);
            near.flush();
        }
    }
}

/// The id of an entry key `{prefix}item:{id}`.
fn id_of(entries: &str, key: &Value) -> Option<ItemId> {
    let Value::BulkString(key) = key else {
        return None;
    };
    let rest = key.strip_prefix(entries.as_bytes())?;
    ItemId::parse(std::str::from_utf8(rest).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_ids_and_nothing_else() {
        let key = |k: &str| Value::BulkString(k.as_bytes().to_vec());
        assert_eq!(id_of("app:item:", &key("app:item:42")), ItemId::new(42));
        assert_eq!(id_of("app:item:", &key("app:stamp:42")), None);
        assert_eq!(id_of("app:item:", &key("app:item:x")), None);
        assert_eq!(id_of("app:item:", &Value::Nil), None);
    }
}
