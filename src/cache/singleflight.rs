//! Request coalescing: one Postgres load per id per instance at a time; concurrent readers
//! of the same id wait for it and share its result (contract behaviour 4).
//!
//! A load may cover many ids (a batch read's misses are one `= ANY` query): the caller
//! leads the ids nobody is loading yet and follows the ones already in flight. If a leader
//! goes away without an answer (its request was cancelled), its followers take over.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

/// In-flight loads keyed by `K`, each ending in a `V` shared with every waiter.
pub struct Flights<K, V> {
    // A std Mutex: held only to look up or insert, never across an `.await`.
    inflight: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            inflight: Mutex::new(HashMap::new()),
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

impl<K, V> Flights<K, V>
where
    K: Copy + Eq + Hash,
    V: Clone,
{
    /// Loads `keys`: `load` is called with the keys no other caller is loading (once, or
    /// again for keys whose leader was cancelled) and returns a value for each of them.
    pub async fn run<F, Fut>(&self, keys: &[K], load: F) -> Landed<K, V>
    where
        F: Fn(Vec<K>) -> Fut,
        Fut: Future<Output = HashMap<K, V>>,
    {
        let mut values = HashMap::with_capacity(keys.len());
        let mut coalesced = 0;
        let mut pending = keys.to_vec();
        while !pending.is_empty() {
            let (leading, following) = self.join(&pending);
            pending.clear();
            if !leading.is_empty() {
                let registered = Registered {
                    flights: self,
                    keys: leading.iter().map(|(key, _)| *key).collect(),
                };
                let loaded = load(registered.keys.clone()).await;
                // Unregister before publishing: a caller arriving from now on starts a new
                // load, which reads what was committed after this one.
                drop(registered);
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
    fn join(&self, keys: &[K]) -> Joined<K, V> {
        let mut leading = Vec::new();
        let mut following = Vec::new();
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for &key in keys {
            match inflight.get(&key) {
                Some(rx) => following.push((key, rx.clone())),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key, rx);
                    leading.push((key, tx));
                }
            }
        }
        (leading, following)
    }
}

/// The keys a leader registered; unregistered when it finishes or is dropped mid-load, so
/// that a cancelled request never leaves an id "in flight" forever.
struct Registered<'a, K: Eq + Hash, V> {
    flights: &'a Flights<K, V>,
    keys: Vec<K>,
}

impl<K: Eq + Hash, V> Drop for Registered<'_, K, V> {
    fn drop(&mut self) {
        let mut inflight = self
            .flights
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            inflight.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flights = Arc::new(Flights::<u32, u32>::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let (release, gate) = watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (flights, loads, gate) = (flights.clone(), loads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(&[1, 2], |keys| {
                        loads.fetch_add(1, Ordering::SeqCst);
                        let mut gate = gate.clone();
                        async move {
                            let _ = gate.wait_for(|open| *open).await;
                            keys.into_iter().map(|k| (k, k * 10)).collect()
                        }
                    })
                    .await
            }));
        }
        tokio::task::yield_now().await;
        let _ = release.send(true);
        let mut coalesced = 0;
        for task in tasks {
            let landed = task.await.expect("task");
            assert_eq!(landed.values.get(&2), Some(&20));
            coalesced += landed.coalesced;
        }
        let loads = loads.load(Ordering::SeqCst);
        assert!(loads >= 1);
        assert_eq!(
            coalesced + loads * 2,
            20,
            "every key either loaded or waited"
        );
    }

    #[tokio::test]
    async fn a_cancelled_leader_hands_over() {
        let flights = Arc::new(Flights::<u32, u32>::default());
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(&[7], |_| async {
                        std::future::pending::<HashMap<u32, u32>>().await
                    })
                    .await
            })
        };
        while flights
            .inflight
            .lock()
            .map(|m| m.is_empty())
            .unwrap_or(true)
        {
            tokio::task::yield_now().await;
        }
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(&[7], |keys| async move {
                        keys.into_iter().map(|k| (k, 70)).collect()
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        leader.abort();
        let landed = follower.await.expect("follower");
        assert_eq!(landed.values.get(&7), Some(&70));
    }
}
