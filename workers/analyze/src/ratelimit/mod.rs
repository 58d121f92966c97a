//! Shared rate limits for model calls: requests and tokens per window, per
//! provider+model, as a token bucket that every analyze process draws from.
//!
//! [`RedisRateLimiter`] keeps the bucket in Redis and updates it in one Lua
//! script (read, refill, take, write happen atomically, so two processes can
//! never both spend the last token). [`MemoryRateLimiter`] is the same bucket
//! for a single process. Other stores (the core keeps one in its SQLite file
//! for dev) hold the three numbers of [`Levels`] and apply its operations
//! under their own lock. Waiting for the bucket is not a failure: [`acquire`]
//! sleeps until the bucket allows the call or the job is cancelled.
//!
//! The bucket holds at most `burst` units and refills at `(limit - burst) /
//! window`. A plain bucket of capacity `limit` refilling at `limit / window`
//! lets `2 * limit` calls through in one window after an idle spell (a full
//! bucket plus a window of refill), which a provider counting per minute
//! answers with 429s; this shape lets at most `limit` through in any window.
//!
//! When the provider answers 429 anyway (another client on the same key, a
//! limit set too high), [`RateLimiter::drain`] empties the request bucket for
//! every process, so the whole fleet backs off, not only the job that got it.
//!
//! # Layout
//! - this file: the trait, the bucket shape and its arithmetic, [`acquire`]
//! - [`memory`]: [`MemoryRateLimiter`], in process
//! - [`redis`]: [`RedisRateLimiter`], the Lua script

use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub mod memory;
pub mod redis;

pub use self::memory::MemoryRateLimiter;
pub use self::redis::RedisRateLimiter;

/// Limits for one provider+model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub requests: u64,
    pub tokens: u64,
    /// One minute in production; tests use a short one.
    pub window: Duration,
}

impl RateLimits {
    pub fn per_minute(requests: u64, tokens: u64) -> Self {
        Self {
            requests,
            tokens,
            window: Duration::from_secs(60),
        }
    }

    /// The (requests, tokens) bucket shapes.
    pub fn shapes(&self) -> (BucketShape, BucketShape) {
        (
            BucketShape::new(self.requests, self.window),
            BucketShape::new(self.tokens, self.window),
        )
    }
}

/// One bucket's shape, in units and units per millisecond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketShape {
    pub capacity: f64,
    pub refill_per_ms: f64,
}

impl BucketShape {
    pub fn new(limit: u64, window: Duration) -> Self {
        let window_ms = (window.as_secs_f64() * 1000.0).max(1.0);
        let limit = limit.max(1) as f64;
        let burst = (limit / 10.0).floor().max(1.0);
        // A limit of 1 leaves nothing to refill with the formula above; one
        // per window is then the best that can be promised.
        let refill = if limit > burst { limit - burst } else { limit };
        Self {
            capacity: burst,
            refill_per_ms: refill / window_ms,
        }
    }
}

/// What one model call takes from the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub requests: u64,
    pub tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Granted,
    /// Not now; the buckets will hold enough after this long.
    Wait(Duration),
}

/// The store behind a limiter failed (Redis down, SQLite file locked).
#[derive(Debug, thiserror::Error)]
#[error("rate limiter unavailable: {0}")]
pub struct RateLimitError(Box<dyn std::error::Error + Send + Sync>);

impl RateLimitError {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(e.into())
    }
}

impl From<::redis::RedisError> for RateLimitError {
    fn from(e: ::redis::RedisError) -> Self {
        Self::new(e)
    }
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes `cost` from the bucket named `key` if both parts fit, else says
    /// how long to wait. A cost above the bucket's capacity is granted when
    /// the bucket is full and leaves it in debt, so a huge prompt is slowed
    /// down rather than refused forever.
    async fn try_acquire(&self, key: &str, cost: Cost) -> Result<Decision, RateLimitError>;

    /// Corrects the token bucket once the real usage is known: `extra` is
    /// actual minus reserved (negative gives tokens back).
    async fn settle(&self, key: &str, extra_tokens: i64) -> Result<(), RateLimitError>;

    /// Empties the request bucket of `key` so that it grants nothing for at
    /// least `for_`, for every process sharing it: the provider answered 429.
    async fn drain(&self, key: &str, for_: Duration) -> Result<(), RateLimitError>;
}

