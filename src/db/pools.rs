//! A Postgres server's connections: each HTTP worker's own, and shared ones.
//!
//! A connection's driver task (which writes queries and reads replies) runs on the runtime
//! that made the connection. Made on the main runtime, every query from a worker hops to
//! another thread and back: the miss path paid two thread wake-ups per statement. So, as
//! for Redis (`cache::connections`), each HTTP worker gets a small pool of its own, made on
//! the worker on first use, and its requests take from it first; the rest of the budget is
//! a shared pool made on the main runtime, for tasks that run there (replica tracking's
//! position polls) and for a worker whose own stay lent out for longer than a short wait.
//! Tasks a worker spawns (background refreshes, the staleness checker's re-reads) run on
//! that worker and use its own. The change feed has connections of its own.
//!
//! Shutdown stays safe (the reason shared connections are made on the main runtime, see
//! `db`): a worker's own connections are used only by tasks on that worker, so when actix
//! ends an idle worker's runtime, no busy worker loses a connection's driver with it.

use std::time::Duration;

use deadpool::managed::{TimeoutType, Timeouts};
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::deadpool::{Object, PoolError};
use thread_local::ThreadLocal;

use super::{DbSetupError, POOL_CREATE_TIMEOUT, PgPool};
use crate::workers::{self, Budget};

/// The shared pool keeps at least this many connections, and an eighth of the budget: the
/// overflow of busy workers, and tasks on the main runtime, take theirs from it.
const SHARED_AT_LEAST: usize = 2;

/// A worker waits this long for one of its own connections (a statement takes well under a
/// millisecond) before it takes a shared one, with the shared pool's wait. Taking a shared
/// one at once cost the BYPASS bench (16 connections over 2 workers of 7 own connections
/// each) 12 % of the service's CPU on the main runtime's threads, the hop back.
const OWN_FIRST: Timeouts = Timeouts {
    wait: Some(Duration::from_millis(10)),
    create: Some(POOL_CREATE_TIMEOUT),
    recycle: Some(POOL_CREATE_TIMEOUT),
};

/// A worker's own pool, with the thread it was made on: `thread_local` hands a dead
/// thread's entry to a new thread (an actix worker that panicked is replaced), whose
/// connections' drivers died with the old runtime; such an entry is not used.
struct Own {
    thread: u64,
    pool: Option<PgPool>,
}

pub struct Pools {
    url: String,
    /// The budget: connections of all pools together, at most.
    size: usize,
    shared: PgPool,
    own_size: usize,
    unclaimed: Budget,
    own: ThreadLocal<Own>,
}

/// Connections of all the pools together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

impl Pools {
    /// `size` connections in all: `own` for each of `workers` HTTP workers, the rest
    /// shared. Too small a budget to give every worker two and keep the shared floor: all
    /// shared. Call it on the main runtime.
    pub fn new(url: &str, size: usize, workers: usize) -> Result<Pools, DbSetupError> {
        let size = size.max(1);
        let shared_floor = SHARED_AT_LEAST.max(size / 8);
        let own_size = size.saturating_sub(shared_floor) / workers.max(1);
        let (own_size, workers) = if own_size >= 2 {
            (own_size, workers)
        } else {
            (0, 0)
        };
        Ok(Pools {
            url: url.to_owned(),
            size,
            shared: super::pool(url, size - own_size * workers, true)?,
            own_size,
            unclaimed: Budget::new(workers),
            own: ThreadLocal::new(),
        })
    }

    /// A connection: on an HTTP worker its own if one is free (or can be made) within
    /// [`OWN_FIRST`]'s wait, else a shared one, waiting for it at most the pool's wait
    /// timeout. An own connection that could not be made is the answer (the shared pool
    /// would try the same server again, and a hanging one would cost the wait twice).
    pub async fn get(&self) -> Result<Object<AsyncPgConnection>, PoolError> {
        if let Some(own) = self.own_pool() {
            match own.timeout_get(&OWN_FIRST).await {
                Err(PoolError::Timeout(TimeoutType::Wait)) => {}
                made_or_failed => return made_or_failed,
            }
        }
        self.shared.get().await
    }

    /// This worker's own pool, made on first use while the budget lasts.
    fn own_pool(&self) -> Option<&PgPool> {
        if self.own_size == 0 {
            return None;
        }
        let own = self.own.get_or(|| Own {
            thread: workers::thread_number(),
            pool: self
                .unclaimed
                .claim()
                .then(|| super::pool(&self.url, self.own_size, false).ok())
                .flatten(),
        });
        own.pool
            .as_ref()
            .filter(|_| own.thread == workers::thread_number())
    }

    /// Connections of all pools together, at most.
    pub fn max_size(&self) -> usize {
        self.size
    }

    /// The shared pool, for tasks that run on the main runtime (replica tracking).
    pub fn shared(&self) -> &PgPool {
        &self.shared
    }

    /// Every pool's connections, added up.
    pub fn status(&self) -> Status {
        let own = self.own.iter().filter_map(|own| own.pool.as_ref());
        std::iter::once(&self.shared)
            .chain(own)
            .map(|pool| pool.status())
            .fold(Status::default(), |sum, s| Status {
                size: sum.size + s.size,
                available: sum.available + s.available,
                waiting: sum.waiting + s.waiting,
            })
    }

    /// Closes every pool, at shutdown.
    pub fn close(&self) {
        self.shared.close();
        for own in self.own.iter() {
            if let Some(pool) = &own.pool {
                pool.close();
            }
        }
    }
}
