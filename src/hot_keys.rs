//! Hot keys: the item ids this instance reads most, over the last one to two minutes.
//!
//! A space-saving sketch (Metwally, Agrawal and El Abbadi, "Efficient Computation of
//! Frequent and Top-k Elements in Data Streams", ICDT 2005) keeps [`CAPACITY`] counters,
//! however many distinct ids are read. Of a stream of N reads it guarantees:
//! - every id read more than N / CAPACITY times holds a counter;
//! - a counter never undercounts its id, and overcounts it by at most its `error`, itself
//!   at most N / CAPACITY.
//!
//! The stream it counts is a random sample of the reads, one in [`SAMPLE_EVERY`]: the
//! guarantees hold for the sample, and counts are scaled back to estimate reads. A share
//! (of the sample) estimates the share of all reads without bias.
//!
//! The HTTP handlers record the ids of `GET /items/{id}` and batch reads once the service
//! has answered (`http/items.rs`); `/metrics` exports the top ids (`metrics.rs`), and
//! `GET /admin/hot-keys` lists them (`http/admin.rs`). This module knows nothing of HTTP,
//! Redis or Postgres.
//!
//! Cost on the hit path: a read not sampled costs a thread-local countdown. Every thread
//! that samples has a sketch of its own behind a mutex of its own
//! (`thread_local::ThreadLocal`), so counting a sampled read takes a lock no other thread
//! wants, one hash lookup, and either at most one swap in a sorted array or, for most reads
//! of a long tail, one increment in a filter (see [`SpaceSaving`]). Readers (a scrape, the
//! admin route: seconds apart) lock each thread's sketch in turn, copy its counters and
//! merge them; a worker waits at most for one such copy. No lock or counter is shared
//! between workers on the hit path.
//!
//! Recent, not all-time: each thread's sketch counts in generations of [`WINDOW`], and
//! a report merges the current generation with the previous one. An all-time count would
//! drown today's hot id under last week's, and its shares would tell nothing about now.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;
use thread_local::ThreadLocal;

use crate::items::model::ItemId;

/// Counters per sketch (the paper's K). An id that takes more than 1/1024 (0.1 %) of the
/// reads is always listed, and a count is off by at most 0.1 % of the reads: under Zipf
/// traffic over a million ids (the bench's) the tenth most read id has ~0.7 % of the reads,
/// so the top 10 is exact in membership and close in counts. A sketch takes ~100 KB (~70
/// bytes a counter with its index entry, and the 32 KB filter): ~200 KB per recording
/// thread for both generations, ~400 KB with one HTTP worker per core here. More counters
/// would only sharpen ranks far below the 10 anyone looks at, and slow the merge a report
/// does (~0.2 ms now).
pub const CAPACITY: usize = 1024;

/// How many ids `/metrics` and `GET /admin/hot-keys` show.
pub const TOP: usize = 10;

/// One generation of counts. A report covers the current and the previous generation: the
/// last one to two minutes: long enough for many scrapes (ours are 5 s apart, Prometheus'
/// default is a minute) to see the same hot ids, short enough to follow a shift in traffic.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Filter cells per counter (Filtered Space-Saving): more cells keep more of a long tail
/// on the cheap path. With eight (32 KB a sketch), of the reads of ids without a counter
/// 12 % take a counter over under uniform traffic over a million ids, 4 % under the bench's
/// Zipf(0.99) (a simulation of a million reads; 22 % and 10 % with four cells, all of them
/// without a filter).
const FILTER_CELLS_PER_COUNTER: usize = 8;

/// Times a thread counts sampled reads between two looks at the clock: a clock read costs
/// about as much as the rest of a count, so a thread looks every 64th time (and readers
/// look at every thread's sketch), which moves a generation's end by a few reads at most.
const CLOCK_EVERY: u32 = 64;

/// One read in this many, on average, is counted. Counting every read cost, measured on
/// the release build under wrk (CPU per request, with against without): +8 % for batch
/// reads of 100 random cached ids, +2.7 % for single reads of random cached ids (a sketch
/// update is ~30-100 ns alone, but its scattered memory costs the request path more). One
/// in eight brings both near 1 %, and a hot id is no less hot in a sample: an id with
/// 0.7 % of 60,000 reads a minute is sampled ~50 times, its share known to about ±15 %
/// (one standard deviation).
pub const SAMPLE_EVERY: u32 = 8;

