//! Live outcome windows per (service, color): lock-free sliding windows of
//! requests, failures and a latency histogram, fed by the request path and
//! read by the rollback analysis.
//!
//! The window is a ring of `BUCKETS` time buckets of `bucket_ms` each. A
//! request lands in the bucket of its end time: one relaxed `fetch_add` per
//! counter. A bucket whose epoch is stale is reset by the first writer that
//! notices (a compare-and-swap on the epoch); the loss of a handful of counts
//! at a bucket boundary under contention is accepted — the analysis is
//! statistical, and it never blocks or allocates.
//!
//! Failures are 5xx answers, connect errors, timeouts and resets — never 4xx.
//! Latency uses log-spaced buckets from 1 ms to ~46 s (factor √2); a p99 is
//! reported as its bucket's upper bound: never below the true value, at most
//! √2 (41 %) above it. The latency trigger compares two such values, so the
//! bias cancels to within one bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Time buckets in the ring.
pub const BUCKETS: usize = 10;
/// Latency histogram buckets: upper bounds 1 ms × √2^i.
pub const LAT_BUCKETS: usize = 32;

#[derive(Debug)]
struct Bucket {
    /// Which time bucket (since `origin`) the counts belong to.
    epoch: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    latency: [AtomicU64; LAT_BUCKETS],
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            epoch: AtomicU64::new(u64::MAX),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One (service, color)'s window.
#[derive(Debug)]
pub struct Window {
    origin: Instant,
    bucket_ms: u64,
    buckets: [Bucket; BUCKETS],
}

/// What the analysis sees of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub requests: u64,
    pub failures: u64,
    /// 99th percentile latency (upper bound of its histogram bucket).
    pub p99: Option<Duration>,
}

impl Summary {
    pub fn failure_ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 / self.requests as f64
        }
    }
}

fn lat_index(d: Duration) -> usize {
    // log base √2 of (us / 1000), rounded up, in integers: the smallest i
    // with us ≤ 1000·√2^i, that is us² ≤ 10^6·2^i. (A float log2 and the
    // u128 microseconds cost ~150 instructions per request.) Capped at
    // 2^31 µs (~36 min), far past the last bucket, so us² fits a u64.
    let us = d
        .as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
        .min(1 << 31);
    if us <= 1000 {
        return 0;
    }
    let m = (us * us).div_ceil(1_000_000);
    // ceil(log2(m)), m ≥ 2.
    let i = (u64::BITS - (m - 1).leading_zeros()) as usize;
    i.min(LAT_BUCKETS - 1)
}

/// Upper bound of latency bucket `i`.
fn lat_bound(i: usize) -> Duration {
    Duration::from_secs_f64(0.001 * 2f64.powf(i as f64 / 2.0))
}

impl Window {
    pub fn new(bucket: Duration) -> Window {
        Window {
            origin: Instant::now(),
            bucket_ms: (bucket.as_millis() as u64).max(1),
            buckets: std::array::from_fn(|_| Bucket::new()),
        }
    }

    /// The window's span.
    pub fn span(&self) -> Duration {
        Duration::from_millis(self.bucket_ms * BUCKETS as u64)
    }

    fn epoch_at(&self, at: Instant) -> u64 {
        // In u64: `as_millis` is a u128, and its division a library call.
        let d = at.saturating_duration_since(self.origin);
        (d.as_secs() * 1000 + u64::from(d.subsec_millis())) / self.bucket_ms
    }

    /// Records one finished request. Lock-free; no allocation.
    #[inline]
    pub fn record(&self, at: Instant, failed: bool, latency: Duration) {
        let epoch = self.epoch_at(at);
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = b.epoch.load(Ordering::Acquire);
        if seen != epoch {
            if seen != u64::MAX && seen > epoch {
                return; // a request from a bucket already recycled: too old
            }
            if b.epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                b.requests.store(0, Ordering::Relaxed);
                b.failures.store(0, Ordering::Relaxed);
                for l in &b.latency {
                    l.store(0, Ordering::Relaxed);
                }
            }
        }
        b.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            b.failures.fetch_add(1, Ordering::Relaxed);
        }
        b.latency[lat_index(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Sums the buckets whose time lies in `[now - span, now]` and after
    /// `since` (a step's start, so old traffic does not count for a new step).
    pub fn summary(&self, now: Instant, since: Option<Instant>) -> Summary {
        let cur = self.epoch_at(now);
        let oldest = cur.saturating_sub(BUCKETS as u64 - 1);
        let oldest = match since {
            Some(s) => oldest.max(self.epoch_at(s)),
            None => oldest,
        };
        let mut s = Summary::default();
        let mut lat = [0u64; LAT_BUCKETS];
        for b in &self.buckets {
            let e = b.epoch.load(Ordering::Acquire);
            if e == u64::MAX || e < oldest || e > cur {
                continue;
            }
            s.requests += b.requests.load(Ordering::Relaxed);
            s.failures += b.failures.load(Ordering::Relaxed);
            for (acc, l) in lat.iter_mut().zip(&b.latency) {
                *acc += l.load(Ordering::Relaxed);
            }
        }
        let total: u64 = lat.iter().sum();
        if total > 0 {
            let rank = (total as f64 * 0.99).ceil() as u64;
            let mut seen = 0;
            for (i, n) in lat.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    s.p99 = Some(lat_bound(i));
                    break;
                }
            }
        }
        s
    }
}

