//! Request coalescing: one Postgres load per id per instance at a time; concurrent readers
//! of the same id wait for it and share its result (contract behaviour 4).
//!
//! A load may cover many ids (a batch read's misses are one `= ANY` query): the caller
//! leads the ids nobody is loading yet and follows the ones already in flight. If a leader
//! goes away without an answer (its request was cancelled), its followers take over.
//!
//! Each load carries a tag (the service uses the write stamp its leader noted); a caller
//! joins only a load with its own tag, and otherwise starts a newer one that later callers
//! join instead. So a load that began before a write never answers a read begun after it.
//!
//! A finished load may linger for a moment (when its tag allows): a reader that missed
//! the cache just before the load filled it, but asks just after the load finished, takes
//! its answer instead of querying again. Equal tags make that as correct as joining.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// In-flight loads keyed by `K`, tagged with a `T`, each ending in a `V` shared with
/// every waiter.
pub struct Flights<K, T, V> {
    // A std Mutex: held only to look up or insert, never across an `.await`.
    inflight: Mutex<Inflight<K, T, V>>,
    /// Numbers each registration, so a finished leader unregisters only its own flight.
    next_flight: std::sync::atomic::AtomicU64,
    /// How long a finished load stays joinable, and for which tags.
    linger: Duration,
    lingers: fn(&T, &V) -> bool,
}

struct Inflight<K, T, V> {
    flights: HashMap<K, Flight<T, V>>,
    /// When finished loads were last swept out.
    swept: Instant,
}

/// One registered load: its number, its tag, where its answer will appear, and when it
/// finished (if it lingers).
struct Flight<T, V> {
    number: u64,
    tag: T,
    answer: watch::Receiver<Option<V>>,
    done: Option<Instant>,
}

impl<K, T, V> Default for Flights<K, T, V> {
    fn default() -> Self {
        Flights::new(Duration::ZERO, |_, _| false)
    }
}

impl<K, T, V> Flights<K, T, V> {
    /// Flights whose finished loads stay joinable for `linger` when `lingers(tag, answer)`.
    pub fn new(linger: Duration, lingers: fn(&T, &V) -> bool) -> Self {
        Flights {
            inflight: Mutex::new(Inflight {
                flights: HashMap::new(),
                swept: Instant::now(),
            }),
            next_flight: std::sync::atomic::AtomicU64::new(0),
            linger,
            lingers,
        }
    }
}

/// A key this caller loads, and where it publishes the value.
type Lead<K, V> = (K, watch::Sender<Option<V>>);
/// A key another caller loads, and where its value will appear.
type Follow<K, V> = (K, watch::Receiver<Option<V>>);

type Joined<K, V> = (Vec<Lead<K, V>>, Vec<Follow<K, V>>);

/// What [`Flights::run`] returns: each key's value, and how many keys this caller waited
/// for instead of loading (the `coalesced` count).
pub struct Landed<K, V> {
    pub values: HashMap<K, V>,
    pub coalesced: usize,
}

impl<K, T, V> Flights<K, T, V>
where
    K: Clone + Eq + Hash,
    T: Clone + PartialEq,
    V: Clone,
{
    /// Loads `keys`: `load` is called with the keys no other caller is loading (once, or
    /// again for keys whose leader was cancelled) and returns a value for each of them.
    pub async fn run<F, Fut>(&self, keys: &[K], tag: impl Fn(&K) -> T, load: F) -> Landed<K, V>
    where
        F: Fn(Vec<K>) -> Fut,
        Fut: Future<Output = HashMap<K, V>>,
    {
        let mut values = HashMap::with_capacity(keys.len());
        let mut coalesced = 0;
        let mut pending = keys.to_vec();
        while !pending.is_empty() {
            let flight = self
                .next_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (leading, following) = self.join(&pending, flight, &tag);
            pending.clear();
            if !leading.is_empty() {
                let registered = Registered {
                    flights: self,
                    keys: leading.iter().map(|(key, _)| key.clone()).collect(),
                    flight,
                };
                let loaded = load(registered.keys.clone()).await;
                // Finish before publishing: a caller arriving from now on starts a new load
                // (which reads what was committed after this one), unless this one lingers.
                registered.finish(&loaded);
                for (key, tx) in leading {
                    if let Some(value) = loaded.get(&key) {
                        tx.send_replace(Some(value.clone()));
                        values.insert(key, value.clone());
                    }
                }
            }
            for (key, mut rx) in following {
                let answered = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                match answered {
                    Some(value) => {
                        coalesced += 1;
                        values.insert(key, value);
                    }
                    // The leader was cancelled before it answered: load it ourselves.
                    None => pending.push(key),
                }
            }
        }
        Landed { values, coalesced }
    }

    /// Splits `keys` into those this caller must load (now registered as in flight) and
    /// those another caller is loading.
    fn join(&self, keys: &[K], number: u64, tag: &impl Fn(&K) -> T) -> Joined<K, V> {
        let mut leading = Vec::new();
        let mut following = Vec::new();
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if !self.linger.is_zero() && inflight.swept.elapsed() > self.linger {
            let linger = self.linger;
            inflight
                .flights
                .retain(|_, f| f.done.is_none_or(|done| done.elapsed() < linger));
            inflight.swept = Instant::now();
        }
        for key in keys {
            let key = key.clone();
            let tag = tag(&key);
            match inflight.flights.get(&key) {
                Some(flight)
                    if flight.tag == tag
                        && flight.done.is_none_or(|done| done.elapsed() < self.linger) =>
                {
                    following.push((key, flight.answer.clone()))
                }
                // None in flight, or one begun before a write we know of: start a newer one.
                _ => {
                    let (tx, rx) = watch::channel(None);
                    let flight = Flight {
                        number,
                        tag,
                        answer: rx,
                        done: None,
                    };
                    inflight.flights.insert(key.clone(), flight);
                    leading.push((key, tx));
                }
            }
        }
        (leading, following)
    }

    /// Lets the next caller for `key` start a new load instead of joining the one in
    /// flight: after a write, a load that began before it must not answer later readers.
    pub fn forget(&self, key: &K) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flights
            .remove(key);
    }

    /// [`Flights::forget`] for every key (after a truncate).
    pub fn forget_all(&self) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flights
            .clear();
    }
}

