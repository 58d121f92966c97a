//! [`MemoryRateLimiter`]: the buckets in this process, for a fleet that is
//! one process (tests, tools).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Cost, Decision, Levels, RateLimitError, RateLimiter, RateLimits};

pub struct MemoryRateLimiter {
    limits: RateLimits,
    epoch: Instant,
    /// std Mutex: held only for arithmetic, never across an await.
    buckets: Mutex<HashMap<String, Levels>>,
}

impl MemoryRateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            epoch: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn with_levels<T>(&self, key: &str, f: impl FnOnce(&mut Levels, &RateLimits) -> T) -> T {
        let now_ms = self.epoch.elapsed().as_secs_f64() * 1000.0;
        // A panic elsewhere cannot leave a bucket half-updated (the update
        // is plain float stores), so a poisoned lock is safe to reuse.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let levels = buckets
            .entry(key.to_owned())
            .or_insert_with(|| Levels::full(&self.limits, now_ms));
        levels.refill(&self.limits, now_ms);
        f(levels, &self.limits)
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn try_acquire(&self, key: &str, cost: Cost) -> Result<Decision, RateLimitError> {
        Ok(self.with_levels(key, |l, limits| l.take(limits, cost)))
    }

    async fn settle(&self, key: &str, extra_tokens: i64) -> Result<(), RateLimitError> {
        self.with_levels(key, |l, limits| l.settle(limits, extra_tokens));
        Ok(())
    }

    async fn drain(&self, key: &str, for_: Duration) -> Result<(), RateLimitError> {
        self.with_levels(key, |l, limits| l.drain(limits, for_));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: Cost = Cost {
        requests: 1,
        tokens: 1,
    };

    #[tokio::test]
    async fn memory_bucket_waits_then_grants_and_oversized_costs_go_into_debt() {
        let limiter = MemoryRateLimiter::new(RateLimits {
            requests: 20,
            tokens: 1000,
            window: Duration::from_secs(60),
        });
        assert_eq!(
            limiter.try_acquire("k", ONE).await.ok(),
            Some(Decision::Granted)
        );
        assert_eq!(
            limiter.try_acquire("k", ONE).await.ok(),
            Some(Decision::Granted)
        );
        let Ok(Decision::Wait(d)) = limiter.try_acquire("k", ONE).await else {
            panic!("burst of 2 should be spent");
        };
        assert!(
            d > Duration::from_secs(2) && d <= Duration::from_secs(4),
            "{d:?}"
        );
        let big = Cost {
            requests: 0,
            tokens: 5_000,
        };
        assert_eq!(
            limiter.try_acquire("other", big).await.ok(),
            Some(Decision::Granted)
        );
        assert!(matches!(
            limiter.try_acquire("other", ONE).await,
            Ok(Decision::Wait(_))
        ));
    }

    #[tokio::test]
    async fn drain_stops_a_full_bucket_for_its_duration_and_spares_other_keys() {
        // 600 a second: without the drain every call below would be granted.
        let limiter = MemoryRateLimiter::new(RateLimits {
            requests: 600,
            tokens: 1_000_000,
            window: Duration::from_secs(1),
        });
        let started = Instant::now();
        limiter
            .drain("k", Duration::from_millis(300))
            .await
            .expect("drain");
        let Ok(Decision::Wait(d)) = limiter.try_acquire("k", ONE).await else {
            panic!("a drained bucket granted a call");
        };
        assert!(d >= Duration::from_millis(290), "{d:?}");
        assert_eq!(
            limiter.try_acquire("other", ONE).await.ok(),
            Some(Decision::Granted)
        );
        let at = loop {
            if let Ok(Decision::Granted) = limiter.try_acquire("k", ONE).await {
                break started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never granted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(
            at >= Duration::from_millis(295) && at < Duration::from_millis(600),
            "first grant {at:?} after a 300 ms drain"
        );
    }
}
