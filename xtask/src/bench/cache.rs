//! The cache workload: the store alone, in this process, as a cache in front of something
//! slower. `--cache-sets` misses fill a namespace limited to 500k keys with `eviction=lru`;
//! keys (16 B) are read with Zipf-distributed popularity (s = 0.99) over 2M distinct keys, and a
//! read that misses writes the key (100 B). The same trace also runs through an exact LRU
//! cache of the same size, simulated here, so the hit ratio of our approximation is printed
//! beside the best an LRU policy could do. RSS is sampled every million sets.
//!
//! In this process rather than through wRPC: tens of millions of calls over NATS would take
//! an hour, and what is measured is the store's eviction, not the transport.

use std::fmt::Write as _;
use std::time::Instant;

use keyvalue_store::{Engine, Limits};

const NAMESPACE: &str = "cache";
const BUCKET: &str = "b";
/// Distinct keys of the trace.
const DISTINCT: usize = 2_000_000;
/// `max_keys` of the namespace.
const CAPACITY: u64 = 500_000;
/// The Zipf exponent (web caches see 0.6–1.0).
const ZIPF_S: f64 = 0.99;

/// Threads of the concurrent phase (the machine's cores).
fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Sets of new keys each thread makes in the concurrent phase.
const CONCURRENT_SETS: u64 = 1_000_000;

pub struct CacheRun {
    /// Concurrent phase: sets of new keys a second, from every core at once, into the full
    /// namespace (each one evicts) and into one with no limit in reach (none does).
    pub evicting_sets_per_sec: f64,
    pub plain_sets_per_sec: f64,
    pub evicting_refused: u64,
    pub sets: u64,
    pub gets: u64,
    pub hits: u64,
    pub refused: u64,
    pub exact_lru_hits: u64,
    pub seconds: f64,
    /// (sets so far, RSS bytes) every million sets.
    pub rss: Vec<(u64, u64)>,
    pub keys_at_end: u64,
}

impl CacheRun {
    pub fn hit_ratio(&self) -> f64 {
        self.hits as f64 / self.gets as f64
    }

    pub fn exact_hit_ratio(&self) -> f64 {
        self.exact_lru_hits as f64 / self.gets as f64
    }
}

