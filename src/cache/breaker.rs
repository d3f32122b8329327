//! A circuit breaker in front of Redis, so that a dead or frozen Redis costs each request
//! nothing rather than a full `REDIS_TIMEOUT_MS`.
//!
//! Closed: every call goes through; `OPEN_AFTER` consecutive failures open it. Open: calls
//! fail at once, without touching Redis, for `COOL_DOWN`. Then half-open: one call (the
//! probe) goes through; success closes the breaker, failure opens it again. Lock-free: the
//! hot path reads one atomic.
//!
//! With a Redis Cluster there is one breaker per shard as well ([`Breakers`]): a call whose
//! keys share a slot goes through the breaker of the shard serving that slot, so a master
//! that fails sends its own slots' reads to Postgres and no others. Calls over many slots
//! (batches, stamps of many ids) and calls before the first reading of the cluster's shards
//! go through the whole cluster's breaker, as with one Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ::redis::cluster_routing::Slot;

/// Consecutive failures that open the breaker: enough that one slow reply or one dropped
/// connection does not turn the cache off, few enough that an outage costs a handful of
/// requests one deadline each.
pub const OPEN_AFTER: u32 = 5;
/// How long the breaker stays open before a probe: short, so caching resumes within about
/// a second of Redis answering again.
pub const COOL_DOWN: Duration = Duration::from_millis(500);

pub struct Breaker {
    failures: AtomicU32,
    /// Microseconds since `epoch` until which the breaker is open; 0 when closed.
    open_until: AtomicI64,
    probing: AtomicBool,
    epoch: Instant,
}

/// Whether a call may go to Redis, and if so whether it is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Call,
    Probe,
    Refused,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicI64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }
}

impl Breaker {
    fn now(&self) -> i64 {
        self.epoch.elapsed().as_micros() as i64
    }

    pub fn permit(&self) -> Permit {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Permit::Call;
        }
        if self.now() < until {
            return Permit::Refused;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Permit::Probe,
            Err(_) => Permit::Refused,
        }
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    pub fn succeeded(&self, permit: Permit) {
        self.failures.store(0, Ordering::Relaxed);
        if permit == Permit::Probe || self.is_open() {
            if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                tracing::info!("redis answers again: cache circuit closed");
            }
            self.probing.store(false, Ordering::Release);
        }
    }

    pub fn failed(&self, permit: Permit) {
        match permit {
            Permit::Probe => {
                self.open_until
                    .store(self.now() + COOL_DOWN.as_micros() as i64, Ordering::Release);
                self.probing.store(false, Ordering::Release);
            }
            Permit::Call => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= OPEN_AFTER && !self.is_open() {
                    tracing::warn!(
                        failures,
                        "redis is failing: cache circuit open, reads go to postgres"
                    );
                    self.open_until
                        .store(self.now() + COOL_DOWN.as_micros() as i64, Ordering::Release);
                }
            }
            Permit::Refused => {}
        }
    }
}

/// The breakers in front of Redis: one for the whole of it, and with a cluster one per
/// shard (see the module docs).
#[derive(Default)]
pub struct Breakers {
    whole: Breaker,
    shards: RwLock<Arc<Shards>>,
}

/// A cluster's shards as last read: each one's slot ranges and breaker, and the shard of
/// each slot.
#[derive(Default)]
struct Shards {
    ranges: Vec<Vec<(u16, u16)>>,
    breakers: Vec<Arc<Breaker>>,
    of_slot: HashMap<Slot, usize>,
}

impl Breakers {
    /// The breaker for calls over many slots, and for everything with one Redis.
    pub fn whole(&self) -> &Breaker {
        &self.whole
    }

    /// The breaker of the shard serving `slot`; `None` for a call over many slots (or with
    /// one Redis) and while the cluster's shards are not known: then [`Breakers::whole`].
    pub fn of_slot(&self, slot: Option<Slot>) -> Option<Arc<Breaker>> {
        let slot = slot?;
        let shards = self.shards.read().ok()?;
        shards
            .of_slot
            .get(&slot)
            .map(|&i| shards.breakers[i].clone())
    }

