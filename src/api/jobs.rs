//! Job routes: submit (single and batch, idempotent), get, list, cancel.
//! A submit stores the trace context its jobs' attempts continue (see
//! [`crate::telemetry`]).

use std::collections::BTreeMap;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use stevedore_handler::FieldError;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{own_job, parse_body, parse_id, query, ApiError, AppState};
use crate::auth::Principal;
use crate::model::job::{Inserted, Job, NewJob, SubmitRequest};
use crate::model::JobStatus;
use crate::store::{CancelOutcome, ListFilter};
use crate::telemetry;
use tracing::Instrument;

#[derive(Serialize, ToSchema)]
pub struct Links {
    #[serde(rename = "self")]
    pub self_: String,
}

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub id: Uuid,
    pub status: JobStatus,
    /// False when an earlier job with the same idempotency key was returned.
    pub created: bool,
    pub links: Links,
}

impl From<Inserted> for Accepted {
    fn from(i: Inserted) -> Self {
        Self {
            id: i.id,
            status: i.status,
            created: i.created,
            links: Links {
                self_: format!("/v1/jobs/{}", i.id),
            },
        }
    }
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1000 jobs, inserted in one transaction.
    #[schema(min_items = 1, max_items = 1000)]
    pub jobs: Vec<SubmitRequest>,
}

#[derive(Serialize, ToSchema)]
pub struct BatchAccepted {
    pub jobs: Vec<Accepted>,
}

pub const MAX_BATCH: usize = 1000;

/// Refuses the whole submit when it would take the tenant past its key's
/// cap on waiting jobs (a batch is accepted whole or not at all).
async fn check_cap(s: &AppState, who: &Principal, adding: usize) -> Result<(), ApiError> {
    let Some(cap) = who.max_queued else {
        return Ok(());
    };
    let waiting = s.store.waiting(&who.tenant).await?;
    if waiting + i64::try_from(adding).unwrap_or(i64::MAX) > cap {
        return Err(ApiError::QueueFull { waiting, cap });
    }
    Ok(())
}

async fn insert(s: &AppState, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, ApiError> {
    let inserted = s.store.insert_jobs(&jobs).await?;
    for (job, ins) in jobs.iter().zip(&inserted) {
        if ins.created {
            crate::metrics::SUBMITTED
                .with_label_values(&[&job.kind])
                .inc();
        }
    }
    if let Some(w) = &s.wake {
        w.notify_one();
    }
    Ok(inserted)
}

/// Submit one job.
#[utoipa::path(post, path = "/v1/jobs", request_body = SubmitRequest, responses(
    (status = 202, description = "Accepted", body = Accepted),
    (status = 200, description = "The idempotency key was seen before: the first job", body = Accepted),
    (status = 422, description = "Invalid job (`invalid_job`); `field` names the path, e.g. `payload.url`", body = super::error::ErrorBody),
    (status = 429, description = "The tenant has as many jobs waiting as the key allows (`queue_full`), or the key's rate is used up (`rate_limited`); see `Retry-After`", body = super::error::ErrorBody)))]
pub async fn submit(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let span = telemetry::span(|| tracing::info_span!("submit", jobs = 1));
    submit_one(s, who, &headers, body, &span)
        .instrument(span.clone())
        .await
}

async fn submit_one(
    s: AppState,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    span: &tracing::Span,
) -> Result<Response, ApiError> {
    let req: SubmitRequest = parse_body(body)?;
    let mut job = NewJob::parse(req, &s.kinds).map_err(ApiError::Invalid)?;
    job.traceparent = telemetry::traceparent_for(headers, span);
    check_cap(&s, &who, 1).await?;
    job.tenant = who.tenant;
    super::webhooks::check_job_webhook(&s, &mut job)
        .await
        .map_err(ApiError::Invalid)?;
    let ins = insert(&s, vec![job])
        .await?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("insert returned nothing"))?;
    let status = if ins.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(Accepted::from(ins))).into_response())
}

/// Submit up to 1000 jobs in one transaction.
#[utoipa::path(post, path = "/v1/jobs/batch", request_body = BatchRequest, responses(
    (status = 202, description = "Accepted", body = BatchAccepted),
    (status = 422, description = "A job is invalid (`invalid_job`); `field` is e.g. `jobs[3].payload.sleep_ms`", body = super::error::ErrorBody),
    (status = 429, description = "The batch would take the tenant past the key's cap on waiting jobs (`queue_full`; nothing is inserted), or the key's rate is used up (`rate_limited`)", body = super::error::ErrorBody)))]
pub async fn submit_batch(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let span = telemetry::span(|| tracing::info_span!("submit", jobs = tracing::field::Empty));
    submit_many(s, who, &headers, body, &span)
        .instrument(span.clone())
        .await
}

