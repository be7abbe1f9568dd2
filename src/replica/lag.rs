//! How long writes take to reach this instance's memory: from the moment JetStream stored a
//! write to the moment this instance applied it. The staleness bound of `read_consistency =
//! "local"` reads, in health as its median and 99th percentile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets a quarter of a doubling wide (about 19 %), from 1 µs to about 2^32 µs.
const BUCKETS: usize = 128;

pub(super) struct Lag {
    counts: [AtomicU64; BUCKETS],
}

impl Default for Lag {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Lag {
    pub(super) fn record(&self, lag: Duration) {
        let micros = lag.as_micros().max(1) as f64;
        let bucket = ((micros.log2() * 4.0) as usize).min(BUCKETS - 1);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0 to 1), as the upper bound of its bucket; `None` before any write.
    pub(super) fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        let bucket = counts
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .unwrap_or(BUCKETS - 1);
        Some(Duration::from_micros(
            2f64.powf((bucket + 1) as f64 / 4.0).ceil() as u64,
        ))
    }

    /// `p50 X µs, p99 Y µs`, or `none yet`.
    pub(super) fn figures(&self) -> String {
        match (self.quantile(0.5), self.quantile(0.99)) {
            (Some(p50), Some(p99)) => {
                format!("p50 {} µs, p99 {} µs", p50.as_micros(), p99.as_micros())
            }
            _ => "none yet".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let lag = Lag::default();
        assert_eq!(lag.figures(), "none yet");
        for _ in 0..90 {
            lag.record(Duration::from_micros(100));
        }
        for _ in 0..10 {
            lag.record(Duration::from_millis(50));
        }
        let p50 = lag.quantile(0.5).unwrap().as_micros();
        let p99 = lag.quantile(0.99).unwrap().as_micros();
        assert!((100..=120).contains(&p50), "{p50}");
        assert!((50_000..=60_000).contains(&p99), "{p99}");
    }
}
