//! Cron schedule routes: create or replace, list, show, delete, pause and
//! resume a tenant's schedules. The dispatcher fires them
//! ([`crate::dispatcher`]); each job they make carries the schedule's name
//! and the fire time it was made for.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use super::{parse_body, ApiError, AppState};
use crate::auth::Principal;
use crate::model::schedule::{NewSchedule, Plan, Schedule, ScheduleRequest};

/// Schedules one tenant may have: each polls nothing, but each fire is a
/// job, and a runaway script should meet a limit.
pub const MAX_SCHEDULES: usize = 1000;

#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<Schedule>,
}

/// Create a schedule, or replace the one of the same name (its next fire
/// time is worked out again; a paused one stays paused).
#[utoipa::path(post, path = "/v1/schedules", request_body = ScheduleRequest, responses(
    (status = 201, description = "Created", body = Schedule),
    (status = 200, description = "Replaced", body = Schedule),
    (status = 400, description = "Not JSON", body = super::error::ErrorBody),
    (status = 409, description = "The tenant has as many schedules as it may", body = super::error::ErrorBody),
    (status = 422, description = "Invalid; `field` names it (`cron`, `timezone`, `job.payload.url`, ...)", body = super::error::ErrorBody)))]
pub async fn put(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ScheduleRequest = parse_body(body)?;
    let new = NewSchedule::parse(req, &who.tenant, &s.kinds, chrono::Utc::now())
        .map_err(ApiError::Invalid)?;
    let existing = s.store.schedules(&who.tenant).await?;
    if existing.len() >= MAX_SCHEDULES && !existing.iter().any(|e| e.name == new.name) {
        return Err(ApiError::Conflict(format!(
            "the tenant has {MAX_SCHEDULES} schedules, the most it may have; delete one first"
        )));
    }
    let created = s.store.put_schedule(&new).await?;
    let shown = one(&s, &who, &new.name).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(shown)).into_response())
}

/// The tenant's schedules by name.
#[utoipa::path(get, path = "/v1/schedules", responses((status = 200, body = ScheduleList)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<ScheduleList>, ApiError> {
    Ok(Json(ScheduleList {
        schedules: s.store.schedules(&who.tenant).await?,
    }))
}

/// One schedule: its pattern, next and last fire, and the last job it made.
#[utoipa::path(get, path = "/v1/schedules/{name}", params(("name" = String, Path, pattern = "^[A-Za-z0-9._-]{1,100}$")), responses(
    (status = 200, body = Schedule), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    one(&s, &who, &name).await.map(Json)
}

/// Stops the schedule for good; the jobs it made stay.
#[utoipa::path(delete, path = "/v1/schedules/{name}", params(("name" = String, Path, pattern = "^[A-Za-z0-9._-]{1,100}$")), responses(
    (status = 204, description = "Deleted"), (status = 404, body = super::error::ErrorBody)))]
pub async fn remove(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if s.store.delete_schedule(&who.tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("schedule"))
    }
}

/// No fires until resumed.
#[utoipa::path(post, path = "/v1/schedules/{name}/pause", params(("name" = String, Path, pattern = "^[A-Za-z0-9._-]{1,100}$")), responses(
    (status = 200, body = Schedule), (status = 404, body = super::error::ErrorBody)))]
pub async fn pause(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    if !s
        .store
        .set_schedule_paused(&who.tenant, &name, None)
        .await?
    {
        return Err(ApiError::NotFound("schedule"));
    }
    one(&s, &who, &name).await.map(Json)
}

/// Fires again from the next fire time after now: what it missed while
/// paused is not made up.
#[utoipa::path(post, path = "/v1/schedules/{name}/resume", params(("name" = String, Path, pattern = "^[A-Za-z0-9._-]{1,100}$")), responses(
    (status = 200, body = Schedule), (status = 404, body = super::error::ErrorBody)))]
pub async fn resume(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    let current = one(&s, &who, &name).await?;
    let next = Plan::parse(&current.cron, &current.timezone)
        .map_err(ApiError::Invalid)?
        .next_after(chrono::Utc::now());
    if next.is_none() {
        return Err(ApiError::Conflict(
            "the schedule's pattern never matches a future time".into(),
        ));
    }
    if !s
        .store
        .set_schedule_paused(&who.tenant, &name, next)
        .await?
    {
        return Err(ApiError::NotFound("schedule"));
    }
    one(&s, &who, &name).await.map(Json)
}

/// Another tenant's schedule is as absent as one that never existed.
async fn one(s: &AppState, who: &Principal, name: &str) -> Result<Schedule, ApiError> {
    s.store
        .schedule(&who.tenant, name)
        .await?
        .ok_or(ApiError::NotFound("schedule"))
}