thread_local! {
    /// How many reads on, counting the next, this thread samples one, whichever application
    /// they are for (0 and 1: the next). The gaps are random, so that no periodic pattern
    /// of reads can dodge the sample.
    static UNTIL_SAMPLE: Cell<u32> = const { Cell::new(0) };
}

/// The reads this application has sampled, per thread, in two generations.
pub struct HotKeys {
    threads: ThreadLocal<Mutex<Generations>>,
    capacity: usize,
    window: Duration,
    sample_every: u32,
}

impl Default for HotKeys {
    fn default() -> Self {
        HotKeys::new(CAPACITY, WINDOW, SAMPLE_EVERY)
    }
}

impl HotKeys {
    /// `sample_every`: 1 counts every read.
    pub fn new(capacity: usize, window: Duration, sample_every: u32) -> HotKeys {
        HotKeys {
            threads: ThreadLocal::new(),
            capacity: capacity.max(1),
            window,
            sample_every: sample_every.max(1),
        }
    }

    /// Records one read of `id`.
    pub fn record(&self, id: ItemId) {
        self.record_all(std::slice::from_ref(&id));
    }

    /// Records one read of each of `ids`: the sampled ones are counted, under one lock,
    /// taken only if any is. The reads between samples are skipped over, not visited: a
    /// batch of 100 ids costs about 12 counts.
    pub fn record_all(&self, ids: &[ItemId]) {
        UNTIL_SAMPLE.with(|left| {
            // The index in `ids` of the next sampled read (`left` counts this one).
            let mut next = left.get().max(1) as usize - 1;
            let mut locked = None;
            while let Some(id) = ids.get(next) {
                locked
                    .get_or_insert_with(|| self.mine())
                    .current
                    .add(id.get());
                next += self.gap();
            }
            left.set(u32::try_from(next + 1 - ids.len()).unwrap_or(u32::MAX));
        });
    }

    /// Reads from one sampled read to the next: uniform in 1 ..= 2·`sample_every` − 1, so
    /// one read in `sample_every` is sampled, on average.
    fn gap(&self) -> usize {
        if self.sample_every == 1 {
            return 1;
        }
        rand::rng().random_range(1..=2 * self.sample_every as usize - 1)
    }

    /// This thread's sketches, locked, in the right generation.
    fn mine(&self) -> MutexGuard<'_, Generations> {
        let mine = self
            .threads
            .get_or(|| Mutex::new(Generations::new(self.capacity, Instant::now())));
        let mut generations = mine.lock().unwrap_or_else(PoisonError::into_inner);
        generations.unchecked += 1;
        if generations.unchecked >= CLOCK_EVERY {
            generations.unchecked = 0;
            generations.turn(Instant::now(), self.window);
        }
        generations
    }

    /// Every thread's counts of the last one to two windows, merged and ranked.
    pub fn ranking(&self) -> Ranking {
        let now = Instant::now();
        let mut summaries = Vec::new();
        for thread in self.threads.iter() {
            let mut generations = thread.lock().unwrap_or_else(PoisonError::into_inner);
            // A thread that stopped reading turns its generations here.
            generations.turn(now, self.window);
            summaries.push(generations.current.summary());
            summaries.push(generations.previous.summary());
        }
        let mut ranking = merge(&summaries, self.capacity);
        ranking.scale = u64::from(self.sample_every);
        ranking
    }

    /// The `n` most read ids, most read first.
    pub fn top(&self, n: usize) -> Vec<HotKey> {
        self.ranking().top(n)
    }
}

/// One thread's sketches: the generation being counted and the one before.
struct Generations {
    current: SpaceSaving,
    previous: SpaceSaving,
    started: Instant,
    /// Times counted into since the clock was last read.
    unchecked: u32,
}

impl Generations {
    fn new(capacity: usize, now: Instant) -> Generations {
        Generations {
            current: SpaceSaving::new(capacity),
            previous: SpaceSaving::new(capacity),
            started: now,
            unchecked: 0,
        }
    }