async fn submit_many(
    s: AppState,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    span: &tracing::Span,
) -> Result<Response, ApiError> {
    let req: BatchRequest = parse_body(body)?;
    span.record("jobs", req.jobs.len());
    let trace = telemetry::traceparent_for(headers, span);
    if req.jobs.is_empty() || req.jobs.len() > MAX_BATCH {
        return Err(ApiError::Invalid(FieldError::new(
            "jobs",
            "must hold 1 to 1000 jobs",
        )));
    }
    let mut jobs = req
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            NewJob::parse(r, &s.kinds)
                .map(|j| NewJob {
                    tenant: who.tenant.clone(),
                    traceparent: trace.clone(),
                    ..j
                })
                .map_err(|e| {
                    ApiError::Invalid(FieldError::new(format!("jobs[{i}].{}", e.field), e.message))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, job) in jobs.iter_mut().enumerate() {
        super::webhooks::check_job_webhook(&s, job)
            .await
            .map_err(|e| {
                ApiError::Invalid(FieldError::new(format!("jobs[{i}].{}", e.field), e.message))
            })?;
    }
    check_cap(&s, &who, jobs.len()).await?;
    let inserted = insert(&s, jobs).await?;
    let body = BatchAccepted {
        jobs: inserted.into_iter().map(Accepted::from).collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// One job, with its result, errors and children.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = Uuid, Path)), responses(
    (status = 200, body = Job), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(&id)?;
    own_job(&s, &who, id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("job"))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[param(value_type = Option<JobStatus>, inline)]
    pub status: Option<String>,
    pub kind: Option<String>,
    /// 1..=500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<Uuid>,
}

pub(crate) fn filter_from(q: ListQuery, who: &Principal) -> Result<ListFilter, ApiError> {
    let status = q
        .status
        .map(|s| {
            JobStatus::parse(&s).ok_or_else(|| {
                ApiError::BadParam(FieldError::new(
                    "status",
                    "must be queued, running, retrying, succeeded, dead or cancelled",
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadParam(FieldError::new(
            "limit",
            "must be between 1 and 500",
        )));
    }
    Ok(ListFilter {
        status,
        kind: q.kind,
        limit,
        before: q.cursor,
        tenant: Some(who.tenant.clone()),
    })
}

pub(crate) fn page(jobs: Vec<Job>, limit: i64) -> JobPage {
    let next_cursor = if jobs.len() as i64 == limit {
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    JobPage { jobs, next_cursor }
}

/// A page of jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery), responses((status = 200, body = JobPage)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let f = filter_from(query(q)?, &who)?;
    let jobs = s.store.list_jobs(&f).await?;
    Ok(Json(page(jobs, f.limit)))
}

/// Cancel a job: queued and retrying jobs at once, a running job at its
/// worker's next lease check.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = Uuid, Path)), responses(
    (status = 200, description = "Cancelled", body = super::Acted),
    (status = 202, description = "Running: cancellation requested", body = super::Acted),
    (status = 404, body = super::error::ErrorBody),
    (status = 409, description = "Already finished", body = super::error::ErrorBody)))]
pub async fn cancel(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if own_job(&s, &who, id).await?.is_none() {
        return Err(ApiError::NotFound("job"));
    }
    match s.store.cancel(id).await? {
        CancelOutcome::Cancelled => {
            Ok((StatusCode::OK, Json(super::Acted::new(id, "cancelled"))).into_response())
        }
        CancelOutcome::Requested => Ok((
            StatusCode::ACCEPTED,
            Json(super::Acted {
                cancel_requested: true,
                ..super::Acted::new(id, "running")
            }),
        )
            .into_response()),
        CancelOutcome::AlreadyFinished(st) => Err(ApiError::Conflict(format!(
            "job is already {}; only queued, retrying or running jobs can be cancelled",
            st.as_str()
        ))),
        CancelOutcome::NotFound => Err(ApiError::NotFound("job")),
    }
}

/// `GET /v1/stats`.
#[derive(Serialize, ToSchema)]
pub struct Stats {
    /// The tenant's jobs by status.
    pub counts: BTreeMap<String, i64>,
    /// Per pool (kind), every tenant's queued, retrying and running jobs.
    pub pools: BTreeMap<String, BTreeMap<String, i64>>,
    pub dead_letters: i64,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Count only jobs with this id or a newer one.
    pub since: Option<Uuid>,
    pub kind: Option<String>,
}

/// Jobs by status (for `stevedore bench`), queue depth per pool and the
/// dead-letter count (for the display page).
#[utoipa::path(get, path = "/v1/stats", params(StatsQuery), responses((status = 200, body = Stats)))]
pub async fn stats(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    q: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Stats>, ApiError> {
    let q = query(q)?;
    let counts = s
        .store
        .counts(q.since, q.kind.as_deref(), Some(&who.tenant))
        .await?;
    let depths = s.store.depths().await?;
    let mut pools: BTreeMap<String, BTreeMap<String, i64>> = s
        .kinds
        .names()
        .into_iter()
        .map(|k| (k.to_owned(), Default::default()))
        .collect();
    let mut dead = 0;
    for ((kind, status), n) in depths.by_kind_status {
        if status == JobStatus::Dead {
            dead += n;
        } else {
            pools
                .entry(kind)
                .or_default()
                .insert(status.as_str().to_owned(), n);
        }
    }
    Ok(Json(Stats {
        counts: counts.into_iter().collect(),
        pools,
        dead_letters: dead,
    }))
}
