//! Which thread is an HTTP worker, and the budget of connections each worker may own.
//!
//! An actix worker runs a current-thread runtime: its tasks, and the driver task of a
//! connection made on it, all stay on it. A connection made on the worker that uses it
//! costs no hop to another thread and back per command (`cache::connections` for Redis,
//! `db::pools` for Postgres). Other tasks run on the main multi-thread runtime, which
//! outlives every worker, and use shared connections made there.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Whether this thread runs a current-thread runtime: an actix worker.
pub fn on_worker() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// A number for this thread, never reused (unlike `thread_local`'s ids, which a new
    /// thread inherits from a dead one: an actix worker that panicked is replaced).
    static THREAD: u64 = THREADS.fetch_add(1, Ordering::Relaxed);
}

/// This thread's number, never reused.
pub fn thread_number() -> u64 {
    THREAD.with(|id| *id)
}

/// How many workers may still claim something of their own.
pub struct Budget(AtomicUsize);

impl Budget {
    pub fn new(claims: usize) -> Budget {
        Budget(AtomicUsize::new(claims))
    }

    /// On an HTTP worker, takes one claim if any is left; elsewhere, never.
    pub fn claim(&self) -> bool {
        on_worker()
            && self
                .0
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
    }
}
