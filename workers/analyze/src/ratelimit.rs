//! Shared rate limits for model calls: requests and tokens per window, per
//! provider+model, as a token bucket that every analyze process draws from.
//!
//! [`RedisRateLimiter`] keeps the bucket in Redis and updates it in one Lua
//! script (read, refill, take, write happen atomically, so two processes can
//! never both spend the last token). [`MemoryRateLimiter`] is the same bucket
//! for the single-process dev mode. Waiting for the bucket is not a failure:
//! [`acquire`] sleeps until the bucket allows the call or the job is cancelled.
//!
//! The bucket holds at most `burst` units and refills at `(limit - burst) /
//! window`. A plain bucket of capacity `limit` refilling at `limit / window`
//! lets `2 * limit` calls through in one window after an idle spell (a full
//! bucket plus a window of refill), which a provider counting per minute
//! answers with 429s; this shape lets at most `limit` through in any window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

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

#[derive(Debug, thiserror::Error)]
#[error("rate limiter unavailable: {0}")]
pub struct RateLimitError(#[from] redis::RedisError);

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

/// Bucket levels; the Lua script keeps the same three fields in a hash.
#[derive(Debug, Clone, Copy)]
struct Levels {
    requests: f64,
    tokens: f64,
    at_ms: f64,
}

/// The bucket arithmetic, mirrored line for line by [`TAKE_SCRIPT`].
fn refill(l: &mut Levels, now_ms: f64, r: BucketShape, t: BucketShape) {
    let elapsed = (now_ms - l.at_ms).max(0.0);
    l.requests = (l.requests + elapsed * r.refill_per_ms).min(r.capacity);
    l.tokens = (l.tokens + elapsed * t.refill_per_ms).min(t.capacity);
    l.at_ms = now_ms;
}

fn take(l: &mut Levels, r: BucketShape, t: BucketShape, cost: Cost) -> Decision {
    let need_r = (cost.requests as f64).min(r.capacity);
    let need_t = (cost.tokens as f64).min(t.capacity);
    if l.requests >= need_r && l.tokens >= need_t {
        l.requests -= cost.requests as f64;
        l.tokens -= cost.tokens as f64;
        return Decision::Granted;
    }
    let wait_r = (need_r - l.requests).max(0.0) / r.refill_per_ms;
    let wait_t = (need_t - l.tokens).max(0.0) / t.refill_per_ms;
    Decision::Wait(Duration::from_millis(wait_r.max(wait_t).ceil() as u64))
}

/// In-process buckets for `stevedore dev`, where one process is the fleet.
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

    fn with_levels<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut Levels, BucketShape, BucketShape) -> T,
    ) -> T {
        let r = BucketShape::new(self.limits.requests, self.limits.window);
        let t = BucketShape::new(self.limits.tokens, self.limits.window);
        let now_ms = self.epoch.elapsed().as_secs_f64() * 1000.0;
        // A panic elsewhere cannot leave a bucket half-updated (the update
        // is plain float stores), so a poisoned lock is safe to reuse.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let levels = buckets.entry(key.to_owned()).or_insert(Levels {
            requests: r.capacity,
            tokens: t.capacity,
            at_ms: now_ms,
        });
        refill(levels, now_ms, r, t);
        f(levels, r, t)
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn try_acquire(&self, key: &str, cost: Cost) -> Result<Decision, RateLimitError> {
        Ok(self.with_levels(key, |l, r, t| take(l, r, t, cost)))
    }

    async fn settle(&self, key: &str, extra_tokens: i64) -> Result<(), RateLimitError> {
        self.with_levels(key, |l, _, t| {
            l.tokens = (l.tokens - extra_tokens as f64).min(t.capacity);
        });
        Ok(())
    }
}

/// KEYS[1]: the bucket hash. ARGV: request capacity, request refill per ms,
/// token capacity, token refill per ms, request cost, token cost, ttl ms,
/// mode (`take` or `settle`). Returns {granted, wait_ms, now_ms}.
///
/// Time comes from Redis (`TIME`), not the callers, so processes whose clocks
/// disagree still share one timeline. Levels are written with `%.17g`
/// because Redis would otherwise round a Lua number passed to HSET.
const TAKE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rcap, rrate = tonumber(ARGV[1]), tonumber(ARGV[2])
local tcap, trate = tonumber(ARGV[3]), tonumber(ARGV[4])
local rcost, tcost = tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'r', 't', 'at')
local r = tonumber(h[1]) or rcap
local tk = tonumber(h[2]) or tcap
local at = tonumber(h[3]) or now
local elapsed = math.max(0, now - at)
r = math.min(rcap, r + elapsed * rrate)
tk = math.min(tcap, tk + elapsed * trate)
local granted, wait = 0, 0
if ARGV[8] == 'settle' then
  tk = math.min(tcap, tk - tcost)
  granted = 1
