//! Dead-letter routes: list, show, replay (a fresh budget of attempts; the
//! attempt numbers and the error history carry on) and purge.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::jobs::{filter_from, page, JobPage, ListQuery};
use super::query;
use super::{own_job, parse_id, ApiError, AppState};
use crate::auth::Principal;
use crate::model::job::Job;
use crate::model::JobStatus;
use crate::store::DeadLetterOutcome;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeadQuery {
    pub kind: Option<String>,
    /// 1..=500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    pub cursor: Option<Uuid>,
}

/// Dead jobs, newest first.
#[utoipa::path(get, path = "/v1/dead-letters", params(DeadQuery), responses((status = 200, body = JobPage)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    q: Result<Query<DeadQuery>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let q = query(q)?;
    let mut f = filter_from(
        ListQuery {
            status: None,
            kind: q.kind,
            limit: q.limit,
            cursor: q.cursor,
        },
        &who,
    )?;
    f.status = Some(JobStatus::Dead);
    let jobs = s.store.list_jobs(&f).await?;
    Ok(Json(page(jobs, f.limit)))
}

/// One dead job with its whole error history.
#[utoipa::path(get, path = "/v1/dead-letters/{id}", params(("id" = Uuid, Path)), responses(
    (status = 200, body = Job), (status = 404, body = super::error::ErrorBody)))]
pub async fn show(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(&id)?;
    match own_job(&s, &who, id).await? {
        Some(j) if j.status == JobStatus::Dead => Ok(Json(j)),
        _ => Err(ApiError::NotFound("dead letter")),
    }
}

fn outcome(o: DeadLetterOutcome) -> Result<(), ApiError> {
    match o {
        DeadLetterOutcome::Done => Ok(()),
        DeadLetterOutcome::NotDead(st) => Err(ApiError::Conflict(format!(
            "job is {}, not dead",
            st.as_str()
        ))),
        DeadLetterOutcome::NotFound => Err(ApiError::NotFound("dead letter")),
    }
}

/// Put a dead job back in the queue with a fresh budget of attempts.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", params(("id" = Uuid, Path)), responses(
    (status = 200, description = "Queued again", body = super::Acted), (status = 404, body = super::error::ErrorBody),
    (status = 409, description = "Not dead", body = super::error::ErrorBody)))]
pub async fn replay(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if own_job(&s, &who, id).await?.is_none() {
        return Err(ApiError::NotFound("dead letter"));
    }
    outcome(s.store.replay(id).await?)?;
    if let Some(w) = &s.wake {
        w.notify_one();
    }
    Ok(Json(super::Acted::new(id, "queued")).into_response())
}

/// Delete a dead job for good.
#[utoipa::path(delete, path = "/v1/dead-letters/{id}", params(("id" = Uuid, Path)), responses(
    (status = 204, description = "Purged"), (status = 404, body = super::error::ErrorBody),
    (status = 409, description = "Not dead", body = super::error::ErrorBody)))]
pub async fn purge(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if own_job(&s, &who, id).await?.is_none() {
        return Err(ApiError::NotFound("dead letter"));
    }
    outcome(s.store.purge(id).await?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
