//! The operator console at `GET /console`: pools, jobs, dead letters grouped
//! by error, webhooks, kept live by `/v1/stream`. Plain HTML, CSS and
//! JavaScript embedded in the binary (no build step, no CDN, works offline),
//! built on the public API plus one read-only route owned here:
//! `GET /v1/jobs/{id}/events`, a job's recorded transitions in order.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{parse_id, ApiError, AppState};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const VIEWS: &str = include_str!("console/views.js");
const STYLE: &str = include_str!("console/style.css");

const JS: [(header::HeaderName, &str); 1] =
    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")];

pub async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

pub async fn script() -> impl IntoResponse {
    (JS, SCRIPT)
}

pub async fn views() -> impl IntoResponse {
    (JS, VIEWS)
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// One recorded transition of a job.
#[derive(Serialize, ToSchema)]
pub struct JobEventView {
    /// `job.queued`, `job.started`, `job.retrying`, ...
    #[serde(rename = "type")]
    pub event_type: String,
    pub attempt: i32,
    pub at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct JobEvents {
    pub events: Vec<JobEventView>,
}

/// A job's events, oldest first (404 when the job does not exist).
#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = Uuid, Path)), responses(
    (status = 200, body = JobEvents), (status = 404, body = super::error::ErrorBody)))]
pub async fn job_events(
    State(s): State<AppState>,
    Extension(who): Extension<crate::auth::Principal>,
    Path(id): Path<String>,
) -> Result<Json<JobEvents>, ApiError> {
    let id = parse_id(&id)?;
    if super::own_job(&s, &who, id).await?.is_none() {
        return Err(ApiError::NotFound("job"));
    }
    let events = s
        .store
        .job_events(id)
        .await?
        .into_iter()
        .map(|e| JobEventView {
            event_type: e.kind,
            attempt: e.attempt,
            at: e.at,
        })
        .collect();
    Ok(Json(JobEvents { events }))
}
