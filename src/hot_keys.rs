//! Hot keys: the item ids this instance reads most, over the last one to two minutes.
//!
//! A space-saving sketch (Metwally, Agrawal and El Abbadi, "Efficient Computation of
//! Frequent and Top-k Elements in Data Streams", ICDT 2005) keeps [`CAPACITY`] counters,
//! however many distinct ids are read. Of a stream of N reads it guarantees:
//! - every id read more than N / CAPACITY times holds a counter;
//! - a counter never undercounts its id, and overcounts it by at most its `error`, itself
//!   at most N / CAPACITY.
//!
//! The HTTP handlers record the ids of `GET /items/{id}` and batch reads once the service
//! has answered (`http/items.rs`); `/metrics` exports the top ids (`metrics.rs`), and
//! `GET /admin/hot-keys` lists them (`http/admin.rs`). This module knows nothing of HTTP,
//! Redis or Postgres.
//!
//! Cost on the hit path: every thread that records has a sketch of its own behind a mutex
//! of its own (`thread_local::ThreadLocal`), so recording a read takes a lock no other
//! thread wants, one hash lookup and a few swaps in a heap of `CAPACITY` entries. Readers
//! (a scrape, the admin route: seconds apart) lock each thread's sketch in turn, copy its
//! counters and merge them; a worker waits at most for one such copy. No lock or counter
//! is shared between workers on the hit path.
//!
//! Recent, not all-time: each thread's sketch counts in generations of [`WINDOW`], and
//! a report merges the current generation with the previous one. An all-time count would
//! drown today's hot id under last week's, and its shares would tell nothing about now.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use thread_local::ThreadLocal;

use crate::items::model::ItemId;

/// Counters per sketch (the paper's K). An id that takes more than 1/1024 (0.1 %) of the
/// reads is always listed, and a count is off by at most 0.1 % of the reads: under Zipf
/// traffic over a million ids (the bench's) the tenth most read id has ~0.7 % of the reads,
/// so the top 10 is exact in membership and close in counts. It costs ~56 bytes a counter
/// (heap entry, slot, index entry): ~115 KB per recording thread for both generations,
/// ~230 KB with one HTTP worker per core here. More counters would only sharpen ranks far
/// below the 10 anyone looks at, and slow the merge a scrape does.
pub const CAPACITY: usize = 1024;

/// How many ids `/metrics` and `GET /admin/hot-keys` show.
pub const TOP: usize = 10;

/// One generation of counts. A report covers the current and the previous generation: the
/// last one to two minutes, long enough for a few scrapes (Prometheus' default interval is
/// a minute, ours 15 s) to see the same hot ids, short enough to follow a shift in traffic.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Reads recorded between two looks at the clock: a clock read costs about as much as the
/// rest of a recording, so a thread looks every 64th read (and readers look at every
/// thread's sketch), which moves a generation's end by a few reads at most.
const CLOCK_EVERY: u32 = 64;

/// The reads this application has recorded, per thread, in two generations.
pub struct HotKeys {
    threads: ThreadLocal<Mutex<Generations>>,
    capacity: usize,
    window: Duration,
}

impl Default for HotKeys {
    fn default() -> Self {
        HotKeys::new(CAPACITY, WINDOW)
    }
}

impl HotKeys {
    pub fn new(capacity: usize, window: Duration) -> HotKeys {
        HotKeys {
            threads: ThreadLocal::new(),
            capacity: capacity.max(1),
            window,
        }
    }

    /// Counts one read of `id`.
    pub fn record(&self, id: ItemId) {
        self.record_all(std::slice::from_ref(&id));
    }

