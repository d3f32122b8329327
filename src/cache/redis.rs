//! Redis specifics: connections, key names, the entry encoding, and the Lua fill script.
//!
//! ## Connections
//! A `MultiplexedConnection` pipelines many concurrent commands over one socket and is made
//! to be cloned. Taking a deadpool-redis object per request costs an `UNWATCH` + `PING` round
//! trip on every checkout (STACK.md measured 0.2× of Redis's own speed), so deadpool-redis
//! is used here only as the factory that makes connections. [`Connections`] gives each HTTP
//! worker its own connection, made on the worker so that the connection's driver task (which
//! writes commands and reads replies) runs on the worker too: a hit then costs no hop to
//! another thread and back (measured: +20 % hits/s at 64 connections, +35 % at 256). The
//! rest of `REDIS_POOL_SIZE` are shared connections, lent round-robin to other tasks and to
//! a worker whose own is not connected yet. A broken connection is replaced in the
//! background while requests go on without the cache.
//!
//! ## Entries
//! `{prefix}item:{id}` holds what a hit needs and nothing to decode:
//! `I<version> <fresh_until_ms> <item JSON>` or `N <fresh_until_ms>` (a cached "not found").
//! The key itself lives `CACHE_STALE_SECS` longer than the freshness, so that the entry can
//! be served `STALE` while Postgres is down.
//!
//! ## Write stamps
//! `{prefix}stamp:{id}` holds a random token that every write of the id replaces (after its
//! commit, together with deleting the entry). A reader notes the stamp before it reads
//! Postgres and fills only if the stamp is unchanged; see [`FILL_SCRIPT`] and
//! `docs/cache-design.md`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;
use thread_local::ThreadLocal;

use crate::items::model::{ItemId, ItemJson};

