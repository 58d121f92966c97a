//! Concurrency limit routes: how many jobs of one concurrency key may run
//! at once across every worker, set per key prefix (the longest matching
//! prefix decides). Keys are shared by every tenant (a site is one site
//! whoever scrapes it), so only an admin key of the default tenant may set
//! limits.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use stevedore_handler::FieldError;
use utoipa::ToSchema;

use super::pools::operator;
use super::{parse_body, ApiError, AppState};
use crate::auth::Principal;
use crate::model::concurrency::{MAX_RUNNING_MAX, PREFIX_MAX};
use crate::store::LimitState;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    /// 1..=100000: at most this many jobs of each key with the prefix run
    /// at once.
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_running: i32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LimitList {
    pub limits: Vec<LimitState>,
}

/// Every limit, with the jobs of its keys running and waiting for room.
#[utoipa::path(get, path = "/v1/concurrency-limits", responses(
    (status = 200, body = LimitList), (status = 403, body = super::error::ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<LimitList>, ApiError> {
    operator(&who)?;
    Ok(Json(LimitList {
        limits: s.store.concurrency_limits().await?,
    }))
}

/// Sets the limit for keys starting with `prefix` (each key on its own).
/// Raising it lets waiting jobs go at once.
#[utoipa::path(put, path = "/v1/concurrency-limits/{prefix}", params(("prefix" = String, Path, min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")),
    request_body = LimitRequest, responses(
    (status = 200, body = LimitState),
    (status = 403, body = super::error::ErrorBody),
    (status = 422, description = "`max_running` out of range or a bad prefix", body = super::error::ErrorBody)))]
pub async fn put(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(prefix): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LimitState>, ApiError> {
    operator(&who)?;
    let req: LimitRequest = parse_body(body)?;
    check_prefix(&prefix)?;
    if !(1..=MAX_RUNNING_MAX).contains(&req.max_running) {
        return Err(ApiError::Invalid(FieldError::new(
            "max_running",
            format!("must be between 1 and {MAX_RUNNING_MAX}"),
        )));
    }
    s.store
        .set_concurrency_limit(&prefix, Some(req.max_running))
        .await?;
    if let Some(w) = &s.wake {
        w.notify_one();
    }
    one(&s, &prefix).await.map(Json)
}

/// Removes the limit: keys with the prefix run without one (or under a
/// shorter prefix's), and what waited for room goes at once.
#[utoipa::path(delete, path = "/v1/concurrency-limits/{prefix}", params(("prefix" = String, Path, min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")),
    responses((status = 204, description = "Removed"), (status = 404, body = super::error::ErrorBody)))]
pub async fn remove(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(prefix): Path<String>,
) -> Result<StatusCode, ApiError> {
    operator(&who)?;
    if !s.store.set_concurrency_limit(&prefix, None).await? {
        return Err(ApiError::NotFound("concurrency limit"));
    }
    if let Some(w) = &s.wake {
        w.notify_one();
    }
    Ok(StatusCode::NO_CONTENT)
}

fn check_prefix(prefix: &str) -> Result<(), ApiError> {
    // Characters, not bytes: what the documented maxLength counts.
    if prefix.is_empty()
        || prefix.chars().count() > PREFIX_MAX
        || prefix.chars().any(char::is_control)
    {
        return Err(ApiError::Invalid(FieldError::new(
            "prefix",
            format!("1 to {PREFIX_MAX} characters, none of them control characters"),
        )));
    }
    Ok(())
}

async fn one(s: &AppState, prefix: &str) -> Result<LimitState, ApiError> {
    s.store
        .concurrency_limits()
        .await?
        .into_iter()
        .find(|l| l.prefix == prefix)
        .ok_or(ApiError::NotFound("concurrency limit"))
}