    /// Starts a new generation once the current one is `window` old; the previous one is
    /// dropped, and the current one too if it ended a whole window ago (nobody read then).
    /// The two sketches swap roles, so nothing is allocated.
    fn turn(&mut self, now: Instant, window: Duration) {
        let age = now.saturating_duration_since(self.started);
        if age < window {
            return;
        }
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        if age >= window.saturating_mul(2) {
            self.previous.clear();
        }
        self.started = now;
    }
}

/// A space-saving sketch of ids: `capacity` counters kept sorted by count, most first, so
/// the least counted id, the one a new id replaces, is last.
///
/// With the filter of Filtered Space-Saving (Homem and Carvalho, "Finding top-k elements
/// in data streams", Information Sciences 2010): an id without a counter first counts in a
/// cell of a small array it hashes to, and takes a counter over only once its cell reaches
/// the least count. Under a long tail most reads are of such ids, and a cell's increment is
/// much cheaper than a takeover (two index updates and a move). The guarantees hold as in
/// plain space-saving: a cell never exceeds the least count, so an id without a counter
/// was read at most that often, and a takeover inherits exactly the least count as error.
///
/// Counts only ever grow by one, so a counter that grows moves only to the front of the
/// run of counters equal to it: one swap, found by a binary search, or none when it is
/// already in front (a hot id usually is). A new id while there is room counts 1, the
/// least possible, and goes at the end. (A heap would need a sift through every level of
/// equal counts: under a long tail of reads, most of them.)
///
/// The sorted arrays hold counts and slot numbers; a slot holds its id, error and place;
/// the index maps ids to slots. A swap then updates two slots, not the index: one hash
/// lookup per read, whatever moves.
pub struct SpaceSaving {
    capacity: usize,
    /// Counts, in descending order.
    counts: Vec<u64>,
    /// `slot_at[i]`: the slot counted by `counts[i]`.
    slot_at: Vec<u32>,
    slots: Vec<Slot>,
    index: HashMap<i64, u32>,
    /// The filter: reads of ids without a counter, by cell, each at most the least count.
    /// (`u32`: a generation would need 4 billion reads on one thread to overflow one.)
    cells: Vec<u32>,
    /// `64 - log2(cells.len())`: an id's cell is the top bits of a multiplicative hash.
    cell_shift: u32,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: i64,
    /// The count the id inherited when it took the counter over: how far its count may
    /// exceed its true reads.
    error: u64,
    /// Where its count is in `counts`.
    at: u32,
}

impl SpaceSaving {
    /// Room for `capacity` counters (at least 1, at most `u32::MAX`), allocated now so that
    /// the hit path never grows it.
    pub fn new(capacity: usize) -> SpaceSaving {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        let cells = (capacity * FILTER_CELLS_PER_COUNTER).next_power_of_two();
        SpaceSaving {
            capacity,
            counts: Vec::with_capacity(capacity),
            slot_at: Vec::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            index: HashMap::with_capacity(capacity),
            cells: vec![0; cells],
            cell_shift: 64 - cells.trailing_zeros(),
            total: 0,
        }
    }

