//! Redis connections: each HTTP worker's own, and shared ones for everything else.
//!
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

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};
use thread_local::ThreadLocal;

use crate::workers::{self, Budget};

/// A connection to one Redis or to a Redis Cluster (`REDIS_CLUSTER_NODES`). Both pipeline
/// concurrent commands and are made to be cloned; a cluster connection routes each command
/// by its keys' slot, follows `MOVED`/`ASK` and refreshes its map of the cluster after a
/// failover, by itself.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// What makes connections: deadpool-redis's pool (used only as a factory, see the module
/// docs) for one Redis, redis-rs's cluster client for a cluster.
pub enum Factory {
    Single(deadpool_redis::Pool),
    Cluster(Box<::redis::cluster::ClusterClient>),
}

impl Factory {
    async fn connect(&self) -> Option<Conn> {
        match self {
            Factory::Single(pool) => pool
                .get()
                .await
                .ok()
                .map(|conn| Conn::Single(deadpool_redis::Connection::take(conn))),
            Factory::Cluster(client) => match client.get_async_connection().await {
                Ok(conn) => Some(Conn::Cluster(conn)),
                Err(e) => {
                    tracing::debug!(error = %e, "redis cluster connection failed");
                    None
                }
            },
        }
    }
}

/// One connection slot: the connection (or none while it is being replaced), which
/// generation it is, and how many commands it has in flight (for the pool gauges).
struct Slot {
    conn: RwLock<Option<(u64, Conn)>>,
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
        let me = workers::thread_number();
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
    factory: Factory,
    /// Each thread's entry, made on its first command: whether it is an HTTP worker (a
    /// current-thread runtime) is decided once, not per command.
    local: ThreadLocal<Own>,
    /// Own connections not claimed yet.
    unclaimed: Budget,
    shared: Box<[Arc<Slot>]>,
    /// The main runtime, where shared connections are made (and so their drivers run).
    main: tokio::runtime::Handle,
    generation: AtomicU64,
    /// Connections made before this generation are replaced ([`Connections::renew`]).
    renew_before: AtomicU64,
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

thread_local! {
    /// Round-robin position over the shared slots, per thread so workers do not contend
    /// on one counter.
    static NEXT: Cell<usize> = const { Cell::new(0) };
}

impl Connections {
    /// `size` connections in all: one of them for each of up to `workers` HTTP workers, the
    /// rest (at least one) shared. Call it on the main runtime.
    pub fn new(
        factory: Factory,
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
                unclaimed: Budget::new(own),
                shared,
                main: tokio::runtime::Handle::current(),
                generation: AtomicU64::new(0),
                renew_before: AtomicU64::new(0),
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
    pub fn lend(&self) -> Option<(Conn, Lent<'_>)> {
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
        let claimed = self.inner.unclaimed.claim();
        Own {
            thread: AtomicU64::new(workers::thread_number()),
            slot: claimed.then(|| Arc::new(Slot::empty())),
        }
    }

    /// Every connection made until now is replaced by a new one, each in the background
    /// on its own thread when it is next lent, and used until then. With a cluster, a new
    /// connection reads the cluster's map of slots afresh (after a failover, see
    /// `feed::replay`).
    pub fn renew(&self) {
        let next = self.inner.generation.load(Ordering::Relaxed);
        self.inner.renew_before.fetch_max(next, Ordering::Relaxed);
    }

    /// A clone of `slot`'s connection; if it has none, a new one is made in the background
    /// (as it is, while it is still lent, for one made before [`Connections::renew`]).
    fn try_lend<'a>(&'a self, slot: &'a Arc<Slot>, shared: bool) -> Option<(Conn, Lent<'a>)> {
        let current = slot.conn.read().ok().and_then(|c| c.clone());
        match current {
            Some((generation, conn)) => {
                if generation < self.inner.renew_before.load(Ordering::Relaxed) {
                    self.spawn_reconnect(slot, shared);
                }
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

impl Inner {
    async fn reconnect(self: Arc<Self>, slot: Arc<Slot>) {
        slot.reconnecting.store(true, Ordering::Release);
        let made = tokio::time::timeout(self.connect_timeout, self.factory.connect()).await;
        if let Ok(Some(conn)) = made {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut current) = slot.conn.write() {
                *current = Some((generation, conn));
            }
        }
        slot.reconnecting.store(false, Ordering::Release);
    }
}