/// The keys a leader registered; unregistered when it finishes (or marked finished, if
/// they linger) or when it is dropped mid-load, so that a cancelled request never leaves
/// an id "in flight" forever.
struct Registered<'a, K: Eq + Hash, T, V> {
    flights: &'a Flights<K, T, V>,
    keys: Vec<K>,
    flight: u64,
}

impl<K: Eq + Hash, T, V> Registered<'_, K, T, V> {
    fn finish(mut self, loaded: &HashMap<K, V>) {
        // Take the keys: the `Drop` below then has nothing left to unregister.
        let keys = std::mem::take(&mut self.keys);
        let flights = self.flights;
        let mut inflight = flights.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for key in &keys {
            // Only our own registration: a newer flight may have taken the key.
            if let Some(f) = inflight
                .flights
                .get_mut(key)
                .filter(|f| f.number == self.flight)
            {
                let lingers = loaded
                    .get(key)
                    .is_some_and(|v| (flights.lingers)(&f.tag, v));
                if !flights.linger.is_zero() && lingers {
                    f.done = Some(Instant::now());
                } else {
                    inflight.flights.remove(key);
                }
            }
        }
    }
}

impl<K: Eq + Hash, T, V> Drop for Registered<'_, K, T, V> {
    fn drop(&mut self) {
        let mut inflight = self
            .flights
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if inflight
                .flights
                .get(key)
                .is_some_and(|f| f.number == self.flight)
            {
                inflight.flights.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Lets every spawned task run up to its first wait (the tests run on tokio's
    /// current-thread runtime, where this is deterministic).
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flights = Arc::new(Flights::<u32, (), u32>::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let (release, gate) = watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (flights, loads, gate) = (flights.clone(), loads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(
                        &[1, 2],
                        |_| (),
                        |keys| {
                            loads.fetch_add(1, Ordering::SeqCst);
                            let mut gate = gate.clone();
                            async move {
                                let _ = gate.wait_for(|open| *open).await;
                                keys.into_iter().map(|k| (k, k * 10)).collect()
                            }
                        },
                    )
                    .await
            }));
        }
        settle().await;
        let _ = release.send(true);
        let mut coalesced = 0;
        for task in tasks {
            let landed = task.await.expect("task");
            assert_eq!(landed.values.get(&2), Some(&20));
            coalesced += landed.coalesced;
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "one load for all ten callers"
        );
        assert_eq!(coalesced, 18, "nine callers waited for both keys");
    }

    #[tokio::test]
    async fn a_cancelled_leader_hands_over() {
        let flights = Arc::new(Flights::<u32, (), u32>::default());
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(
                        &[7],
                        |_| (),
                        |_| async { std::future::pending::<HashMap<u32, u32>>().await },
                    )
                    .await
            })
        };
        settle().await;
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let follower = {
            let (flights, aborted) = (flights.clone(), aborted.clone());
            tokio::spawn(async move {
                flights
                    .run(
                        &[7],
                        |_| (),
                        |keys| {
                            // Loading only once the leader is gone: it waited for it first.
                            let joined = aborted.load(Ordering::SeqCst);
                            async move { keys.into_iter().map(|k| (k, u32::from(joined))).collect() }
                        },
                    )
                    .await
            })
        };
        settle().await;
        aborted.store(true, Ordering::SeqCst);
        leader.abort();
        let landed = follower.await.expect("follower");
        assert_eq!(
            landed.values.get(&7),
            Some(&1),
            "the follower joined the leader's load, then loaded itself once it was cancelled"
        );
    }

    #[tokio::test]
    async fn a_finished_load_lingers_only_for_its_own_tag() {
        let flights = Flights::<u32, u32, u32>::new(Duration::from_secs(60), |_, _| true);
        let loads = AtomicUsize::new(0);
        let load = |keys: Vec<u32>| {
            loads.fetch_add(1, Ordering::SeqCst);
            async move { keys.into_iter().map(|k| (k, k)).collect() }
        };
        flights.run(&[1], |_| 5, load).await;
        let again = flights.run(&[1], |_| 5, load).await;
        assert_eq!(
            (loads.load(Ordering::SeqCst), again.coalesced),
            (1, 1),
            "same tag: reused"
        );
        flights.run(&[1], |_| 6, load).await;
        assert_eq!(loads.load(Ordering::SeqCst), 2, "another tag: loaded again");
        flights.forget(&1);
        flights.run(&[1], |_| 6, load).await;
        assert_eq!(loads.load(Ordering::SeqCst), 3, "forgotten: loaded again");
    }
}