    /// The filter cell of `id`: Fibonacci hashing. Ids that share a cell only make it fill
    /// sooner, so more of their reads take the slower path; no count is ever wrong.
    fn cell(&self, id: i64) -> usize {
        ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.cell_shift) as usize
    }

    /// Counts one occurrence of `id`.
    pub fn add(&mut self, id: i64) {
        self.total += 1;
        if let Some(&slot) = self.index.get(&id) {
            self.bump(self.slots[slot as usize].at as usize);
        } else if self.counts.len() < self.capacity {
            let slot = self.slots.len() as u32;
            self.slots.push(Slot {
                id,
                error: 0,
                at: self.counts.len() as u32,
            });
            self.counts.push(1);
            self.slot_at.push(slot);
            self.index.insert(id, slot);
        } else {
            let last = self.counts.len() - 1;
            let least = self.counts[last];
            let cell = self.cell(id);
            if u64::from(self.cells[cell]) < least {
                self.cells[cell] = self.cells[cell].saturating_add(1);
                return;
            }
            // The id's cell reached the least count: the least counted id gives its
            // counter up, and leaves its count in its own cell (it may be read again). The
            // newcomer may have been read up to `least` times before: that is its error.
            let slot = self.slot_at[last];
            let taken = &mut self.slots[slot as usize];
            let evicted = std::mem::replace(&mut taken.id, id);
            taken.error = least;
            self.index.remove(&evicted);
            self.index.insert(id, slot);
            let evicted_cell = self.cell(evicted);
            self.cells[evicted_cell] = u32::try_from(least).unwrap_or(u32::MAX);
            self.bump(last);
        }
    }

    /// Adds one to the count at `at`, first moving it to the front of the counts equal to
    /// it, so that the order holds.
    fn bump(&mut self, at: usize) {
        let count = self.counts[at];
        let front = if at == 0 || self.counts[at - 1] > count {
            at
        } else {
            self.counts[..at].partition_point(|&c| c > count)
        };
        if front != at {
            self.slot_at.swap(front, at);
            self.slots[self.slot_at[front] as usize].at = front as u32;
            self.slots[self.slot_at[at] as usize].at = at as u32;
        }
        self.counts[front] = count + 1;
    }

    /// Forgets every count, keeping the memory.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.slot_at.clear();
        self.slots.clear();
        self.index.clear();
        self.cells.fill(0);
        self.total = 0;
    }

    /// The counters as they stand, and what an id without one may have had.
    pub fn summary(&self) -> Summary {
        Summary {
            counters: self
                .counts
                .iter()
                .zip(&self.slot_at)
                .map(|(&count, &slot)| {
                    let slot = self.slots[slot as usize];
                    Counter {
                        id: slot.id,
                        count,
                        error: slot.error,
                    }
                })
                .collect(),
            // Until the sketch is full, an id without a counter was never read; once full,
            // at most as often as the least counted id that has one.
            floor: if self.counts.len() < self.capacity {
                0
            } else {
                self.counts.last().copied().unwrap_or(0)
            },
            total: self.total,
        }
    }
}

/// One sketch's counters, as copied out for a report.
#[derive(Debug, Clone)]
pub struct Summary {
    pub counters: Vec<Counter>,
    /// The most reads an id without a counter can have had.
    pub floor: u64,
    /// Reads counted.
    pub total: u64,
}

/// An id's estimated reads: `count - error <= true reads <= count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub id: i64,
    pub count: u64,
    pub error: u64,
}

/// Merges sketches of disjoint parts of one stream (threads, generations).
///
/// An id's count is the sum, over the sketches, of its counter where it has one and of the
/// sketch's floor where it has none; its error likewise, from errors and floors. Each term
/// bounds the id's reads in its part from above (and count − error from below), so the sums
/// do for the whole stream. The guarantees survive: the floors add up to at most
/// N / capacity, which bounds every error; and an id read more than N / capacity times was
/// read more than its floor in some sketch, so it holds a counter there and is in the merge.
/// (Agarwal et al., "Mergeable Summaries", PODS 2012, merge these sketches more tightly
/// but keep only `capacity` counters; a report can afford all of them.)
pub fn merge(summaries: &[Summary], capacity: usize) -> Ranking {
    let total: u64 = summaries.iter().map(|s| s.total).sum();
    let floors: u64 = summaries.iter().map(|s| s.floor).sum();
    let mut merged: HashMap<i64, Counter> = HashMap::new();
    for summary in summaries {
        for counter in &summary.counters {
            let entry = merged.entry(counter.id).or_insert(Counter {
                id: counter.id,
                count: floors,
                error: floors,
            });
            // Each id has at most one counter per sketch: its floor there is still in.
            entry.count = entry.count - summary.floor + counter.count;
            entry.error = entry.error - summary.floor + counter.error;
        }
    }
    let mut counters: Vec<Counter> = merged.into_values().collect();
    counters.sort_unstable_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then((b.count - b.error).cmp(&(a.count - a.error)))
            .then(a.id.cmp(&b.id))
    });
    Ranking {
        counters,
        total,
        capacity,
        scale: 1,
    }
}

/// Every id with a counter, most read first, and the reads they were counted among (all
/// in sampled reads).
#[derive(Debug, Clone)]
pub struct Ranking {
    pub counters: Vec<Counter>,
    pub total: u64,
    capacity: usize,
    /// Reads per sampled read: what a count is multiplied by to estimate reads.
    scale: u64,
}

