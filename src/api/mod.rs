//! The HTTP API (axum): routes, shared state and the request-body rules
//! (1 MiB limit, strict JSON). Handlers live in `jobs`, `dlq`, `stream`
//! (SSE and WebSocket), `webhooks`, `display` (the live page) and `console`
//! (the operator console and its job-events route), `pools` (pausing),
//! `bulk` (actions by filter), `schedules` (cron), `concurrency` (limits per
//! concurrency key). Routes are registered with their OpenAPI operations
//! in [`documented`] (the document is completed in `openapi`); keys, scopes and the browser rules are checked in
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
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use stevedore_handler::FieldError;
use tokio::sync::Notify;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
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

/// Every API route: each `routes!` puts the handlers of one path into the
/// router and their operations into the OpenAPI document, from the
/// handlers' `#[utoipa::path]` annotations, so no route goes undocumented.
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::head())
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::submit_batch))
        .routes(routes!(bulk::cancel))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::cancel))
        .routes(routes!(console::job_events))
        .routes(routes!(dlq::list))
        .routes(routes!(bulk::replay))
        .routes(routes!(bulk::purge))
        .routes(routes!(dlq::show, dlq::purge))
        .routes(routes!(dlq::replay))
        .routes(routes!(jobs::stats))
        .routes(routes!(pools::list))
        .routes(routes!(pools::pause))
        .routes(routes!(pools::resume))
        .routes(routes!(concurrency::list))
        .routes(routes!(concurrency::put, concurrency::remove))
        .routes(routes!(schedules::put, schedules::list))
        .routes(routes!(schedules::get, schedules::remove))
        .routes(routes!(schedules::pause))
        .routes(routes!(schedules::resume))
        .routes(routes!(stream::sse))
        .routes(routes!(stream::ws))
        .routes(routes!(auth::stream_ticket))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::remove))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::retry))
        .routes(routes!(webhooks::signing_secret))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(observe::api_metrics))
}

/// The OpenAPI document `/openapi.json` serves.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    openapi::finish(documented().into_openapi())
}

pub fn router(state: AppState) -> Router {
    let (api, doc) = documented().split_for_parts();
    // Serialised once: the document cannot change while the process runs.
    let doc = Bytes::from(serde_json::to_vec(&openapi::finish(doc)).unwrap_or_default());
    let routes = api
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc) }),
        )
        // The pages and their assets: for people, not part of the API.
        .route("/", get(display::page))
        .route("/display/app.js", get(display::script))
        .route("/display/style.css", get(display::style))
        .route("/assets/key.js", get(display::key_script))
        .route("/console", get(console::page))
        .route("/console/app.js", get(console::script))
        .route("/console/views.js", get(console::views))
        .route("/console/style.css", get(console::style))
        .route_layer(middleware::from_fn(refuse_nul))
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
    if let Some(field) = nul_in(&value, "") {
        return Err(ApiError::Invalid(FieldError::new(field, NUL)));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ApiError::Invalid(FieldError::new(field, e.inner().to_string()))
    })
}

/// Postgres text and JSON cannot hold U+0000, so it is refused at the door
/// (on SQLite too: an API answers the same whatever its store).
const NUL: &str = "must not contain the NUL character (U+0000)";

/// The path (`jobs[2].payload.url`) of the first string or key holding a
/// NUL character.
fn nul_in(v: &serde_json::Value, at: &str) -> Option<String> {
    let join = |k: &str| {
        if at.is_empty() {
            k.to_owned()
        } else {
            format!("{at}.{k}")
        }
    };
    match v {
        serde_json::Value::String(s) => s.contains('\0').then(|| at.to_owned()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in(item, &format!("{at}[{i}]"))),
        serde_json::Value::Object(m) => m.iter().find_map(|(k, item)| {
            if k.contains('\0') {
                Some(join(k))
            } else {
                nul_in(item, &join(k))
            }
        }),
        _ => None,
    }
}

/// Refuses a path or query parameter holding a NUL character with a 400
/// naming it (the route's `{name}` for a path segment), before any handler
/// passes it to the store.
async fn refuse_nul(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let decoded = |raw: &str| percent_decoded(raw).contains('\0');
    let mut field = None;
    if decoded(req.uri().path()) {
        let template = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        field = Some(
            req.uri()
                .path()
                .split('/')
                .zip(template.split('/'))
                .find(|(seg, _)| decoded(seg))
                .map(|(_, t)| t.trim_matches(|c| c == '{' || c == '}').to_owned())
                .unwrap_or_else(|| "path".to_owned()),
        );
    } else if let Some(q) = req.uri().query().filter(|q| decoded(q)) {
        field = Some(
            q.split('&')
                .find(|pair| decoded(pair))
                .and_then(|pair| pair.split('=').next())
                .map(percent_decoded)
                .unwrap_or_else(|| "query".to_owned()),
        );
    }
    match field {
        Some(f) => ApiError::BadParam(FieldError::new(f, NUL)).into_response(),
        None => next.run(req).await,
    }
}

fn percent_decoded(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
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

/// The answer to an action on one job or delivery: its id and the status
/// the action left it in.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Acted {
    pub id: Uuid,
    pub status: &'static str,
    /// Only on a running job's cancel: its worker stops it at its next
    /// lease check.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
}

impl Acted {
    pub fn new(id: Uuid, status: &'static str) -> Self {
        Self {
            id,
            status,
            cancel_requested: false,
        }
    }
}

pub(crate) fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadParam(FieldError::new("id", "not a UUID")))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// The process is up (it says nothing of its dependencies: `/readyz` does).
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Readiness {
    ready: bool,
    /// `ok` or `unreachable`.
    database: &'static str,
    /// Each broker in use: `ok` or `unreachable`.
    brokers: std::collections::BTreeMap<String, &'static str>,
}

/// Whether the database and every broker in use answer; which one is down,
/// without the driver's error text (the log has it).
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Database and every broker in use are reachable", body = Readiness),
    (status = 503, description = "A dependency is down", body = Readiness)))]
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    // Say which dependency is down, not the driver's error text (which can
    // carry host names and credentials' shape); the log has the detail.
    let database = match s.store.ping().await {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "Readiness: database unreachable.");
            "unreachable"
        }
    };
    let mut ready = database == "ok";
    let mut brokers = std::collections::BTreeMap::new();
    for b in s.brokers.all() {
        let state = match b.ping().await {
            Ok(()) => "ok",
            Err(e) => {
                ready = false;
                tracing::warn!(broker = b.name(), error = %e, "Readiness: broker unreachable.");
                "unreachable"
            }
        };
        brokers.insert(b.name().to_owned(), state);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready,
        database,
        brokers,
    };
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