    /// Takes a reading of the cluster's shards: each one's slot ranges (`CLUSTER SHARDS`).
    /// A shard whose ranges are unchanged keeps its breaker, open or not: a failover changes
    /// its master, not its slots, and the next probe finds the new master.
    pub fn set_shards(&self, mut ranges: Vec<Vec<(u16, u16)>>) {
        for shard in &mut ranges {
            shard.sort_unstable();
        }
        ranges.retain(|shard| !shard.is_empty());
        ranges.sort_unstable();
        let current = self.shards.read().map(|s| s.clone()).ok();
        let Some(current) = current else { return };
        if current.ranges == ranges {
            return;
        }
        let breakers: Vec<Arc<Breaker>> = ranges
            .iter()
            .map(|shard| {
                current
                    .ranges
                    .iter()
                    .position(|known| known == shard)
                    .map_or_else(Default::default, |i| current.breakers[i].clone())
            })
            .collect();
        let of_slot = ranges
            .iter()
            .enumerate()
            .flat_map(|(i, shard)| {
                shard
                    .iter()
                    .flat_map(|&(low, high)| low..=high)
                    .filter_map(Slot::new)
                    .map(move |slot| (slot, i))
            })
            .collect();
        if let Ok(mut shards) = self.shards.write() {
            *shards = Arc::new(Shards {
                ranges,
                breakers,
                of_slot,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(breaker: &Breaker) {
        for _ in 0..OPEN_AFTER {
            breaker.failed(Permit::Call);
        }
    }

    #[test]
    fn a_shards_breaker_serves_its_own_slots_and_survives_a_failover() {
        let breakers = Breakers::default();
        let slot = |n| Slot::new(n).unwrap();
        assert!(breakers.of_slot(Some(slot(7))).is_none(), "not known yet");
        breakers.set_shards(vec![vec![(0, 99), (200, 299)], vec![(100, 199)]]);
        let first = breakers.of_slot(Some(slot(250))).unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &breakers.of_slot(Some(slot(0))).unwrap()
        ));
        let second = breakers.of_slot(Some(slot(150))).unwrap();
        open(&first);
        assert_eq!(first.permit(), Permit::Refused);
        assert_eq!(second.permit(), Permit::Call, "the other shard is closed");
        assert_eq!(breakers.whole().permit(), Permit::Call);
        assert!(
            breakers.of_slot(None).is_none(),
            "many slots: the whole one"
        );
        assert!(
            breakers.of_slot(Some(slot(5000))).is_none(),
            "no shard serves it"
        );

        // The same ranges read again (a new master): the open breaker stays open.
        breakers.set_shards(vec![vec![(100, 199)], vec![(200, 299), (0, 99)]]);
        let again = breakers.of_slot(Some(slot(250))).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        // A slot moved (resharding): its shards start closed.
        breakers.set_shards(vec![vec![(0, 150)], vec![(151, 299)]]);
        assert_eq!(
            breakers.of_slot(Some(slot(250))).unwrap().permit(),
            Permit::Call
        );
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_a_good_probe() {
        let breaker = Breaker::default();
        for _ in 0..OPEN_AFTER - 1 {
            breaker.failed(breaker.permit());
        }
        assert_eq!(breaker.permit(), Permit::Call, "not yet");
        breaker.failed(Permit::Call);
        assert_eq!(breaker.permit(), Permit::Refused, "open");
        std::thread::sleep(COOL_DOWN + Duration::from_millis(20));
        assert_eq!(
            breaker.permit(),
            Permit::Probe,
            "one probe after the cool-down"
        );
        assert_eq!(breaker.permit(), Permit::Refused, "only one");
        breaker.succeeded(Permit::Probe);
        assert_eq!(breaker.permit(), Permit::Call, "closed again");
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let breaker = Breaker::default();
        for _ in 0..OPEN_AFTER {
            breaker.failed(Permit::Call);
        }
        std::thread::sleep(COOL_DOWN + Duration::from_millis(20));
        breaker.failed(breaker.permit());
        assert_eq!(breaker.permit(), Permit::Refused);
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::default();
        for _ in 0..OPEN_AFTER - 1 {
            breaker.failed(Permit::Call);
        }
        breaker.succeeded(Permit::Call);
        breaker.failed(Permit::Call);
        assert_eq!(breaker.permit(), Permit::Call);
    }
}
