//! Latency histograms: fine log-scale buckets kept sparse (a hop's latencies cluster in a few of
//! them), quantiles by interpolation inside a bucket, and the coarse bucket layout Prometheus
//! gets.
//!
//! The fine layout has 20 bounds per decade from 1 µs to 100 s (each bucket at most 14% wide), so
//! a quantile the CLI prints is within a few percent of the truth. Every coarse (Prometheus)
//! bound is also a fine bound, so the exported cumulative counts are exact sums of fine buckets.

/// Bucket mantissas per decade, in hundredths (1.00, 1.10, 1.25, ... 9.00).
const MANTISSAS: [u64; 20] = [
    100, 110, 125, 140, 160, 180, 200, 225, 250, 280, 320, 360, 400, 450, 500, 560, 630, 710, 800,
    900,
];
/// First decade: 1e3 ns (1 µs).
const FIRST_DECADE_NS: u64 = 1_000;
/// Decades covered: 1 µs .. 100 s.
const DECADES: usize = 8;
/// Finite fine bounds (the last one, 100 s, closes the eighth decade).
pub const FINE_BOUNDS: usize = DECADES * MANTISSAS.len() + 1;

/// Upper bounds (inclusive, ns) of the fine buckets; one more bucket past the last is +Inf.
pub static BOUNDS_NS: [u64; FINE_BOUNDS] = fine_bounds();

const fn fine_bounds() -> [u64; FINE_BOUNDS] {
    let mut out = [0u64; FINE_BOUNDS];
    let mut decade = FIRST_DECADE_NS;
    let mut d = 0;
    while d < DECADES {
        let mut m = 0;
        while m < MANTISSAS.len() {
            out[d * MANTISSAS.len() + m] = decade / 100 * MANTISSAS[m];
            m += 1;
        }
        decade *= 10;
        d += 1;
    }
    out[FINE_BOUNDS - 1] = decade;
    out
}

/// Bucket bounds Prometheus gets, in seconds: sub-millisecond local hops up to multi-second WAN
/// hops.
pub const EXPORT_BOUNDS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Index of the fine bucket holding `ns` (values equal to a bound belong to it, as Prometheus'
/// `le`); `FINE_BOUNDS` is +Inf.
#[must_use]
pub fn bucket_of(ns: u64) -> usize {
    BOUNDS_NS.partition_point(|&b| b < ns)
}

/// A latency distribution: sparse fine-bucket counts plus exact count, sum, min and max.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// (bucket index, count), sorted by index, no zero counts.
    buckets: Vec<(u8, u64)>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.add_bucket(bucket_of(ns), 1);
        if self.count == 0 || ns < self.min_ns {
            self.min_ns = ns;
        }
        self.max_ns = self.max_ns.max(ns);
        self.count += 1;
        self.sum_ns += u128::from(ns);
    }

    fn add_bucket(&mut self, idx: usize, n: u64) {
        let idx = u8::try_from(idx).expect("fewer than 256 fine buckets");
        match self.buckets.binary_search_by_key(&idx, |&(i, _)| i) {
            Ok(pos) => self.buckets[pos].1 += n,
            Err(pos) => self.buckets.insert(pos, (idx, n)),
        }
    }

    /// Adds `other`'s observations to this one.
    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        for &(idx, n) in &other.buckets {
            self.add_bucket(usize::from(idx), n);
        }
        if self.count == 0 || other.min_ns < self.min_ns {
            self.min_ns = other.min_ns;
        }
        self.max_ns = self.max_ns.max(other.max_ns);
        self.count += other.count;
        self.sum_ns += other.sum_ns;
    }

    /// The non-empty fine buckets, lowest first: (upper bound in ns, count); the +Inf bucket's
    /// bound is `u64::MAX`. For a histogram drawn as it is kept (the UI's hop detail).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets
            .iter()
            .map(|&(idx, n)| (BOUNDS_NS.get(usize::from(idx)).copied().unwrap_or(u64::MAX), n))
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    #[must_use]
    pub fn sum_ns(&self) -> u128 {
        self.sum_ns
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Mean latency in ns.
    #[must_use]
    pub fn mean_ns(&self) -> Option<u64> {
        (self.count > 0)
            .then(|| u64::try_from(self.sum_ns / u128::from(self.count)).unwrap_or(u64::MAX))
    }

    #[must_use]
    pub fn max_ns(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max_ns)
    }

    /// The `q` quantile (0..=1) in ns: the bucket holding the rank, interpolated linearly inside
    /// it (as Prometheus' `histogram_quantile`), clamped to the observed min and max.
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an estimate inside one bucket; counts and bounds are far below 2^52"
    )]
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for &(idx, n) in &self.buckets {
            let idx = usize::from(idx);
            if (below + n) as f64 >= rank {
                if idx >= FINE_BOUNDS {
                    return Some(self.max_ns);
                }
                let lower = if idx == 0 { 0 } else { BOUNDS_NS[idx - 1] };
                let upper = BOUNDS_NS[idx];
                let frac = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                let v = lower as f64 + (upper - lower) as f64 * frac;
                return Some((v as u64).clamp(self.min_ns, self.max_ns));
            }
            below += n;
        }
        Some(self.max_ns)
    }

    /// Cumulative counts at each of [`EXPORT_BOUNDS_S`] (Prometheus' `_bucket{le=...}`; the +Inf
    /// bucket is [`Self::count`]).
    #[must_use]
    pub fn export_cumulative(&self) -> [u64; EXPORT_BOUNDS_S.len()] {
        let mut out = [0u64; EXPORT_BOUNDS_S.len()];
        let mut cum = 0u64;
        let mut b = self.buckets.iter().peekable();
        for (slot, le) in out.iter_mut().zip(export_bounds_ns()) {
            while let Some(&&(idx, n)) = b.peek() {
                let idx = usize::from(idx);
                if idx < FINE_BOUNDS && BOUNDS_NS[idx] <= le {
                    cum += n;
                    b.next();
                } else {
                    break;
                }
            }
            *slot = cum;
        }
        out
    }
}

