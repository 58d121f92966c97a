//! What keeps the API answering under load: every request but the streams
//! has a deadline, and past a number of requests in flight new ones are
//! turned away at once with 503 and `Retry-After` (load shedding), instead
//! of queueing until every client times out.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

/// The API's load limits (`STEVEDORE_API_TIMEOUT_SECS`,
/// `STEVEDORE_API_MAX_IN_FLIGHT`).
#[derive(Clone)]
pub struct Limits {
    pub timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl Limits {
    pub fn new(timeout: Duration, max_in_flight: usize) -> Self {
        Self {
            timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(Duration::from_secs(30), 1024)
    }
}

fn unavailable(code: &'static str, message: &str) -> Response {
    let mut r = super::error::respond(StatusCode::SERVICE_UNAVAILABLE, code, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A route layer: streams stay open for as long as their client reads, so
/// neither the deadline nor the in-flight count applies to them.
pub async fn limit(State(s): State<super::AppState>, req: Request, next: Next) -> Response {
    let stream = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|m| super::auth::is_stream(m.as_str()));
    if stream {
        return next.run(req).await;
    }
    let Ok(_permit) = s.limits.in_flight.clone().try_acquire_owned() else {
        crate::metrics::API_SHED.inc();
        return unavailable("overloaded", "too many requests in flight; retry shortly");
    };
    match tokio::time::timeout(s.limits.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => unavailable("timeout", "the request took too long; retry later"),
    }
}

/// Per-key request rates, counted in Redis so every API process shares
/// them: one counter per key and fixed window, expiring with the window.
#[derive(Clone)]
pub struct KeyRates {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

/// What a rate check says, for the `RateLimit` headers.
pub struct RateCheck {
    pub allowed: bool,
    pub remaining: u32,
    /// Seconds until the window ends.
    pub reset: u64,
}

impl KeyRates {
    pub fn new(conn: redis::aio::ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: format!("{prefix}:ratelimit:"),
        }
    }

    pub async fn hit(
        &self,
        key: uuid::Uuid,
        rate: crate::auth::Rate,
    ) -> Result<RateCheck, redis::RedisError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let window = u64::from(rate.window_secs.max(1));
        let slot = now / window;
        let k = format!("{}{key}:{slot}", self.prefix);
        let mut c = self.conn.clone();
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .incr(&k, 1)
            .expire(&k, i64::try_from(window + 1).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut c)
            .await?;
        let limit = u64::from(rate.limit);
        Ok(RateCheck {
            allowed: count <= limit,
            remaining: u32::try_from(limit.saturating_sub(count)).unwrap_or(u32::MAX),
            reset: (slot + 1) * window - now,
        })
    }
}

/// The IETF `RateLimit` / `RateLimit-Policy` headers, and `Retry-After`
/// when refused.
pub fn rate_headers(r: &mut Response, rate: crate::auth::Rate, check: &RateCheck) {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("{};w={}", rate.limit, rate.window_secs)) {
        h.insert("ratelimit-policy", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "limit={}, remaining={}, reset={}",
        rate.limit, check.remaining, check.reset
    )) {
        h.insert("ratelimit", v);
    }
    if !check.allowed {
        if let Ok(v) = HeaderValue::from_str(&check.reset.max(1).to_string()) {
            h.insert(header::RETRY_AFTER, v);
        }
    }
}