/// Runs the trace until `sets` writes were made.
pub fn run(sets: u64) -> CacheRun {
    eprintln!(
        "cache workload: {sets} sets, {DISTINCT} distinct keys, max_keys={CAPACITY}, eviction=lru…"
    );
    let engine = Engine::new(Limits {
        max_keys: CAPACITY,
        max_key_bytes: 4096,
        max_value_bytes: 1 << 20,
        ..Limits::UNLIMITED
    });
    engine.set_eviction(NAMESPACE, true);
    let zipf = Zipf::new(DISTINCT, ZIPF_S);
    let mut exact = ExactLru::new(DISTINCT, CAPACITY as usize);
    let mut random = SplitMix(0x5eed);
    let value = [b'v'; 100];
    let mut key = String::with_capacity(16);
    let mut run = CacheRun {
        evicting_sets_per_sec: 0.0,
        plain_sets_per_sec: 0.0,
        evicting_refused: 0,
        sets: 0,
        gets: 0,
        hits: 0,
        refused: 0,
        exact_lru_hits: 0,
        seconds: 0.0,
        rss: vec![(0, rss())],
        keys_at_end: 0,
    };
    let started = Instant::now();
    while run.sets < sets {
        let id = zipf.sample(random.unit());
        key.clear();
        let _ = write!(key, "key-{id:012}");
        run.gets += 1;
        if engine.get(NAMESPACE, BUCKET, &key).is_some() {
            run.hits += 1;
        } else {
            if engine.set(NAMESPACE, BUCKET, &key, &value).is_err() {
                run.refused += 1;
            }
            run.sets += 1;
            if run.sets.is_multiple_of(1_000_000) {
                run.rss.push((run.sets, rss()));
            }
        }
        run.exact_lru_hits += u64::from(exact.access(id));
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.keys_at_end = engine.namespace_usage(NAMESPACE).0;
    eprintln!(
        "cache workload: sets of new keys from {} threads…",
        threads()
    );
    let (rate, refused) = concurrent_sets(&engine, NAMESPACE);
    (run.evicting_sets_per_sec, run.evicting_refused) = (rate, refused);
    drop(engine);
    let plain = Engine::new(Limits {
        max_key_bytes: 4096,
        max_value_bytes: 1 << 20,
        ..Limits::UNLIMITED
    });
    (run.plain_sets_per_sec, _) = concurrent_sets(&plain, "plain");
    run
}

/// Every thread sets [`CONCURRENT_SETS`] keys never written before; answers sets a second
/// and how many were refused.
fn concurrent_sets(engine: &Engine, namespace: &str) -> (f64, u64) {
    let refused = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads() {
            let refused = &refused;
            s.spawn(move || {
                let value = [b'v'; 100];
                let mut key = String::with_capacity(16);
                for i in 0..CONCURRENT_SETS {
                    key.clear();
                    let _ = write!(key, "new-{t:02}-{i:09}");
                    if engine.set(namespace, BUCKET, &key, &value).is_err() {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let sets = CONCURRENT_SETS * threads() as u64;
    (
        sets as f64 / started.elapsed().as_secs_f64(),
        refused.into_inner(),
    )
}

/// Resident memory of this process, in bytes (0 if unreadable).
fn rss() -> u64 {
    super::memory::rss(std::process::id()).unwrap_or(0)
}

/// Zipf-distributed ranks `0..n` by inverse transform over the cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let mut cumulative = Vec::with_capacity(n);
        for rank in 1..=n {
            total += 1.0 / (rank as f64).powf(s);
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        Zipf { cumulative }
    }

    /// The rank whose cumulative weight first reaches `u` (in [0, 1)).
    fn sample(&self, u: f64) -> usize {
        self.cumulative
            .partition_point(|&c| c < u)
            .min(self.cumulative.len() - 1)
    }
}

/// SplitMix64: a fast, well-mixed generator (the trace need not be cryptographic).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An exact LRU cache of `capacity` of the ids `0..n`: a doubly linked list through arrays,
/// most recent at the head.
struct ExactLru {
    prev: Vec<u32>,
    next: Vec<u32>,
    cached: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
    capacity: usize,
}

const NONE: u32 = u32::MAX;

impl ExactLru {
    fn new(n: usize, capacity: usize) -> ExactLru {
        ExactLru {
            prev: vec![NONE; n],
            next: vec![NONE; n],
            cached: vec![false; n],
            head: NONE,
            tail: NONE,
            len: 0,
            capacity,
        }
    }

    /// Uses `id`; answers whether it was cached (a hit). A miss caches it, evicting the least
    /// recently used id when full.
    fn access(&mut self, id: usize) -> bool {
        let id32 = id as u32;
        let hit = self.cached[id];
        if hit {
            self.unlink(id32);
        } else {
            self.cached[id] = true;
            self.len += 1;
            if self.len > self.capacity {
                let oldest = self.tail;
                self.unlink(oldest);
                self.cached[oldest as usize] = false;
                self.len -= 1;
            }
        }
        // Push to the head.
        self.prev[id] = NONE;
        self.next[id] = self.head;
        if self.head != NONE {
            self.prev[self.head as usize] = id32;
        }
        self.head = id32;
        if self.tail == NONE {
            self.tail = id32;
        }
        hit
    }

    fn unlink(&mut self, id: u32) {
        let (p, n) = (self.prev[id as usize], self.next[id as usize]);
        match p {
            NONE => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NONE => self.tail = p,
            n => self.prev[n as usize] = p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exact_lru_evicts_the_least_recently_used() {
        let mut lru = ExactLru::new(10, 2);
        assert!(!lru.access(1));
        assert!(!lru.access(2));
        assert!(lru.access(1));
        assert!(!lru.access(3), "evicts 2");
        assert!(lru.access(1));
        assert!(!lru.access(2));
        assert!(!lru.access(3), "3 was evicted by 2");
    }

    #[test]
    fn zipf_ranks_are_skewed_toward_the_first() {
        let zipf = Zipf::new(1000, 1.0);
        let mut random = SplitMix(1);
        let first = (0..10_000)
            .filter(|_| zipf.sample(random.unit()) == 0)
            .count();
        // Rank 1 of 1000 at s = 1 has weight 1/H(1000) ≈ 13%.
        assert!((1000..1700).contains(&first), "{first}");
    }
}
