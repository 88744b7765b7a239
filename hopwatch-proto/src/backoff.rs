//! Reconnect delays for clients of the collector (agents streaming flows, `observe -f`).

use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Full jitter: a uniformly random wait up to `initial * 2^attempt`, capped at `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << attempt.min(20)).min(self.max);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(fastrand::u64(ms / 2..=ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_keep_jitter() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        for attempt in 0..30 {
            let ceiling = (100u64 << attempt.min(20)).min(2000);
            let d = u64::try_from(b.delay(attempt).as_millis()).expect("small");
            assert!((ceiling / 2..=ceiling).contains(&d), "attempt {attempt}: {d} ms");
        }
    }
}
