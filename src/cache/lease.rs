//! Fleet-wide coalescing of loads: a short lease per cold id, in Redis (the fill lock of
//! Facebook's memcache leases and of Shopify's identity_cache).
//!
//! Coalescing in `items::service` is per instance: a cold id read on three instances costs
//! three Postgres queries. With leases, the instance whose load of an id comes first takes
//! `{prefix}lease:{id}` (`SET NX PX`), loads and fills; the others, finding the lease taken,
//! wait for the fill by polling the entry and the lease (one `MGET` per poll), and load
//! themselves when the lease is gone without an entry (the holder's fill was refused or its
//! load failed) or after [`LEASE_WAIT`]. A holder that dies leaves a lease that expires after
//! [`LEASE_TTL`].
//!
//! The lease changes who loads, never what may be filled: every fill is still stamp-checked
//! (`redis::FILL_SCRIPT`), and a write's invalidation drops the lease with the entry
//! (`redis::INVALIDATE_SCRIPT`), so readers that start after a write never wait for a load
//! that began before it. Redis failing: no lease, and each instance loads as without one.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{Script, Value};
use rand::Rng;

use crate::cache::{Cache, CacheError, Entry, entry_of};
use crate::items::model::ItemId;
use crate::metrics::CacheOp;

/// How long a lease lives if its holder never releases it (it died, or Redis lost the
/// release): a load takes milliseconds; a waiter stops waiting after [`LEASE_WAIT`] anyway.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

/// How long a reader waits for another instance's fill before it loads itself: a bound on
/// what a slow or dead holder costs the readers behind it.
pub const LEASE_WAIT: Duration = Duration::from_secs(1);

/// Takes each lease that is free, unless the id's entry is fresh already: a load that
/// missed the cache just before another instance filled it must not take the lease the
/// filler has just released and load again (it is told "not taken", and its first poll
/// finds the entry).
///
/// KEYS: lease, entry pairs. ARGV: token, ttl_ms, and the freshness an entry must exceed to
/// make the load needless (now for a miss; for a background refresh, the freshness of the
/// entry it would renew). Returns 1 (taken) or 0 (held by
/// another load, or filled) for each pair.
const ACQUIRE_SCRIPT: &str = r"
local taken = {}
for i = 1, #KEYS, 2 do
  local entry = redis.call('GET', KEYS[i + 1])
  local fresh_until = entry and (string.match(entry, '^I%d+ (%-?%d+)') or string.match(entry, '^N (%-?%d+)'))
  if fresh_until and tonumber(fresh_until) > tonumber(ARGV[3]) then
    taken[#taken + 1] = 0
  elseif redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    taken[#taken + 1] = 1
  else
    taken[#taken + 1] = 0
  end
end
return taken
";

/// Releases each lease still held with the token. KEYS: lease keys. ARGV: token.
const RELEASE_SCRIPT: &str = r"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return 1
";

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_SCRIPT));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SCRIPT));

/// A load's lease token: random, so that a holder whose lease expired and was taken by
/// another load cannot release the other's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl LeaseToken {
    pub fn new() -> LeaseToken {
        LeaseToken(format!("{:016x}", rand::rng().random::<u64>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        LeaseToken::new()
    }
}

/// What one poll saw of a leased id: its entry, if filled, and whether the lease is still
/// held.
#[derive(Debug, Clone)]
pub struct Polled {
    pub entry: Option<Entry>,
    pub leased: bool,
}

impl Cache {
    /// Takes the lease on each of `ids` that no other load holds and whose entry is not
    /// fresh past `outdated_ms`: one script call (one per slot with a cluster). `true` for
    /// each id whose lease this load now holds.
    pub async fn acquire_leases(
        &self,
        ids: &[ItemId],
        token: &LeaseToken,
        outdated_ms: i64,
    ) -> Result<Vec<bool>, CacheError> {
        let taken = self
            .per_slot(
                ids,
                |&id| self.keys.lease(id),
                |group| async move {
                    let mut invocation = ACQUIRE.prepare_invoke();
                    for &&id in &group {
                        invocation.key(self.keys.lease(id)).key(self.keys.entry(id));
                    }
                    invocation
                        .arg(token.as_str())
                        .arg(LEASE_TTL.as_millis() as u64)
                        .arg(outdated_ms);
                    let slot = self.slot_of(|| self.keys.lease(*group[0]));
                    self.invoke::<Vec<i64>>(CacheOp::Lease, slot, &invocation)
                        .await
                },
            )
            .await?;
        Ok(taken.into_iter().map(|t| t == 1).collect())
    }

    /// Releases the leases a load holds when it will not fill (its read failed); a fill
    /// releases its own (`redis::FILL_SCRIPT`).
    pub async fn release_leases(
        &self,
        ids: &[ItemId],
        token: &LeaseToken,
    ) -> Result<(), CacheError> {
        self.per_slot(
            ids,
            |&id| self.keys.lease(id),
            |group| async move {
                let mut invocation = RELEASE.prepare_invoke();
                for &&id in &group {
                    invocation.key(self.keys.lease(id));
                }
                invocation.arg(token.as_str());
                let slot = self.slot_of(|| self.keys.lease(*group[0]));
                self.invoke::<i64>(CacheOp::Lease, slot, &invocation)
                    .await?;
                Ok(vec![(); group.len()])
            },
        )
        .await?;
        Ok(())
    }

    /// The entry and the lease of each of `ids`, in order: one `MGET`.
    pub async fn poll_leased(&self, ids: &[ItemId]) -> Result<Vec<Polled>, CacheError> {
        let mut cmd = ::redis::cmd("MGET");
        for &id in ids {
            cmd.arg(self.keys.entry(id)).arg(self.keys.lease(id));
        }
        let slot = match ids {
            [id] => self.slot_of(|| self.keys.entry(*id)),
            _ => None,
        };
        match self.run_in(CacheOp::Lease, slot, &cmd).await? {
            Value::Array(values) if values.len() == ids.len() * 2 => {
                let mut values = values.into_iter();
                let mut polled = Vec::with_capacity(ids.len());
                while let (Some(entry), Some(lease)) = (values.next(), values.next()) {
                    polled.push(Polled {
                        entry: entry_of(entry),
                        leased: !matches!(lease, Value::Nil),
                    });
                }
                Ok(polled)
            }
            _ => Err(CacheError::UnexpectedReply("MGET")),
        }
    }
}
