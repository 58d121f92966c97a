//! What the API tells operators about each request: a request id (kept from
//! `x-request-id`, generated when absent) in the response and in the
//! request's log span (which continues a caller's `traceparent` when
//! traces are on), and Prometheus counters and a latency histogram by
//! route template and status class. Also the API's `/metrics`, which first
//! checks the database and brokers so an unreachable dependency shows as a
//! series rather than only in `/readyz`.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use super::AppState;
use crate::metrics;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `STEVEDORE_REQUEST_METRICS=off` drops the counters and histogram (request
/// ids stay): the switch exists to measure their cost.
static METRICS_ON: LazyLock<bool> = LazyLock::new(|| {
    !matches!(
        crate::config::env_setting("STEVEDORE_REQUEST_METRICS").as_deref(),
        Some("off" | "0" | "false")
    )
});

/// Wraps every route (and the fallback) of `router` in the request-id,
/// trace and metrics layers.
pub fn layer<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    let router = if *METRICS_ON {
        router.layer(middleware::from_fn(track))
    } else {
        router
    };
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(TraceLayer::new_for_http().make_span_with(span))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
    )
}

fn span(req: &Request) -> tracing::Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    // A caller's trace continues through the request (traced processes only).
    if crate::telemetry::enabled() {
        if let Some(parent) = crate::telemetry::from_headers(req.headers()) {
            crate::telemetry::continue_trace(&span, Some(&parent));
        }
    }
    span
}

/// Labels stay bounded: the route is the template (`/v1/jobs/{id}`), never
/// the path, and a path no route matched is `unmatched`.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    let class = match resp.status().as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    };
    metrics::HTTP_REQUESTS
        .with_label_values(&[&route, method, class])
        .inc();
    metrics::HTTP_DURATION
        .with_label_values(&[&route, method])
        .observe(start.elapsed().as_secs_f64());
    resp
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A dependency that does not answer within this is reported down, so a
/// hung database cannot make the scrape itself time out.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Prometheus metrics of this API process, in the text exposition format.
#[utoipa::path(get, path = "/metrics", security((), ("metrics_token" = [])), responses(
    (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4"),
    (status = 401, description = "`STEVEDORE_METRICS_TOKEN` is set and was not sent", body = super::error::ErrorBody)))]
pub(super) async fn api_metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(refused) = super::auth::metrics_refusal(&s, &headers) {
        return refused;
    }
    let db = tokio::time::timeout(PING_TIMEOUT, s.store.ping()).await;
    metrics::DEPENDENCY_UP
        .with_label_values(&["database"])
        .set(i64::from(matches!(db, Ok(Ok(())))));
    for b in s.brokers.all() {
        let ok = matches!(
            tokio::time::timeout(PING_TIMEOUT, b.ping()).await,
            Ok(Ok(()))
        );
        metrics::DEPENDENCY_UP
            .with_label_values(&[b.name()])
            .set(i64::from(ok));
    }
    super::metrics().await.into_response()
}