else
  local need_r, need_t = math.min(rcost, rcap), math.min(tcost, tcap)
  if r >= need_r and tk >= need_t then
    r = r - rcost
    tk = tk - tcost
    granted = 1
  else
    wait = math.max(math.max(0, need_r - r) / rrate, math.max(0, need_t - tk) / trate)
  end
end
redis.call('HSET', KEYS[1], 'r', string.format('%.17g', r), 't', string.format('%.17g', tk),
  'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {granted, math.ceil(wait), math.floor(now)}
"#;

/// Buckets in Redis, shared by every process that uses the same prefix.
#[derive(Clone)]
pub struct RedisRateLimiter {
    conn: ConnectionManager,
    prefix: String,
    limits: RateLimits,
    script: redis::Script,
}

impl RedisRateLimiter {
    /// `prefix` namespaces the keys (tests use a unique one per test).
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>, limits: RateLimits) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            limits,
            script: redis::Script::new(TAKE_SCRIPT),
        }
    }

    /// Like [`RateLimiter::try_acquire`], plus the Redis time (ms since the
    /// epoch) at which the decision was made, so tests can check the limit
    /// on the limiter's own timeline.
    pub async fn try_acquire_at(
        &self,
        key: &str,
        cost: Cost,
    ) -> Result<(Decision, u64), RateLimitError> {
        let (granted, wait_ms, now_ms) = self
            .run(key, cost.requests, cost.tokens as i64, "take")
            .await?;
        let decision = if granted == 1 {
            Decision::Granted
        } else {
            Decision::Wait(Duration::from_millis(wait_ms))
        };
        Ok((decision, now_ms))
    }

    async fn run(
        &self,
        key: &str,
        requests: u64,
        tokens: i64,
        mode: &str,
    ) -> Result<(u64, u64, u64), RateLimitError> {
        let r = BucketShape::new(self.limits.requests, self.limits.window);
        let t = BucketShape::new(self.limits.tokens, self.limits.window);
        // An idle bucket refills completely within one window, so after two
        // a missing key (read as full) tells the truth.
        let ttl_ms = (self.limits.window.as_millis() as u64).max(1) * 2;
        let mut conn = self.conn.clone();
        let reply: (u64, u64, u64) = self
            .script
            .key(format!("{}ratelimit:{key}", self.prefix))
            .arg(r.capacity)
            .arg(r.refill_per_ms)
            .arg(t.capacity)
            .arg(t.refill_per_ms)
            .arg(requests)
            .arg(tokens)
            .arg(ttl_ms)
            .arg(mode)
            .invoke_async(&mut conn)
            .await?;
        Ok(reply)
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn try_acquire(&self, key: &str, cost: Cost) -> Result<Decision, RateLimitError> {
        Ok(self.try_acquire_at(key, cost).await?.0)
    }

    async fn settle(&self, key: &str, extra_tokens: i64) -> Result<(), RateLimitError> {
        self.run(key, 0, extra_tokens, "settle").await.map(|_| ())
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

    #[tokio::test]
    async fn memory_bucket_waits_then_grants_and_oversized_costs_go_into_debt() {
        let limiter = MemoryRateLimiter::new(RateLimits {
            requests: 20,
            tokens: 1000,
            window: Duration::from_secs(60),
        });
        let one = Cost {
            requests: 1,
            tokens: 1,
        };
        assert_eq!(
            limiter.try_acquire("k", one).await.ok(),
            Some(Decision::Granted)
        );
        assert_eq!(
            limiter.try_acquire("k", one).await.ok(),
            Some(Decision::Granted)
        );
        let Ok(Decision::Wait(d)) = limiter.try_acquire("k", one).await else {
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
            limiter.try_acquire("other", one).await,
            Ok(Decision::Wait(_))
        ));
    }
}
