//! A circuit breaker in front of Redis, so that a dead or frozen Redis costs each request
//! nothing rather than a full `REDIS_TIMEOUT_MS`.
//!
//! Closed: every call goes through; `OPEN_AFTER` consecutive failures open it. Open: calls
//! fail at once, without touching Redis, for `COOL_DOWN`. Then half-open: one call (the
//! probe) goes through; success closes the breaker, failure opens it again. Lock-free: the
//! hot path reads one atomic.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

    pub fn is_open(&self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