impl Ranking {
    /// The `n` most read ids with their shares.
    pub fn top(&self, n: usize) -> Vec<HotKey> {
        self.counters
            .iter()
            .take(n)
            .map(|c| self.hot_key(c))
            .collect()
    }

    /// Of the `n` most read ids, those surely read more than N / capacity times (their
    /// count less its error is above it). Below that line a sketch's ranks are noise: under
    /// uniform traffic every counter is a newcomer with a large error, and exporting the
    /// top ids would mint new label values at every scrape.
    pub fn certain_top(&self, n: usize) -> Vec<HotKey> {
        let line = self.total / self.capacity as u64;
        self.counters
            .iter()
            .take(n)
            .filter(|c| c.count - c.error > line)
            .map(|c| self.hot_key(c))
            .collect()
    }

    fn hot_key(&self, counter: &Counter) -> HotKey {
        HotKey {
            id: counter.id,
            count: counter.count * self.scale,
            error: counter.error * self.scale,
            share: if self.total == 0 {
                0.0
            } else {
                counter.count as f64 / self.total as f64
            },
        }
    }
}

/// One of the most read ids.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[schema(
    description = "One of the most read ids over the last one to two minutes, from a \
        sample of one read in 8.",
    example = json!({"id": 42, "count": 1832, "error": 0, "share": 0.12})
)]
pub struct HotKey {
    /// The id read (whether or not an item has it: reads of missing ids count too).
    #[schema(minimum = 1)]
    pub id: i64,
    /// Its reads, estimated: its sampled reads (never fewer than counted, at most `error`
    /// more) times 8.
    #[schema(minimum = 1)]
    pub count: u64,
    /// How far `count` may exceed the sample's count of the id, times 8.
    #[schema(minimum = 0)]
    pub error: u64,
    /// Its share of the sampled reads: an estimate of its share of all reads.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub share: f64,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A Zipf-like stream over `ids` ids (rank r drawn with weight 1/r), and its true counts.
    fn zipf_stream(seed: u64, ids: i64, n: usize) -> (Vec<i64>, HashMap<i64, u64>) {
        let cumulative: Vec<f64> = (1..=ids)
            .scan(0.0, |sum, r| {
                *sum += 1.0 / r as f64;
                Some(*sum)
            })
            .collect();
        let sum = cumulative.last().copied().unwrap_or(1.0);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut stream = Vec::with_capacity(n);
        let mut truth = HashMap::new();
        for _ in 0..n {
            let pick = rng.random_range(0.0..sum);
            let rank = cumulative.partition_point(|&c| c <= pick) as i64 + 1;
            // Spread the ids over the i64 range so that rank is not id order.
            let id = rank.min(ids) * 7_919 + 13;
            stream.push(id);
            *truth.entry(id).or_insert(0) += 1;
        }
        (stream, truth)
    }

    /// The paper's guarantees, for a ranking of `n` reads with `truth` as true counts.
    fn assert_guarantees(ranking: &Ranking, truth: &HashMap<i64, u64>, capacity: usize) {
        let n: u64 = truth.values().sum();
        assert_eq!(ranking.total, n);
        let bound = n / capacity as u64;
        let counted: HashMap<i64, Counter> = ranking.counters.iter().map(|c| (c.id, *c)).collect();
        for (id, &reads) in truth {
            match counted.get(id) {
                Some(c) => {
                    assert!(c.count >= reads, "{id}: count {} < {reads}", c.count);
                    assert!(c.count - c.error <= reads, "{id}: {c:?} vs {reads}");
                    assert!(c.error <= bound, "{id}: error {} > N/K {bound}", c.error);
                    assert!(c.count - reads <= bound, "{id}: {c:?} vs {reads}");
                }
                None => assert!(
                    reads <= bound,
                    "{id} was read {reads} > N/K = {bound} times but has no counter"
                ),
            }
        }
    }