/// Wilson score interval for a binomial proportion at z (1.96 ≈ 95 %):
/// `(lower, upper)`. With few samples the interval is wide, which is what
/// keeps a handful of errors from looking like a 50 % failure ratio.
pub fn wilson(failures: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = failures as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = p + z2 / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (
        ((centre - margin) / denom).max(0.0),
        ((centre + margin) / denom).min(1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_root_two_above_a_millisecond() {
        // The float formula the integer one replaced, away from the exact
        // bucket bounds where float rounding may fall either way.
        let float = |us: u64| -> Option<usize> {
            if us <= 1000 {
                return Some(0);
            }
            let x = 2.0 * (us as f64 / 1000.0).log2();
            ((x - x.round()).abs() > 1e-9).then(|| (x.ceil() as usize).min(LAT_BUCKETS - 1))
        };
        let mut us = 0u64;
        while us < 100_000_000 {
            if let Some(want) = float(us) {
                assert_eq!(lat_index(Duration::from_micros(us)), want, "{us} µs");
            }
            us += 1 + us / 1000;
        }
        for (us, i) in [
            (1000, 0),
            (1001, 1),
            (1414, 1),
            (1415, 2),
            (2000, 2),
            (2001, 3),
            (4000, 4),
        ] {
            assert_eq!(lat_index(Duration::from_micros(us)), i, "{us} µs");
        }
        assert_eq!(lat_index(Duration::from_secs(1 << 40)), LAT_BUCKETS - 1);
        for i in 0..LAT_BUCKETS - 1 {
            // Every bucket's bound lands in that bucket.
            let bound = lat_bound(i).as_micros() as u64;
            assert!(lat_index(Duration::from_micros(bound)) <= i, "bound of {i}");
            assert!(
                lat_index(Duration::from_micros(bound + 2)) > i || i == 0,
                "past {i}"
            );
        }
    }

    #[test]
    fn counts_and_expires() {
        let w = Window::new(Duration::from_millis(100));
        let t0 = w.origin;
        for i in 0..100 {
            w.record(
                t0 + Duration::from_millis(i),
                i % 10 == 0,
                Duration::from_millis(5),
            );
        }
        let s = w.summary(t0 + Duration::from_millis(150), None);
        assert_eq!((s.requests, s.failures), (100, 10));
        // Past the window's span everything has aged out.
        let s = w.summary(t0 + Duration::from_millis(100 * BUCKETS as u64 + 150), None);
        assert_eq!(s.requests, 0);
        // A recycled slot starts from zero.
        w.record(
            t0 + Duration::from_millis(1000),
            false,
            Duration::from_millis(5),
        );
        let s = w.summary(t0 + Duration::from_millis(1050), None);
        assert_eq!((s.requests, s.failures), (1, 0));
    }

    #[test]
    fn since_excludes_older_buckets() {
        let w = Window::new(Duration::from_millis(100));
        let t0 = w.origin;
        w.record(t0 + Duration::from_millis(10), true, Duration::ZERO);
        w.record(t0 + Duration::from_millis(310), false, Duration::ZERO);
        let s = w.summary(
            t0 + Duration::from_millis(350),
            Some(t0 + Duration::from_millis(300)),
        );
        assert_eq!((s.requests, s.failures), (1, 0));
    }

    #[test]
    fn p99_within_a_bucket() {
        let w = Window::new(Duration::from_secs(1));
        let t0 = w.origin;
        for _ in 0..990 {
            w.record(t0, false, Duration::from_millis(2));
        }
        for _ in 0..10 {
            w.record(t0, false, Duration::from_millis(400));
        }
        let p99 = w.summary(t0, None).p99.unwrap();
        assert!(
            p99 >= Duration::from_millis(2) && p99 <= Duration::from_millis(3),
            "{p99:?}"
        );
        for _ in 0..20 {
            w.record(t0, false, Duration::from_millis(400));
        }
        let p99 = w.summary(t0, None).p99.unwrap();
        assert!(
            p99 >= Duration::from_millis(400) && p99 <= Duration::from_millis(566),
            "{p99:?}"
        );
    }

    #[test]
    fn wilson_bounds() {
        let (lo, hi) = wilson(0, 0, 1.96);
        assert_eq!((lo, hi), (0.0, 1.0));
        let (lo, hi) = wilson(1, 2, 1.96);
        assert!(lo < 0.1 && hi > 0.9, "two samples say nothing: {lo} {hi}");
        let (lo, hi) = wilson(500, 1000, 1.96);
        assert!(lo > 0.46 && hi < 0.54);
        let (lo, _) = wilson(100, 100, 1.96);
        assert!(lo > 0.96);
    }
}
