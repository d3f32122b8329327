//! The near cache (L1): entries kept in this process, in front of Redis, so that a hot
//! item's hit costs no round trip (`CACHE_L1_MAX_MB`, `CACHE_L1_TTL_MS`).
//!
//! It holds the decoded [`Entry`] a Redis hit produced (the item's JSON bytes are shared,
//! not copied: a hit answers with them as they are), bounded by bytes (moka's weigher) and
//! by a short life, `CACHE_L1_TTL_MS`.
//!
//! **Invalidation.** Redis tells this instance when an entry key changes
//! (`cache::tracking`: RESP3 client-side caching, `CLIENT TRACKING ON BCAST` on the key
//! prefix): a write on any instance, a fill, an eviction, the change feed's invalidations,
//! a flush. Writes through this instance also evict here directly, after their Redis
//! invalidation and before they answer, so on the writing instance a read that starts after
//! the acknowledgement never sees the old entry. While the tracking connection is down,
//! nothing is served from here, and everything is dropped when it goes down: no entry
//! outlives a gap in the invalidations.
//!
//! **The in-flight race** (lettuce issue 3481): a read gets v1 from Redis, a write
//! replaces it and its invalidation arrives, and only then does the read store v1 here — a
//! stale entry no later invalidation would remove. Each read that may store takes a
//! [`Ticket`] *before* its Redis read; an invalidation of the id (or a flush) voids the
//! tickets taken before it, and a voided ticket stores nothing.
//!
//! **Bound** on other instances: a read there may return the old entry from the write's
//! Redis invalidation until Redis's push reaches it (milliseconds on a LAN), and never
//! longer than `CACHE_L1_TTL_MS` after the entry was stored here (if a push is lost without
//! the connection dropping).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::cache::{Cached, Entry};
use crate::items::model::ItemId;
use crate::metrics::{self, NearEviction};

/// Tickets are kept in this many maps, by id, so that readers of different ids rarely
/// contend on one lock.
const SHARDS: usize = 16;

/// What every entry costs besides the Redis value it holds: moka's bookkeeping. Measured
/// by tests/near_memory.rs (anonymous RSS growth per entry of a process of its own that
/// stores entries through this API, under the binary's allocator, mimalloc) for a cached
/// "not found", which holds nothing else: 358 bytes while the cache grows, 388 once it is
/// full and evicting, when moka's hash table also keeps the slots and tombstones of evicted
/// keys. Counted at the latter: that is where the bound binds.
///
/// By moka 0.12's structures, in mimalloc's size classes, about 290 to 300 of it: the key's
/// `Arc` (24), the hash table's bucket (16) and its share of the slot array (8-byte slots,
/// at most 70 % full: 11 to 23), the `ValueEntry` holding our `Entry` (80), its `EntryInfo`
/// (64), the mutex of its deque-node handles (48), and two deque nodes, access order and
/// write order for the TTL (24 each). The rest we have not attributed (slot arrays and
/// buckets waiting for crossbeam's epoch, partly used allocator pages). Not counted per
/// entry: the doorkeeper's 128 KiB and moka's channels and frequency sketch, a fixed
/// 0.2 MiB or so, and evicted values waiting for the epoch (measured up to 0.9 MiB with
/// 8 KiB items).
///
/// Before it was measured this was 96 and the weigher counted the JSON's length alone: a
/// seeded item (JSON 232 bytes) was weighed 328 bytes and cost 712, so RSS grew by about
/// 2.2 times what the cache counted (bench/results/near.md: +38 MiB for 17.2 MiB counted).
const OVERHEAD: u64 = 390;

/// The control block `bytes` allocates when the Redis value is first shared (the JSON
/// slice `Entry::decode` takes of it): `Shared { buf, cap, ref_cnt }`.
const SHARED: u64 = 24;

/// The doorkeeper's bits (a power of two): 2^20 bits, 128 KiB.
const DOORKEEPER_BITS: usize = 1 << 20;

pub struct Near {
    entries: moka::sync::Cache<ItemId, Entry>,
    /// For each id being read from Redis with a ticket, the newest ticket's number.
    tickets: [Mutex<HashMap<ItemId, u64>>; SHARDS],
    next: AtomicU64,
    /// Whether invalidations are arriving (the tracking connection is up and subscribed).
    live: AtomicBool,
    /// Ids read from Redis once lately (a bit per hash of the id): only an id seen again is
    /// stored, so a read that comes once (a uniform sweep, the long tail) costs no ticket,
    /// no insert and no later eviction. The bench found those costs made a mostly-missing
    /// near cache slower than none.
    seen: Box<[AtomicU64]>,
    /// First sightings since the doorkeeper was last cleared.
    sightings: AtomicU64,
    /// When it was last cleared (Unix ms), and how often it is: an entry's life, so that
    /// "seen again" means "read twice within about the time it would be kept".
    cleared_ms: AtomicI64,
    clear_every_ms: i64,
}