    /// Counts in descending order, each slot where the order says, the index complete.
    fn assert_consistent(sketch: &SpaceSaving) {
        assert!(sketch.counts.windows(2).all(|w| w[0] >= w[1]), "order");
        assert_eq!(sketch.counts.len(), sketch.slot_at.len());
        assert_eq!(sketch.index.len(), sketch.counts.len());
        for (at, &slot) in sketch.slot_at.iter().enumerate() {
            let slot = sketch.slots[slot as usize];
            assert_eq!(slot.at as usize, at);
            assert_eq!(
                sketch.index.get(&slot.id).map(|&s| sketch.slot_at[at] == s),
                Some(true)
            );
        }
        assert!(sketch.counts.iter().sum::<u64>() <= sketch.total);
        let least = if sketch.counts.len() < sketch.capacity {
            0
        } else {
            sketch.counts.last().copied().unwrap_or(0)
        };
        assert!(
            sketch.cells.iter().all(|&c| u64::from(c) <= least),
            "a cell above the least count"
        );
    }

    #[test]
    fn the_counters_stay_sorted_and_indexed() {
        let mut sketch = SpaceSaving::new(50);
        let mut rng = SmallRng::seed_from_u64(3);
        for n in 0..20_000 {
            // A hot id, a warm range and a long tail: every path of `add`.
            let id = match rng.random_range(0..10) {
                0..=2 => 1,
                3..=5 => rng.random_range(2..40),
                _ => rng.random_range(40..100_000),
            };
            sketch.add(id);
            if n % 997 == 0 {
                assert_consistent(&sketch);
            }
        }
        assert_consistent(&sketch);
        sketch.clear();
        assert_consistent(&sketch);
    }

    #[test]
    fn counts_are_exact_while_the_ids_fit() {
        let mut sketch = SpaceSaving::new(8);
        for (id, times) in [(5, 3), (9, 1), (2, 7)] {
            for _ in 0..times {
                sketch.add(id);
            }
        }
        let ranking = merge(&[sketch.summary()], 8);
        assert_eq!(
            ranking.counters,
            vec![
                Counter {
                    id: 2,
                    count: 7,
                    error: 0
                },
                Counter {
                    id: 5,
                    count: 3,
                    error: 0
                },
                Counter {
                    id: 9,
                    count: 1,
                    error: 0
                },
            ]
        );
        let top = ranking.top(2);
        assert_eq!(top[0].id, 2);
        assert!((top[0].share - 7.0 / 11.0).abs() < 1e-12);
    }

    #[test]
    fn a_zipf_stream_keeps_the_guarantees_of_space_saving() {
        for seed in 0..5 {
            let capacity = 64;
            let (stream, truth) = zipf_stream(seed, 5_000, 50_000);
            let mut sketch = SpaceSaving::new(capacity);
            for &id in &stream {
                sketch.add(id);
            }
            let summary = sketch.summary();
            assert_eq!(summary.counters.len(), capacity);
            assert!(
                summary.counters.iter().map(|c| c.count).sum::<u64>() <= stream.len() as u64,
                "counts add up to at most the stream (the filter holds the rest)"
            );
            let ranking = merge(&[summary], capacity);
            assert_guarantees(&ranking, &truth, capacity);
            // The most read id is ranked first.
            let most = truth.iter().max_by_key(|(_, n)| **n).map(|(id, _)| *id);
            assert_eq!(ranking.top(1).first().map(|k| k.id), most);
        }
    }

    #[test]
    fn an_adversarial_stream_keeps_the_guarantees() {
        // Round robin over far more ids than counters, with two heavy ids mixed in: every
        // newcomer evicts the least counted, the worst case for the errors.
        let capacity = 16;
        let mut sketch = SpaceSaving::new(capacity);
        let mut truth: HashMap<i64, u64> = HashMap::new();
        for i in 0..20_000i64 {
            let id = if i % 5 == 0 {
                1
            } else if i % 7 == 0 {
                2
            } else {
                100 + i % 997
            };
            sketch.add(id);
            *truth.entry(id).or_insert(0) += 1;
        }
        let ranking = merge(&[sketch.summary()], capacity);
        assert_guarantees(&ranking, &truth, capacity);
        let top: Vec<i64> = ranking.top(2).iter().map(|k| k.id).collect();
        assert_eq!(top, vec![1, 2]);
        // Only the two heavy ids are certain; the rest is churn.
        let certain: Vec<i64> = ranking.certain_top(10).iter().map(|k| k.id).collect();
        assert_eq!(certain, vec![1, 2]);
    }

