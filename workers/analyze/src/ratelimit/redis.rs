//! [`RedisRateLimiter`]: the buckets in Redis, shared by every process that
//! uses the same key prefix, each update one Lua script.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{Cost, Decision, RateLimitError, RateLimiter, RateLimits};

/// KEYS[1]: the bucket hash. ARGV: request capacity, request refill per ms,
/// token capacity, token refill per ms, request cost, token cost, minimum
/// ttl ms, mode (`take`, `settle` or `drain`), drain ms. Returns {granted,
/// wait_ms, now_ms}. Mirrors [`super::Levels`].
///
/// Time comes from Redis (`TIME`), not the callers, so processes whose clocks
/// disagree still share one timeline. Levels are written with `%.17g`
/// because Redis would otherwise round a Lua number passed to HSET. The key
/// lives until both buckets would be full again (a missing key reads as
/// full), so a drain or a debt longer than the minimum ttl is not forgotten.
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
elseif ARGV[8] == 'drain' then
  r = math.min(r, -tonumber(ARGV[9]) * rrate)
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
local full_after = math.max((rcap - r) / rrate, (tcap - tk) / trate)
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[7]), math.ceil(full_after) + 1000))
return {granted, math.ceil(wait), math.floor(now)}
"#;

#[derive(Clone)]
pub struct RedisRateLimiter {
    conn: ConnectionManager,
    prefix: String,
    limits: RateLimits,
    script: redis::Script,
}

/// What one script run changes, beyond the refill it always does.
enum Op {
    Take(Cost),
    Settle(i64),
    Drain(Duration),
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
        let (granted, wait_ms, now_ms) = self.run(key, Op::Take(cost)).await?;
        let decision = if granted == 1 {
            Decision::Granted
        } else {
            Decision::Wait(Duration::from_millis(wait_ms))
        };
        Ok((decision, now_ms))
    }

    async fn run(&self, key: &str, op: Op) -> Result<(u64, u64, u64), RateLimitError> {
        let (r, t) = self.limits.shapes();
        let (mode, requests, tokens, drain_ms) = match op {
            Op::Take(c) => ("take", c.requests, c.tokens as i64, 0),
            Op::Settle(extra) => ("settle", 0, extra, 0),
            Op::Drain(d) => ("drain", 0, 0, d.as_millis() as u64),
        };
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
            .arg(drain_ms)
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
        self.run(key, Op::Settle(extra_tokens)).await.map(|_| ())
    }

    async fn drain(&self, key: &str, for_: Duration) -> Result<(), RateLimitError> {
        self.run(key, Op::Drain(for_)).await.map(|_| ())
    }
}