/// The fill, atomic in Redis: store the entry only if no write has stamped the id since
/// the reader noted its stamp (before reading Postgres).
///
/// A write replaces the stamp and deletes the entry *after* its commit, so an unchanged
/// stamp at fill time proves that no write was acknowledged between the reader's note and
/// its fill, and a write that committed before the note is in what the reader read.
/// The interleaving it defeats (the classic cache-aside race):
///
/// ```text
///   reader                               writer
///   GET item:7          -> miss
///   GET stamp:7         -> s1
///   SELECT ... v3
///                                        UPDATE ... v4; COMMIT
///                                        SET stamp:7 s2; DEL item:7
///   FILL item:7 v3 if stamp:7 == s1  -> refused: the stamp is s2
/// ```
///
/// Without the check the reader would store v3 after the writer's delete, and every read
/// would return v3 until the TTL ran out. Stamps are random, not counters, so a stamp that
/// expired and was written again can never look unchanged (no ABA).
///
/// KEYS: entry, stamp pairs. ARGV: noted stamp ("" for none), value, ttl_ms triples.
/// Returns 1 (filled) or 0 for each pair.
pub const FILL_SCRIPT: &str = r"
local filled = {}
for i = 1, #KEYS, 2 do
  local a = (i - 1) / 2 * 3
  if (redis.call('GET', KEYS[i + 1]) or '') == ARGV[a + 1] then
    redis.call('SET', KEYS[i], ARGV[a + 2], 'PX', ARGV[a + 3])
    filled[#filled + 1] = 1
  else
    filled[#filled + 1] = 0
  end
end
return filled
";

/// A write's invalidation, atomic in Redis: a new stamp (so in-flight readers cannot
/// fill), then the entry gone (so the next read goes to Postgres).
///
/// KEYS: entry, stamp. ARGV: new stamp, stamp ttl_ms.
pub const INVALIDATE_SCRIPT: &str = r"
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
";

/// Key names under `CACHE_KEY_PREFIX`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn entry(&self, id: ItemId) -> String {
        format!("{}item:{id}", self.prefix)
    }

    pub fn stamp(&self, id: ItemId) -> String {
        format!("{}stamp:{id}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Item(ItemJson),
    NotFound,
}

/// A decoded entry: the value, and until when it is fresh (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Cached,
    pub fresh_until_ms: i64,
}

impl Entry {
    pub fn is_fresh(&self, now_ms: i64) -> bool {
        now_ms < self.fresh_until_ms
    }

    pub fn encode(&self) -> Vec<u8> {
        match &self.value {
            Cached::Item(item) => {
                let mut out = Vec::with_capacity(item.json.len() + 32);
                out.extend_from_slice(
                    format!("I{} {} ", item.version, self.fresh_until_ms).as_bytes(),
                );
                out.extend_from_slice(&item.json);
                out
            }
            Cached::NotFound => format!("N {}", self.fresh_until_ms).into_bytes(),
        }
    }

    /// Reads the header and slices the JSON out of `raw` without copying it. Anything that
    /// does not parse (another program's key, an older format) is treated as a miss.
    pub fn decode(raw: Bytes) -> Option<Entry> {
        let (&tag, rest) = raw.split_first()?;
        match tag {
            b'N' => Some(Entry {
                value: Cached::NotFound,
                fresh_until_ms: parse_i64(rest.strip_prefix(b" ")?)?,
            }),
            b'I' => {
                let version_end = rest.iter().position(|&b| b == b' ')?;
                let version = parse_i64(&rest[..version_end])?;
                let after_version = &rest[version_end + 1..];
                let fresh_end = after_version.iter().position(|&b| b == b' ')?;
                let fresh_until_ms = parse_i64(&after_version[..fresh_end])?;
                let json_start = 1 + version_end + 1 + fresh_end + 1;
                Some(Entry {
                    value: Cached::Item(ItemJson {
                        version,
                        json: raw.slice(json_start..),
                    }),
                    fresh_until_ms,
                })
            }
            _ => None,
        }
    }
}

fn parse_i64(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One connection slot: the connection (or none while it is being replaced), which
/// generation it is, and how many commands it has in flight (for the pool gauges).
struct Slot {
    conn: RwLock<Option<(u64, MultiplexedConnection)>>,
    reconnecting: AtomicBool,
    in_flight: AtomicUsize,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            conn: RwLock::new(None),
            reconnecting: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn is_connected(&self) -> bool {
        self.conn.read().is_ok_and(|c| c.is_some())
    }
}

/// A thread's entry: an HTTP worker's own slot, or none for other threads and for a worker
/// that asked after the budget of own connections was spent (they use the shared ones).
struct Own {
    /// The thread it belongs to. `thread_local` hands a dead thread's entry to the next
    /// new thread (an actix worker that panicked is replaced): such an entry is reset, since
    /// its connection's driver died with the old worker's runtime.
    thread: AtomicU64,
    slot: Option<Arc<Slot>>,
}

impl Own {
    /// This worker's slot, reset first if it was another (dead) thread's.
    fn slot(&self) -> Option<&Arc<Slot>> {
        let slot = self.slot.as_ref()?;
        let me = THREAD.with(|id| *id);
        if self.thread.swap(me, Ordering::Relaxed) != me {
            if let Ok(mut conn) = slot.conn.write() {
                *conn = None;
            }
            slot.reconnecting.store(false, Ordering::Release);
        }
        Some(slot)
    }
}

/// The Redis connections: each HTTP worker's own (see the module docs), and shared ones.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

struct Inner {
    factory: deadpool_redis::Pool,
    /// Each thread's entry, made on its first command: whether it is an HTTP worker (a
    /// current-thread runtime) is decided once, not per command.
    local: ThreadLocal<Own>,
    /// Own connections not claimed yet.
    unclaimed: AtomicUsize,
    shared: Box<[Arc<Slot>]>,
    /// The main runtime, where shared connections are made (and so their drivers run).
    main: tokio::runtime::Handle,
    generation: AtomicU64,
    connect_timeout: Duration,
}

/// The receipt for a connection lent for one command; the command counts as in flight
/// until it is dropped.
pub struct Lent<'a> {
    slot: &'a Arc<Slot>,
    shared: bool,
    generation: u64,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Round-robin position over the shared slots, per thread so workers do not contend
    /// on one counter.
    static NEXT: Cell<usize> = const { Cell::new(0) };
    /// A number for this thread, never reused (unlike `thread_local`'s ids).
    static THREAD: u64 = THREADS.fetch_add(1, Ordering::Relaxed);
}

impl Connections {
    /// `size` connections in all: one of them for each of up to `workers` HTTP workers, the
    /// rest (at least one) shared. Call it on the main runtime.
    pub fn new(
        factory: deadpool_redis::Pool,
        size: usize,
        workers: usize,
        connect_timeout: Duration,
    ) -> Connections {
        let size = size.max(1);
        let own = workers.min(size - 1);
        let shared = (0..size - own).map(|_| Arc::new(Slot::empty())).collect();
        Connections {
            inner: Arc::new(Inner {
                factory,
                local: ThreadLocal::new(),
                unclaimed: AtomicUsize::new(own),
                shared,
                main: tokio::runtime::Handle::current(),
                generation: AtomicU64::new(0),
                connect_timeout,
            }),
        }
    }

    /// Connects every empty shared slot now (at start-up), all at once, so an unreachable
    /// Redis delays start-up by one connect timeout, not one per slot. Returns how many
    /// are connected; zero means Redis is not reachable yet, and the slots will be filled
    /// in the background once it is.
    pub async fn connect_all(&self) -> usize {
        let connects = self
            .inner
            .shared
            .iter()
            .map(|slot| self.inner.clone().reconnect(slot.clone()));
        futures_util::future::join_all(connects).await;
        self.connected()
    }

    /// Connected shared slots.
    pub fn connected(&self) -> usize {
        self.inner
            .shared
            .iter()
            .filter(|s| s.is_connected())
            .count()
    }

    /// `(idle, in_use)`: connected connections (the workers' own and the shared ones)
    /// without and with a command in flight.
    pub fn usage(&self) -> (usize, usize) {
        let own = self.inner.local.iter().filter_map(|own| own.slot.as_ref());
        self.inner
            .shared
            .iter()
            .chain(own)
            .fold((0, 0), |(idle, busy), slot| {
                match (
                    slot.is_connected(),
                    slot.in_flight.load(Ordering::Relaxed) > 0,
                ) {
                    (true, true) => (idle, busy + 1),
                    (true, false) => (idle + 1, busy),
                    (false, _) => (idle, busy),
                }
            })
    }

    /// On an HTTP worker, its own connection if it has one and that is connected (else it
    /// is connected in the background, on the worker); otherwise a shared one; `None` when
    /// none is connected (the caller goes on without the cache rather than wait).
    pub fn lend(&self) -> Option<(MultiplexedConnection, Lent<'_>)> {
        let own = self.inner.local.get_or(|| self.claim());
        if let Some(lent) = own.slot().and_then(|slot| self.try_lend(slot, false)) {
            return Some(lent);
        }
        let shared = &self.inner.shared;
        let start = NEXT.with(|n| {
            let i = n.get();
            n.set(i.wrapping_add(1));
            i
        });
        // The next shared slot in turn; if it is being replaced, the first connected one
        // after it (so that the first connection made after an outage serves everyone).
        (0..shared.len())
            .map(|k| &shared[start.wrapping_add(k) % shared.len()])
            .find_map(|slot| self.try_lend(slot, true))
    }

    /// This thread's entry: on an HTTP worker, with an own slot while the budget lasts.
    fn claim(&self) -> Own {
        let claimed = on_worker()
            && self
                .inner
                .unclaimed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
        Own {
            thread: AtomicU64::new(THREAD.with(|id| *id)),
            slot: claimed.then(|| Arc::new(Slot::empty())),
        }
    }

    /// A clone of `slot`'s connection; if it has none, a new one is made in the background.
    fn try_lend<'a>(
        &'a self,
        slot: &'a Arc<Slot>,
        shared: bool,
    ) -> Option<(MultiplexedConnection, Lent<'a>)> {
        let current = slot.conn.read().ok().and_then(|c| c.clone());
        match current {
            Some((generation, conn)) => {
                slot.in_flight.fetch_add(1, Ordering::Relaxed);
                let lent = Lent {
                    slot,
                    shared,
                    generation,
                };
                Some((conn, lent))
            }
            None => {
                self.spawn_reconnect(slot, shared);
                None
            }
        }
    }

    /// The command on `lent` failed or timed out: drop that connection (unless it was
    /// already replaced) and make a new one in the background.
    pub fn discard(&self, lent: &Lent<'_>) {
        if let Ok(mut conn) = lent.slot.conn.write()
            && conn.as_ref().is_some_and(|(g, _)| *g == lent.generation)
        {
            *conn = None;
        }
        self.spawn_reconnect(lent.slot, lent.shared);
    }

    /// Connects `slot` in the background: a shared one on the main runtime, a worker's own
    /// on the worker (a current-thread runtime), where its driver task then runs too.
    fn spawn_reconnect(&self, slot: &Arc<Slot>, shared: bool) {
        if slot.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let connect = self.inner.clone().reconnect(slot.clone());
        if shared {
            self.inner.main.spawn(connect);
        } else {
            tokio::spawn(connect);
        }
    }
}