/// Waits until `limiter` grants `cost`, returning how long that took. A
/// cancelled job stops waiting; its result would be discarded anyway.
pub async fn acquire(
    limiter: &dyn RateLimiter,
    key: &str,
    cost: Cost,
    cancelled: &CancellationToken,
) -> Result<Duration, AcquireError> {
    let started = Instant::now();
    loop {
        match limiter.try_acquire(key, cost).await? {
            Decision::Granted => return Ok(started.elapsed()),
            Decision::Wait(d) => {
                // A floor keeps a bucket that is only just short from turning
                // this loop into a busy poll of Redis.
                let d = d.max(Duration::from_millis(5));
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancelled.cancelled() => return Err(AcquireError::Cancelled),
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(transparent)]
    Limiter(#[from] RateLimitError),
    #[error("cancelled while waiting for the rate limit")]
    Cancelled,
}

/// The levels of one key's two buckets and the time they were computed at
/// (ms on the store's clock). The Lua script of [`RedisRateLimiter`] keeps
/// the same three fields in a hash and mirrors these methods line for line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Levels {
    pub requests: f64,
    pub tokens: f64,
    pub at_ms: f64,
}

impl Levels {
    /// A key never seen (or idle long enough) is full.
    pub fn full(limits: &RateLimits, now_ms: f64) -> Self {
        let (r, t) = limits.shapes();
        Self {
            requests: r.capacity,
            tokens: t.capacity,
            at_ms: now_ms,
        }
    }

    /// Adds what flowed in since `at_ms`. A clock that went back adds
    /// nothing rather than draining the buckets.
    pub fn refill(&mut self, limits: &RateLimits, now_ms: f64) {
        let (r, t) = limits.shapes();
        let elapsed = (now_ms - self.at_ms).max(0.0);
        self.requests = (self.requests + elapsed * r.refill_per_ms).min(r.capacity);
        self.tokens = (self.tokens + elapsed * t.refill_per_ms).min(t.capacity);
        self.at_ms = now_ms;
    }

    pub fn take(&mut self, limits: &RateLimits, cost: Cost) -> Decision {
        let (r, t) = limits.shapes();
        let need_r = (cost.requests as f64).min(r.capacity);
        let need_t = (cost.tokens as f64).min(t.capacity);
        if self.requests >= need_r && self.tokens >= need_t {
            self.requests -= cost.requests as f64;
            self.tokens -= cost.tokens as f64;
            return Decision::Granted;
        }
        let wait_r = (need_r - self.requests).max(0.0) / r.refill_per_ms;
        let wait_t = (need_t - self.tokens).max(0.0) / t.refill_per_ms;
        Decision::Wait(Duration::from_millis(wait_r.max(wait_t).ceil() as u64))
    }

    pub fn settle(&mut self, limits: &RateLimits, extra_tokens: i64) {
        let (_, t) = limits.shapes();
        self.tokens = (self.tokens - extra_tokens as f64).min(t.capacity);
    }

    /// Puts the request bucket `for_` of refill into debt (or leaves it
    /// deeper if it already is): nothing is granted before `for_` has passed
    /// and the bucket has refilled one request on top, so the fleet resumes
    /// at the steady rate rather than with a burst.
    pub fn drain(&mut self, limits: &RateLimits, for_: Duration) {
        let (r, _) = limits.shapes();
        let debt = for_.as_secs_f64() * 1000.0 * r.refill_per_ms;
        self.requests = self.requests.min(-debt);
    }

    /// How long until both buckets are full again: a store may forget the
    /// key after that, since a missing key reads as full.
    pub fn full_after(&self, limits: &RateLimits) -> Duration {
        let (r, t) = limits.shapes();
        let ms = ((r.capacity - self.requests).max(0.0) / r.refill_per_ms)
            .max((t.capacity - self.tokens).max(0.0) / t.refill_per_ms);
        Duration::from_millis(ms.ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_never_admits_more_than_the_limit_per_window() {
        for limit in [1u64, 2, 10, 60, 1000, 90_000] {
            let s = BucketShape::new(limit, Duration::from_secs(60));
            let per_window = s.capacity + s.refill_per_ms * 60_000.0;
            assert!(
                per_window <= limit as f64 + 1e-6 || limit == 1,
                "{limit}: {per_window}"
            );
            assert!(s.capacity >= 1.0);
        }
    }

    #[test]
    fn drained_levels_grant_nothing_until_the_drain_is_over() {
        // 60 a minute: burst 6, then 0.9 a second.
        let limits = RateLimits::per_minute(60, 1_000_000);
        let one = Cost {
            requests: 1,
            tokens: 1,
        };
        let mut l = Levels::full(&limits, 0.0);
        l.drain(&limits, Duration::from_secs(5));
        for at in [0.0, 1_000.0, 4_999.0, 5_000.0] {
            l.refill(&limits, at);
            assert!(
                matches!(l.take(&limits, one), Decision::Wait(_)),
                "granted {at} ms into a 5 s drain"
            );
        }
        // One request's refill (1.11 s) after the drain, calls resume.
        l.refill(&limits, 6_200.0);
        assert_eq!(l.take(&limits, one), Decision::Granted);
        // A shorter drain never shortens a longer one already in force.
        let mut deep = Levels::full(&limits, 0.0);
        deep.drain(&limits, Duration::from_secs(30));
        let before = deep;
        deep.drain(&limits, Duration::from_secs(1));
        assert_eq!(deep, before);
        assert!(deep.full_after(&limits) > Duration::from_secs(30));
    }
}
