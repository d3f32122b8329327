//! Freshness without miss storms (issue 14): when a hit should refresh its entry in the
//! background, decided per hit. The service runs the refreshes (coalesced and stamp-guarded
//! like every load); this module only judges.
//!
//! - **Early refresh (XFetch).** Entries filled together expire together; jitter only
//!   spreads the storm. Following Vattani, Chierichetti and Lowenstein ("Optimal
//!   Probabilistic Cache Stampede Prevention", VLDB 2015), a hit on a fresh entry refreshes
//!   it early when `now − Δ·β·ln(U) ≥ expiry`, `U` uniform in (0, 1], `Δ` the time its load
//!   took (kept in the entry): rarely while expiry is far, almost surely in its last few
//!   `Δ`, and sooner for entries that are slow to load. `β = 1`, the paper's optimum.
//! - **Stale-while-revalidate.** For `CACHE_SWR_SECS` past freshness, a hit still answers
//!   from the entry and one background refresh runs, so a popular entry's expiry costs
//!   no reader a miss.
//!
//! Neither serves an entry a write has invalidated: a write deletes the entry (and
//! replaces the stamp, so no refresh that read before it can fill), so there is nothing to
//! serve; what is served is what the last fill stored, no older than an acknowledged write.

use std::time::Duration;

use rand::Rng;

use crate::cache::Entry;

/// `β` of XFetch: 1 is optimal in the paper's model; above 1 refreshes earlier.
const BETA: f64 = 1.0;

/// What a hit should do about its entry's freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fresh: answer, nothing more.
    Fresh,
    /// Fresh, but close enough to expiry (for how slow it is to load): answer, and refresh
    /// in the background.
    RefreshEarly,
    /// Past freshness, within `CACHE_SWR_SECS`: answer, and refresh in the background.
    Revalidate,
    /// Past that: a miss.
    Expired,
}

/// The early-refresh and stale-while-revalidate policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub stale_while_revalidate: Duration,
}

impl Policy {
    pub fn judge(&self, entry: &Entry, now_ms: i64) -> Verdict {
        self.judge_with(
            entry,
            now_ms,
            rand::rng().random_range(f64::MIN_POSITIVE..=1.0),
        )
    }

    /// [`Policy::judge`] with the uniform draw `u` in (0, 1] given (tests).
    fn judge_with(&self, entry: &Entry, now_ms: i64, u: f64) -> Verdict {
        if entry.is_fresh(now_ms) {
            let delta = f64::from(entry.load_ms);
            if delta > 0.0 && now_ms as f64 - delta * BETA * u.ln() >= entry.fresh_until_ms as f64 {
                Verdict::RefreshEarly
            } else {
                Verdict::Fresh
            }
        } else if now_ms < entry.fresh_until_ms + self.stale_while_revalidate.as_millis() as i64 {
            Verdict::Revalidate
        } else {
            Verdict::Expired
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cached;

    fn entry(fresh_until_ms: i64, load_ms: u32) -> Entry {
        Entry {
            value: Cached::NotFound,
            fresh_until_ms,
            load_ms,
        }
    }

    const POLICY: Policy = Policy {
        stale_while_revalidate: Duration::from_secs(10),
    };

    #[test]
    fn far_from_expiry_an_entry_is_fresh_and_close_to_it_refreshes_early() {
        let e = entry(100_000, 10);
        // ln(0.5) ≈ −0.69: refreshes within ~7 ms of expiry.
        assert_eq!(POLICY.judge_with(&e, 90_000, 0.5), Verdict::Fresh);
        assert_eq!(POLICY.judge_with(&e, 99_995, 0.5), Verdict::RefreshEarly);
        // A small draw (ln → −∞) refreshes early further away: the paper's tail...
        assert_eq!(POLICY.judge_with(&e, 99_950, 1e-3), Verdict::RefreshEarly);
        // ...but a draw is a float: ln(U) ≥ −745, so a thousand loads' time away, never.
        assert_eq!(
            POLICY.judge_with(&e, 90_000, f64::MIN_POSITIVE),
            Verdict::Fresh
        );
        // No load time kept: never early.
        assert_eq!(
            POLICY.judge_with(&entry(100_000, 0), 99_999, 1e-300),
            Verdict::Fresh
        );
    }

    #[test]
    fn past_freshness_it_revalidates_for_the_window_then_expires() {
        let e = entry(100_000, 10);
        assert_eq!(POLICY.judge_with(&e, 100_000, 0.5), Verdict::Revalidate);
        assert_eq!(POLICY.judge_with(&e, 109_999, 0.5), Verdict::Revalidate);
        assert_eq!(POLICY.judge_with(&e, 110_000, 0.5), Verdict::Expired);
        let none = Policy {
            stale_while_revalidate: Duration::ZERO,
        };
        assert_eq!(none.judge_with(&e, 100_000, 0.5), Verdict::Expired);
    }

    #[test]
    fn the_chance_of_refreshing_early_grows_towards_expiry() {
        let e = entry(1_000_000, 100);
        let share = |now| {
            let draws = 10_000;
            (1..=draws)
                .filter(|k| {
                    POLICY.judge_with(&e, now, f64::from(*k) / f64::from(draws))
                        == Verdict::RefreshEarly
                })
                .count()
        };
        // P(early) = exp(−(expiry − now)/Δ): ~0 at 10 Δ, ~37 % at 1 Δ, ~90 % at 0.1 Δ.
        assert!(share(999_000) < 10);
        assert!((3500..3900).contains(&share(999_900)));
        assert!(share(999_990) > 8900);
    }
}
