//! What keeps the API answering under load: every request but the streams
//! has a deadline, and past a number of requests in flight new ones are
//! turned away at once with 503 and `Retry-After` (load shedding), instead
//! of queueing until every client times out.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
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
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
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
        .is_some_and(|m| m.as_str() == "/v1/stream" || m.as_str() == "/v1/events");
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
