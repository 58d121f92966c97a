//! The HTTP API (axum): routes, shared state and the request-body rules
//! (1 MiB limit, strict JSON). Handlers live in `jobs`, `dlq`, `stream`
//! (SSE and WebSocket), `webhooks`, `display` (the live page) and `console`
//! (the operator console and its job-events route), `pools` (pausing),
//! `bulk` (actions by filter), `schedules` (cron), `concurrency` (limits per
//! concurrency key); the OpenAPI document is
//! assembled in `openapi`; keys, scopes and the browser rules are checked in
//! `auth`; request ids and request metrics are layered on in `observe`.

pub mod auth;
mod bulk;
mod concurrency;
mod console;
mod display;
mod dlq;
pub mod error;
mod jobs;
pub mod limits;
mod observe;
mod openapi;
mod pools;
mod schedules;
mod stream;
mod webhooks;

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use stevedore_handler::FieldError;
use tokio::sync::Notify;
use uuid::Uuid;

pub use error::ApiError;

use crate::broker::Brokers;
use crate::kinds::Kinds;
use crate::notifier::hub::Hub;
use crate::notifier::WebhookConfig;
use crate::store::events::EventStore;
use crate::store::Store;

pub const BODY_LIMIT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub kinds: Kinds,
    pub brokers: Brokers,
    /// Wakes an in-process outbox relay right after a submit commits.
    pub wake: Option<Arc<Notify>>,
    pub events: Arc<dyn EventStore>,
    /// Feeds this process's stream clients.
    pub hub: Arc<Hub>,
    /// The SSRF guard and default secret, checked at registration and submit.
    pub webhooks: WebhookConfig,
    /// Cancelled at shutdown: ends open streams, which graceful shutdown
    /// would otherwise wait for forever.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// API keys, or open (dev mode, `--insecure-no-auth`).
    pub access: auth::Access,
    /// Origins besides the API's own that may open the streams.
    pub allowed_origins: Arc<[String]>,
    /// The bearer token `/metrics` asks for, when set.
    pub metrics_token: Option<Arc<str>>,
    /// Request deadline and in-flight cap.
    pub limits: limits::Limits,
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::submit_batch))
        .route("/v1/jobs/cancel", post(bulk::cancel))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(console::job_events))
        .route("/v1/dead-letters", get(dlq::list))
        .route("/v1/dead-letters/replay", post(bulk::replay))
        .route("/v1/dead-letters/purge", post(bulk::purge))
        .route("/v1/dead-letters/{id}", get(dlq::show).delete(dlq::purge))
        .route("/v1/dead-letters/{id}/replay", post(dlq::replay))
        .route("/v1/stats", get(jobs::stats))
        .route("/v1/pools", get(pools::list))
        .route("/v1/pools/{pool}/pause", post(pools::pause))
        .route("/v1/pools/{pool}/resume", post(pools::resume))
        .route("/v1/concurrency-limits", get(concurrency::list))
        .route(
            "/v1/concurrency-limits/{prefix}",
            axum::routing::put(concurrency::put).delete(concurrency::remove),
        )
        .route("/v1/schedules", post(schedules::put).get(schedules::list))
        .route(
            "/v1/schedules/{name}",
            get(schedules::get).delete(schedules::remove),
        )
        .route("/v1/schedules/{name}/pause", post(schedules::pause))
        .route("/v1/schedules/{name}/resume", post(schedules::resume))
        .route("/v1/events", get(stream::sse))
        .route("/v1/stream", get(stream::ws))
        .route("/v1/stream-tickets", post(auth::stream_ticket))
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route("/v1/webhooks/{id}", axum::routing::delete(webhooks::remove))
        .route("/v1/webhook-deliveries", get(webhooks::deliveries))
        .route("/v1/webhook-deliveries/{id}/retry", post(webhooks::retry))
        .route("/v1/webhook-signing-secret", get(webhooks::signing_secret))
        .route("/", get(display::page))
        .route("/display/app.js", get(display::script))
        .route("/display/style.css", get(display::style))
        .route("/assets/key.js", get(display::key_script))
        .route("/console", get(console::page))
        .route("/console/app.js", get(console::script))
        .route("/console/views.js", get(console::views))
        .route("/console/style.css", get(console::style))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(observe::api_metrics).route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::metrics_token,
            )),
        )
        .route("/openapi.json", get(openapi::document))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), limits::limit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(auth::security_headers));
    observe::layer(routes).with_state(state)
}

/// `/metrics` and `/healthz` alone, for worker and dispatcher processes.
pub fn metrics_router() -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> impl IntoResponse {
    error::respond(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Parses a JSON body strictly: 413 over the limit, 400 when it is not JSON,
/// 422 naming the field when it is JSON of the wrong shape.
pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::NotJson(e.body_text())
        }
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::NotJson(e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ApiError::Invalid(FieldError::new(field, e.inner().to_string()))
    })
}

/// A query string, or a 400 naming it.
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::BadParam(FieldError::new("query", e.body_text())))
}

/// The job, if it exists and belongs to the asker's tenant: another
/// tenant's id answers exactly like one that does not exist (404, not 403).
pub(crate) async fn own_job(
    s: &AppState,
    who: &crate::auth::Principal,
    id: Uuid,
) -> Result<Option<crate::model::job::Job>, ApiError> {
    Ok(s.store
        .get_job(id)
        .await?
        .filter(|j| j.tenant == who.tenant))
}

pub(crate) fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadParam(FieldError::new("id", "not a UUID")))
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up")))]
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Database and every broker in use are reachable"),
    (status = 503, description = "A dependency is down")))]
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    // Say which dependency is down, not the driver's error text (which can
    // carry host names and credentials' shape); the log has the detail.
    let db = match s.store.ping().await {
        Ok(()) => "ok".to_owned(),
        Err(e) => {
            tracing::warn!(error = %e, "Readiness: database unreachable.");
            "unreachable".to_owned()
        }
    };
    let mut ready = db == "ok";
    let mut brokers = serde_json::Map::new();
    for b in s.brokers.all() {
        let state = match b.ping().await {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                ready = false;
                tracing::warn!(broker = b.name(), error = %e, "Readiness: broker unreachable.");
                "unreachable".to_owned()
            }
        };
        brokers.insert(b.name().to_owned(), state.into());
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"ready": ready, "database": db, "brokers": brokers});
    (status, Json(body))
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(),
    )
}
