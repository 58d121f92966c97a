//! Bulk actions by filter: replay or purge the dead letters a filter takes,
//! cancel the active jobs one takes. Each works through the selection in
//! batches (one read and one fenced write per batch), always within the
//! caller's tenant, and answers with the count.

use std::future::Future;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::{Extension, Json};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stevedore_handler::FieldError;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{parse_body, ApiError, AppState};
use crate::auth::Principal;
use crate::model::lifecycle::Outcome;
use crate::model::JobStatus;
use crate::store::{decide_all, Selection, StoreResult, BULK_BATCH};

/// Which dead letters: every field given must match.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadFilter {
    pub kind: Option<String>,
    /// Text in one of the job's error messages, ignoring case.
    #[schema(min_length = 1)]
    pub error_contains: Option<String>,
    /// Died at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Died before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
}

/// Which active jobs: every field given must match.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveFilter {
    pub kind: Option<String>,
    /// All three when absent.
    pub status: Option<ActiveStatus>,
    /// Only jobs with this concurrency key.
    pub concurrency_key: Option<String>,
}

/// The statuses of jobs a cancel can reach.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActiveStatus {
    Queued,
    Retrying,
    Running,
}

impl From<ActiveStatus> for JobStatus {
    fn from(s: ActiveStatus) -> Self {
        match s {
            ActiveStatus::Queued => Self::Queued,
            ActiveStatus::Retrying => Self::Retrying,
            ActiveStatus::Running => Self::Running,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Count {
    /// Jobs the action applied to.
    pub count: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    /// Waiting jobs now cancelled.
    pub cancelled: u64,
    /// Running jobs told to stop at their next lease check.
    pub cancel_requested: u64,
}

impl DeadFilter {
    fn selection(self, who: &Principal) -> Result<Selection, ApiError> {
        if let (Some(a), Some(b)) = (self.since, self.until) {
            if b <= a {
                return Err(ApiError::Invalid(FieldError::new(
                    "until",
                    "must be after since",
                )));
            }
        }
        if self.error_contains.as_deref() == Some("") {
            return Err(ApiError::Invalid(FieldError::new(
                "error_contains",
                "must not be empty; leave it out to match every error",
            )));
        }
        Ok(Selection {
            statuses: vec![JobStatus::Dead],
            kind: self.kind,
            error_contains: self.error_contains,
            since: self.since,
            until: self.until,
            tenant: Some(who.tenant.clone()),
            concurrency_key: None,
        })
    }
}

/// Runs `act` on each batch of the selection until none is left; answers
/// what each batch answered.
async fn in_batches<T, F, Fut>(s: &AppState, sel: &Selection, act: F) -> Result<Vec<T>, ApiError>
where
    F: Fn(Vec<Uuid>) -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let ids = s.store.select(sel, after, BULK_BATCH).await?;
        let full = ids.len() as i64 == BULK_BATCH;
        after = ids.last().copied();
        if ids.is_empty() {
            return Ok(out);
        }
        out.push(act(ids).await?);
        if !full {
            return Ok(out);
        }
    }
}

/// Replay every dead letter the filter takes, each with a fresh budget.
#[utoipa::path(post, path = "/v1/dead-letters/replay", request_body = DeadFilter, responses(
    (status = 200, body = Count), (status = 422, body = super::error::ErrorBody)))]
pub async fn replay(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Count>, ApiError> {
    let sel = parse_body::<DeadFilter>(body)?.selection(&who)?;
    let count = in_batches(&s, &sel, |ids| {
        let store = s.store.clone();
        async move { Ok(decide_all(&*store, &ids, || Outcome::Replay).await?.len() as u64) }
    })
    .await?
    .into_iter()
    .sum();
    if let Some(w) = &s.wake {
        w.notify_one();
    }
    Ok(Json(Count { count }))
}

/// Delete every dead letter the filter takes, for good.
#[utoipa::path(post, path = "/v1/dead-letters/purge", request_body = DeadFilter, responses(
    (status = 200, body = Count), (status = 422, body = super::error::ErrorBody)))]
pub async fn purge(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Count>, ApiError> {
    let sel = parse_body::<DeadFilter>(body)?.selection(&who)?;
    let count = in_batches(&s, &sel, |ids| {
        let store = s.store.clone();
        async move { store.purge_all(&ids).await }
    })
    .await?
    .into_iter()
    .sum();
    Ok(Json(Count { count }))
}

/// Cancel every active job the filter takes: waiting ones at once, running
/// ones at their worker's next lease check.
#[utoipa::path(post, path = "/v1/jobs/cancel", request_body = ActiveFilter, responses(
    (status = 200, body = Cancelled), (status = 422, body = super::error::ErrorBody)))]
pub async fn cancel(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Cancelled>, ApiError> {
    let f: ActiveFilter = parse_body(body)?;
    let statuses = match f.status {
        None => vec![JobStatus::Queued, JobStatus::Retrying, JobStatus::Running],
        Some(st) => vec![st.into()],
    };
    let sel = Selection {
        statuses,
        kind: f.kind,
        concurrency_key: f.concurrency_key,
        tenant: Some(who.tenant.clone()),
        ..Selection::default()
    };
    let batches = in_batches(&s, &sel, |ids| {
        let store = s.store.clone();
        async move { decide_all(&*store, &ids, || Outcome::Cancel).await }
    })
    .await?;
    let (mut cancelled, mut cancel_requested) = (0, 0);
    for t in batches.iter().flatten() {
        if t.to == JobStatus::Cancelled {
            cancelled += 1;
        } else {
            cancel_requested += 1;
        }
    }
    Ok(Json(Cancelled {
        cancelled,
        cancel_requested,
    }))
}