/// A read's right to store what it is about to read from Redis (see the module docs).
/// Dropped without storing (a miss, an error, the read cancelled), it frees its place.
pub struct Ticket<'a> {
    near: &'a Near,
    id: ItemId,
    number: u64,
}

impl Ticket<'_> {
    /// Stores what the read got, unless an invalidation of the id came since the ticket was
    /// taken (or a newer ticket of the same id was taken: that read stores).
    pub fn store(self, entry: &Entry) {
        self.near.store(&self, entry);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.near.release(self);
    }
}

impl Near {
    pub fn new(max_bytes: u64, ttl: Duration) -> Near {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_id: &ItemId, entry: &Entry| weight(entry))
            .time_to_live(ttl)
            .eviction_listener(|_id, _entry, cause| {
                metrics::record_near_eviction(match cause {
                    moka::notification::RemovalCause::Expired => NearEviction::Expired,
                    moka::notification::RemovalCause::Size => NearEviction::Size,
                    moka::notification::RemovalCause::Explicit
                    | moka::notification::RemovalCause::Replaced => NearEviction::Invalidated,
                });
            })
            .build();
        Near {
            entries,
            tickets: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next: AtomicU64::new(1),
            live: AtomicBool::new(false),
            seen: (0..DOORKEEPER_BITS / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
            sightings: AtomicU64::new(0),
            cleared_ms: AtomicI64::new(0),
            clear_every_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1),
        }
    }

    /// Whether `id` was read from Redis lately (then its entry is worth storing); marks it
    /// as read either way. Cleared every entry life (`now_ms` tells), and when half its bits
    /// have been set, so that it forgets what is no longer read and its false "seen" stay
    /// rare.
    pub fn admit(&self, id: ItemId, now_ms: i64) -> bool {
        let cleared = self.cleared_ms.load(Ordering::Relaxed);
        if now_ms - cleared >= self.clear_every_ms
            && self
                .cleared_ms
                .compare_exchange(cleared, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.clear_doorkeeper();
        }
        // Fibonacci hashing: consecutive ids spread over the words.
        let hash = (id.get() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let bit = (hash >> 44) as usize & (DOORKEEPER_BITS - 1);
        let mask = 1u64 << (bit % 64);
        let before = self.seen[bit / 64].fetch_or(mask, Ordering::Relaxed);
        if before & mask != 0 {
            return true;
        }
        if self.sightings.fetch_add(1, Ordering::Relaxed) + 1 >= (DOORKEEPER_BITS / 2) as u64 {
            self.clear_doorkeeper();
        }
        false
    }

    fn clear_doorkeeper(&self) {
        self.sightings.store(0, Ordering::Relaxed);
        for word in &self.seen {
            word.store(0, Ordering::Relaxed);
        }
    }

    fn shard(&self, id: ItemId) -> &Mutex<HashMap<ItemId, u64>> {
        &self.tickets[(id.get() as usize) % SHARDS]
    }

    /// A fresh entry for `id`, if held and invalidations are arriving.
    pub fn get(&self, id: ItemId, now_ms: i64) -> Option<Entry> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let found = self.entries.get(&id).filter(|e| e.is_fresh(now_ms));
        metrics::record_near_lookup(found.is_some());
        found
    }

    /// Taken before reading `id` from Redis; see [`Ticket::store`].
    pub fn ticket(&self, id: ItemId) -> Ticket<'_> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(id)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, number);
        Ticket {
            near: self,
            id,
            number,
        }
    }

    fn store(&self, ticket: &Ticket<'_>, entry: &Entry) {
        // Stored under the shard's lock, which an invalidation of the id takes too: it comes
        // either before (the ticket is void) or after (the entry goes).
        if let Some(_locked) = self.redeem(ticket)
            && self.live.load(Ordering::Acquire)
        {
            self.entries.insert(ticket.id, entry.clone());
        }
    }

    /// A ticket done with (stored or not): frees its place if it still holds it.
    fn release(&self, ticket: &Ticket<'_>) {
        self.redeem(ticket);
    }

    /// Frees `ticket`'s place if it is still the id's newest and no invalidation came since;
    /// then returns the shard's lock, held.
    fn redeem(&self, ticket: &Ticket<'_>) -> Option<MutexGuard<'_, HashMap<ItemId, u64>>> {
        let mut tickets = self
            .shard(ticket.id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (tickets.get(&ticket.id) == Some(&ticket.number)).then(|| {
            tickets.remove(&ticket.id);
            tickets
        })
    }

    /// `id` changed: its entry goes, and reads in flight may not store what they read.
    pub fn invalidate(&self, id: ItemId) {
        let mut tickets = self.shard(id).lock().unwrap_or_else(|p| p.into_inner());
        tickets.remove(&id);
        self.entries.invalidate(&id);
    }

    /// Everything goes (the tracking connection dropped, Redis flushed, a truncate), and
    /// every ticket taken before is void.
    pub fn flush(&self) {
        let mut locked: Vec<_> = self
            .tickets
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        for tickets in &mut locked {
            tickets.clear();
        }
        self.entries.invalidate_all();
    }

    /// Whether invalidations are arriving: set by `cache::tracking`. Going down flushes.
    pub fn set_live(&self, live: bool) {
        if !live {
            self.live.store(false, Ordering::Release);
            self.flush();
        } else {
            self.flush();
            self.live.store(true, Ordering::Release);
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Bytes held (by the weigher), after pending evictions ran; for the gauge.
    pub fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }
}

/// What `entry` costs in memory while the near cache holds it, in bytes (moka's weigher).
///
/// An item's entry holds the whole Redis value its JSON was sliced from (`Entry::decode`
/// copies nothing; redis-rs reads a bulk string into a `Vec` of exactly its length, so what
/// is kept is the value, header included, not a larger read buffer) in the allocator's
/// size class for it, and the `bytes` control block that shares it; then moka's
/// bookkeeping, [`OVERHEAD`]. Measured (tests/near_memory.rs, anonymous RSS per entry),
/// against the weight: a seeded item (Redis value 263 bytes, in a 320-byte block) 712 while
/// the cache grows and 737 when it is full, weighed 734; an item of 8.2 KB (a 10 KiB block)
/// 10,673, weighed 10,654; a cached "not found" 358 and 388, weighed 390. In the binary,
/// under a sweep of 3.5 times what the bound holds, RSS grew by the bound and 0.1 to
/// 2.6 MiB more (bounds of 4 to 32 MiB, 4 KiB pages, against the same process with the
/// near cache off).
///
/// Storing a right-sized copy of the JSON instead would save only the header (about 25
/// bytes, and sometimes a size class) at the price of an allocation and a copy per store.
fn weight(entry: &Entry) -> u32 {
    let value = match &entry.value {
        Cached::Item(item) => {
            let header = redis_header_len(item.version, entry.fresh_until_ms, entry.load_ms);
            let held = header + item.json.len() as u64;
            allocated(held) + SHARED
        }
        Cached::NotFound => 0,
    };
    u32::try_from(value + OVERHEAD).unwrap_or(u32::MAX)
}

/// The length of the header `Entry::encode` writes before an item's JSON:
/// `I<version> <fresh_until_ms>/<load_ms> `.
fn redis_header_len(version: i64, fresh_until_ms: i64, load_ms: u32) -> u64 {
    fn digits(n: i64) -> u64 {
        let sign = u64::from(n < 0);
        sign + n
            .unsigned_abs()
            .checked_ilog10()
            .map_or(1, |d| u64::from(d) + 1)
    }
    4 + digits(version) + digits(fresh_until_ms) + digits(i64::from(load_ms))
}

/// The bytes the allocator hands out for a request of `n`: mimalloc's size classes (the
/// binary's allocator, src/main.rs; `mi_bin` in its page-queue.c) are 8-byte steps up to 64
/// bytes, then four per doubling, so a block is up to 25 % larger than asked (263 bytes take
/// 320, 8,201 take 10,240). Past mimalloc's largest class (far beyond any item) this
/// overstates by as much.
fn allocated(n: u64) -> u64 {
    let words = n.div_ceil(8).max(1);
    if words <= 8 {
        return words * 8;
    }
    let below = words - 1;
    let step = below.ilog2() - 2;
    (((below >> step) + 1) << step) * 8
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::items::model::ItemJson;

    fn entry(version: i64, json_len: usize) -> Entry {
        Entry {
            value: Cached::Item(ItemJson {
                version,
                json: Bytes::from(vec![b'x'; json_len]),
            }),
            fresh_until_ms: i64::MAX,
            load_ms: 1,
        }
    }

    fn id(n: i64) -> ItemId {
        ItemId::new(n).unwrap()
    }

    fn live(max_bytes: u64) -> Near {
        let near = Near::new(max_bytes, Duration::from_secs(60));
        near.set_live(true);
        near
    }

    #[test]
    fn an_invalidation_during_a_read_voids_its_store() {
        let near = live(1 << 20);
        let ticket = near.ticket(id(7));
        near.invalidate(id(7)); // the write's push arrives while the read is in flight
        ticket.store(&entry(1, 10));
        assert!(near.get(id(7), 0).is_none(), "v1 was not stored");

        near.ticket(id(7)).store(&entry(2, 10));
        assert_eq!(
            near.get(id(7), 0).map(|e| e.value),
            Some(entry(2, 10).value)
        );
    }

    #[test]
    fn an_id_is_admitted_on_its_second_sighting() {
        let near = live(1 << 20);
        assert!(!near.admit(id(5), 1), "first read: not stored");
        assert!(near.admit(id(5), 2), "read again: stored");
        assert!(!near.admit(id(6), 3));
        // An entry's life later (60 s here), it has forgotten.
        assert!(
            !near.admit(id(5), 60_003),
            "read again much later: a first read"
        );
    }

    #[test]
    fn a_read_dropped_in_flight_leaves_no_ticket_behind() {
        let near = live(1 << 20);
        drop(near.ticket(id(3)));
        assert!(
            near.tickets
                .iter()
                .all(|shard| shard.lock().unwrap().is_empty())
        );
    }

    #[test]
    fn a_flush_voids_every_read_in_flight_and_nothing_is_served_while_down() {
        let near = live(1 << 20);
        let ticket = near.ticket(id(1));
        near.set_live(false);
        near.set_live(true);
        ticket.store(&entry(1, 10));
        assert!(near.get(id(1), 0).is_none());

        near.ticket(id(2)).store(&entry(1, 10));
        near.set_live(false);
        assert!(near.get(id(2), 0).is_none(), "nothing served while down");
    }

    #[test]
    fn a_sweep_of_the_key_space_stays_within_the_byte_bound() {
        let max = 256 * 1024;
        let near = live(max);
        for n in 1..=20_000 {
            near.ticket(id(n)).store(&entry(1, 200));
        }
        let held = near.weighted_size();
        assert!(held <= max, "{held} bytes held, bound {max}");
        assert!(held > max / 2, "the cache is used: {held} bytes");
    }

    #[test]
    fn the_weigher_counts_the_whole_redis_value_in_its_size_class() {
        for (version, fresh_until_ms, load_ms, json_len) in [
            (1, 1_764_000_000_123, 3, 232),
            (12_345, 99, 0, 0),
            (7, 1_764_000_000_123, 4_000_000_000, 8_000),
        ] {
            let mut entry = entry(version, json_len);
            entry.fresh_until_ms = fresh_until_ms;
            entry.load_ms = load_ms;
            let Cached::Item(item) = &entry.value else {
                unreachable!()
            };
            assert_eq!(
                redis_header_len(version, fresh_until_ms, load_ms) + item.json.len() as u64,
                entry.encode().len() as u64,
                "the header as Entry::encode writes it"
            );
        }
        // mimalloc's classes: exact to 64, then 80, 96, 112, 128, 160, ...
        let classes: Vec<u64> = [
            1, 8, 9, 64, 65, 80, 81, 128, 129, 263, 8_201, 10_240, 10_241,
        ]
        .into_iter()
        .map(allocated)
        .collect();
        assert_eq!(
            classes,
            [
                8, 8, 16, 64, 80, 80, 96, 128, 160, 320, 10_240, 10_240, 12_288
            ]
        );
        let not_found = Entry {
            value: Cached::NotFound,
            fresh_until_ms: 1,
            load_ms: 0,
        };
        assert_eq!(u64::from(weight(&not_found)), OVERHEAD);
        let seeded = self::entry(1, 232);
        assert_eq!(
            u64::from(weight(&seeded)),
            allocated(redis_header_len(1, i64::MAX, 1) + 232) + SHARED + OVERHEAD
        );
    }
}