/// Whether this thread runs a current-thread runtime: an actix worker, whose tasks (and a
/// connection's driver spawned from one) all stay on it. Other tasks run on the main
/// multi-thread runtime and use the shared connections.
fn on_worker() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

impl Inner {
    async fn reconnect(self: Arc<Self>, slot: Arc<Slot>) {
        slot.reconnecting.store(true, Ordering::Release);
        let made = tokio::time::timeout(self.connect_timeout, self.factory.get()).await;
        if let Ok(Ok(conn)) = made {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut current) = slot.conn.write() {
                *current = Some((generation, deadpool_redis::Connection::take(conn)));
            }
        }
        slot.reconnecting.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_without_touching_the_json() {
        let json = Bytes::from_static(br#"{"id":7,"name":"a b c"}"#);
        let entry = Entry {
            value: Cached::Item(ItemJson {
                version: 12,
                json: json.clone(),
            }),
            fresh_until_ms: 1_764_000_000_123,
        };
        let decoded = Entry::decode(Bytes::from(entry.encode()));
        assert_eq!(decoded, Some(entry));
        let not_found = Entry {
            value: Cached::NotFound,
            fresh_until_ms: 5,
        };
        assert_eq!(
            Entry::decode(Bytes::from(not_found.encode())),
            Some(not_found)
        );
    }

    #[test]
    fn foreign_values_decode_as_misses() {
        for raw in [&b""[..], b"X", b"I12", b"I12 x {}", b"N", b"Nx"] {
            assert_eq!(Entry::decode(Bytes::copy_from_slice(raw)), None, "{raw:?}");
        }
    }
}