/// [`EXPORT_BOUNDS_S`] in ns.
fn export_bounds_ns() -> impl Iterator<Item = u64> {
    EXPORT_BOUNDS_S.iter().map(|s| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "exact small values"
        )]
        let ns = (s * 1e9).round() as u64;
        ns
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_bounds_are_increasing_and_contain_every_export_bound() {
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(BOUNDS_NS[0], 1_000);
        assert_eq!(BOUNDS_NS[FINE_BOUNDS - 1], 100_000_000_000);
        for le in export_bounds_ns() {
            assert!(BOUNDS_NS.contains(&le), "export bound {le} ns is not a fine bound");
        }
        // No fine bucket is wider than 14% of its upper bound.
        for w in BOUNDS_NS.windows(2) {
            assert!((w[1] - w[0]) * 100 <= w[1] * 14, "{} .. {}", w[0], w[1]);
        }
    }

    #[test]
    fn values_on_a_bound_belong_to_that_bucket() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1_000), 0);
        assert_eq!(bucket_of(1_001), 1);
        assert_eq!(bucket_of(100_000_000_000), FINE_BOUNDS - 1);
        assert_eq!(bucket_of(100_000_000_001), FINE_BOUNDS);
    }

    #[test]
    fn export_buckets_are_cumulative_prometheus_buckets() {
        let mut h = Histogram::default();
        // 50 µs, 100 µs (on the first bound), 3 ms, 40 ms, 20 s (past the last bound).
        for ns in [50_000, 100_000, 3_000_000, 40_000_000, 20_000_000_000] {
            h.record(ns);
        }
        let c = h.export_cumulative();
        // le: 100µs 250µs 500µs 1ms 2.5ms 5ms 10ms 25ms 50ms 100ms ... 10s
        assert_eq!(c, [2, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_ns(), 20_043_150_000);
    }

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = Histogram::default();
        // 1..=1000 ms uniformly.
        for ms in 1..=1000u64 {
            h.record(ms * 1_000_000);
        }
        for (q, truth_ms) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            #[expect(clippy::cast_precision_loss, reason = "test arithmetic")]
            let got = h.quantile_ns(q).unwrap() as f64 / 1e6;
            assert!((got - truth_ms).abs() / truth_ms < 0.07, "q{q}: {got} ms vs {truth_ms} ms");
        }
        assert_eq!(h.quantile_ns(1.0), Some(1_000_000_000));
        assert_eq!(h.quantile_ns(0.0), Some(1_000_000));
        assert_eq!(Histogram::default().quantile_ns(0.5), None);
    }

    #[test]
    fn identical_values_give_that_value_back() {
        let mut h = Histogram::default();
        for _ in 0..100 {
            h.record(40_300_000);
        }
        assert_eq!(h.quantile_ns(0.5), Some(40_300_000));
        assert_eq!(h.quantile_ns(0.99), Some(40_300_000));
        assert_eq!(h.mean_ns(), Some(40_300_000));
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) =
            (Histogram::default(), Histogram::default(), Histogram::default());
        for (i, ns) in [7_000u64, 900_000, 12_000_000, 12_500_000, 3_000_000_000].iter().enumerate()
        {
            if i % 2 == 0 {
                a.record(*ns);
            } else {
                b.record(*ns);
            }
            all.record(*ns);
        }
        a.merge(&b);
        assert_eq!(a, all);
        a.merge(&Histogram::default());
        assert_eq!(a, all);
    }
}