    #[test]
    fn merged_sketches_keep_the_guarantees_of_one() {
        // One stream split over four sketches unevenly (threads), merged.
        let capacity = 32;
        let (stream, truth) = zipf_stream(42, 3_000, 40_000);
        let mut sketches: Vec<SpaceSaving> = (0..4).map(|_| SpaceSaving::new(capacity)).collect();
        let mut rng = SmallRng::seed_from_u64(7);
        for &id in &stream {
            let which = if rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(1..4)
            };
            sketches[which].add(id);
        }
        let summaries: Vec<Summary> = sketches.iter().map(SpaceSaving::summary).collect();
        let ranking = merge(&summaries, capacity);
        assert_guarantees(&ranking, &truth, capacity);
    }

    #[test]
    fn a_report_covers_this_generation_and_the_last_only() {
        let window = Duration::from_secs(60);
        let start = Instant::now();
        let mut generations = Generations::new(8, start);
        generations.current.add(1);
        generations.turn(start + Duration::from_secs(59), window);
        generations.current.add(2);
        assert_eq!(generations.current.total, 2, "no turn before a window");

        let later = start + Duration::from_secs(61);
        generations.turn(later, window);
        generations.current.add(3);
        assert_eq!(
            (generations.previous.total, generations.current.total),
            (2, 1)
        );

        // Nothing read for over two windows: both generations are gone.
        generations.turn(later + Duration::from_secs(121), window);
        assert_eq!(
            (generations.previous.total, generations.current.total),
            (0, 0)
        );
    }

    #[test]
    fn a_sample_of_one_read_in_eight_keeps_the_shares() {
        let hot_keys = HotKeys::new(CAPACITY, WINDOW, 8);
        let id = |n| ItemId::new(n).unwrap();
        // 80,000 reads: id 1 half of them, id 2 a quarter, the rest over 1,000 ids; half
        // of them one by one, half in batches of 100.
        let reads: Vec<ItemId> = (0..80_000i64)
            .map(|i| match i % 4 {
                0 | 1 => id(1),
                2 => id(2),
                _ => id(10 + i % 1_000),
            })
            .collect();
        let (single, batched) = reads.split_at(40_000);
        for &read in single {
            hot_keys.record(read);
        }
        for batch in batched.chunks(100) {
            hot_keys.record_all(batch);
        }
        let ranking = hot_keys.ranking();
        // ~10,000 sampled; the gaps are at most 15 reads.
        assert!(
            (8_000..12_000).contains(&ranking.total),
            "{}",
            ranking.total
        );
        let top = ranking.top(2);
        assert_eq!((top[0].id, top[1].id), (1, 2));
        assert!((top[0].share - 0.5).abs() < 0.03, "{top:?}");
        assert!((top[1].share - 0.25).abs() < 0.03, "{top:?}");
        // Counts estimate reads: the sample's, times 8.
        assert_eq!(top[0].count % 8, 0);
        assert!((32_000..48_000).contains(&top[0].count), "{top:?}");
    }

    #[test]
    fn each_thread_records_apart_and_a_ranking_merges_them() {
        let hot_keys = HotKeys::new(16, WINDOW, 1);
        let id = |n| ItemId::new(n).unwrap();
        // All three threads alive at once: `thread_local` hands a finished thread's sketch
        // to the next new thread (its counts stay valid, they just share it).
        let all_started = std::sync::Barrier::new(3);
        std::thread::scope(|scope| {
            for t in 0..3 {
                let (hot_keys, all_started) = (&hot_keys, &all_started);
                scope.spawn(move || {
                    for i in 0..1_000 {
                        hot_keys.record(id(7));
                        hot_keys.record_all(&[id(100 + t), id(1_000 + i)]);
                        if i == 0 {
                            all_started.wait();
                        }
                    }
                });
            }
        });
        assert_eq!(hot_keys.threads.iter().count(), 3, "a sketch per thread");
        let ranking = hot_keys.ranking();
        assert_eq!(ranking.total, 9_000);
        let top = hot_keys.top(4);
        assert_eq!(top[0].id, 7);
        assert_eq!((top[0].count, top[0].error), (3_000, 0));
        let mut next: Vec<i64> = top[1..].iter().map(|k| k.id).collect();
        next.sort_unstable();
        assert_eq!(next, vec![100, 101, 102]);
    }
}