    /// Counts one read of each of `ids`, under one lock.
    pub fn record_all(&self, ids: &[ItemId]) {
        let mine = self
            .threads
            .get_or(|| Mutex::new(Generations::new(self.capacity, Instant::now())));
        let mut generations = mine.lock().unwrap_or_else(PoisonError::into_inner);
        generations.unchecked = generations
            .unchecked
            .saturating_add(u32::try_from(ids.len()).unwrap_or(u32::MAX));
        if generations.unchecked >= CLOCK_EVERY {
            generations.unchecked = 0;
            generations.turn(Instant::now(), self.window);
        }
        for id in ids {
            generations.current.add(id.get());
        }
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
        merge(&summaries, self.capacity)
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
    /// Reads recorded since the clock was last read.
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

/// A space-saving sketch of ids: `capacity` counters in a min-heap by count, so the least
/// counted id, the one a new id replaces, is at the root.
///
/// The heap holds counts and slot numbers; a slot holds its id, error and heap position;
/// the index maps ids to slots. Moving an entry in the heap then updates a slot, not the
/// index: one hash lookup per read, whatever the heap does.
pub struct SpaceSaving {
    capacity: usize,
    heap: Vec<Ranked>,
    slots: Vec<Slot>,
    index: HashMap<i64, u32>,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct Ranked {
    count: u64,
    slot: u32,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: i64,
    /// The count the id inherited when it took the counter over: how far `count` may
    /// exceed its true reads.
    error: u64,
    /// Where its entry is in the heap.
    at: u32,
}

impl SpaceSaving {
    /// Room for `capacity` counters (at least 1, at most `u32::MAX`), allocated now so that
    /// the hit path never grows it.
    pub fn new(capacity: usize) -> SpaceSaving {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        SpaceSaving {
            capacity,
            heap: Vec::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            index: HashMap::with_capacity(capacity),
            total: 0,
        }
    }

    /// Counts one occurrence of `id`.
    pub fn add(&mut self, id: i64) {
        self.total += 1;
        if let Some(&slot) = self.index.get(&id) {
            let at = self.slots[slot as usize].at as usize;
            self.heap[at].count += 1;
            self.sift_down(at);
        } else if self.heap.len() < self.capacity {
            let (slot, at) = (self.slots.len(), self.heap.len());
            self.slots.push(Slot {
                id,
                error: 0,
                at: at as u32,
            });
            self.heap.push(Ranked {
                count: 1,
                slot: slot as u32,
            });
            self.index.insert(id, slot as u32);
            self.sift_up(at);
        } else {
            // Full: the least counted id gives its counter up. The newcomer may have been
            // read up to that many times before (while uncounted): that is its error.
            let Ranked { count: min, slot } = self.heap[0];
            let taken = &mut self.slots[slot as usize];
            self.index.remove(&taken.id);
            taken.id = id;
            taken.error = min;
            self.index.insert(id, slot);
            self.heap[0].count = min + 1;
            self.sift_down(0);
        }
    }

    /// Forgets every count, keeping the memory.
    pub fn clear(&mut self) {
        self.heap.clear();
        self.slots.clear();
        self.index.clear();
        self.total = 0;
    }

    /// The counters as they stand, and what an id without one may have had.
    pub fn summary(&self) -> Summary {
        Summary {
            counters: self
                .heap
                .iter()
                .map(|ranked| {
                    let slot = self.slots[ranked.slot as usize];
                    Counter {
                        id: slot.id,
                        count: ranked.count,
                        error: slot.error,
                    }
                })
                .collect(),
            // Until the sketch is full, an id without a counter was never read; once full,
            // at most as often as the least counted id that has one.
            floor: if self.heap.len() < self.capacity {
                0
            } else {
                self.heap.first().map_or(0, |root| root.count)
            },
            total: self.total,
        }
    }

    /// The entry at `at` has grown: moves it below the entries that now count less.
    fn sift_down(&mut self, mut at: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * at + 1;
            if left >= len {
                return;
            }
            let right = left + 1;
            let child = if right < len && self.heap[right].count < self.heap[left].count {
                right
            } else {
                left
            };
            if self.heap[child].count >= self.heap[at].count {
                return;
            }
            self.swap(at, child);
            at = child;
        }
    }

    /// A new entry at `at` (counting 1): moves it above entries that count more.
    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[parent].count <= self.heap[at].count {
                return;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.slots[self.heap[a].slot as usize].at = a as u32;
        self.slots[self.heap[b].slot as usize].at = b as u32;
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
    }
}

/// Every id with a counter, most read first, and the reads they were counted among.
#[derive(Debug, Clone)]
pub struct Ranking {
    pub counters: Vec<Counter>,
    pub total: u64,
    capacity: usize,
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
            count: counter.count,
            error: counter.error,
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
    description = "One of the most read ids over the last one to two minutes.",
    example = json!({"id": 42, "count": 1830, "error": 0, "share": 0.12})
)]
pub struct HotKey {
    /// The id read (whether or not an item has it: reads of missing ids count too).
    #[schema(minimum = 1)]
    pub id: i64,
    /// Its reads, as estimated: never fewer than the true number, at most `error` more.
    #[schema(minimum = 1)]
    pub count: u64,
    /// How far `count` may exceed the true number.
    #[schema(minimum = 0)]
    pub error: u64,
    /// `count` over all reads counted in the same time.
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
            assert_eq!(
                summary.counters.iter().map(|c| c.count).sum::<u64>(),
                stream.len() as u64,
                "counts add up to the stream"
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
    fn each_thread_records_apart_and_a_ranking_merges_them() {
        let hot_keys = HotKeys::new(16, WINDOW);
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
