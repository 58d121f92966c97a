//! What a job is: the submit request (parsed into a [`NewJob`] that can
//! only hold valid values), its retry policy and error history, and the
//! stored [`Job`] as the API shows it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stevedore_handler::FieldError;
use utoipa::ToSchema;
use uuid::Uuid;

use super::progress::JobProgress;
use super::secret::Secret;
use super::status::JobStatus;
use super::trace::TraceParent;
use crate::kinds::Kinds;

/// Per-job retry delay: exponential from `base_ms`, capped at `max_ms`, with
/// full jitter (see [`super::lifecycle::retry_delay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[schema(minimum = 1, maximum = 3_600_000)]
    pub base_ms: u64,
    /// At least `base_ms`.
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_ms: 1_000,
            max_ms: 600_000,
        }
    }
}

/// The error of one failed attempt, kept for the whole life of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptError {
    pub attempt: i32,
    /// `retryable`, `permanent`, or `snoozed` (the handler asked to run
    /// again later; no attempt was used).
    pub class: String,
    pub message: String,
    pub at: DateTime<Utc>,
    /// When the next attempt may start, for errors that were retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

/// `POST /v1/jobs` body, as the client sends it.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"kind": "probe", "payload": {"sleep_ms": 10}, "priority": 5})))]
pub struct SubmitRequest {
    /// `probe`, `scrape` or `analyze`.
    pub kind: String,
    /// The kind's own fields, checked by the kind at submit.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// 1..=25, default 5.
    #[schema(minimum = 1, maximum = 25)]
    pub max_attempts: Option<i32>,
    /// 1..=86400, default 300.
    #[schema(minimum = 1, maximum = 86_400)]
    pub timeout_secs: Option<i32>,
    pub backoff: Option<Backoff>,
    /// RFC 3339; the job does not start before then.
    pub run_at: Option<DateTime<Utc>>,
    /// 1 to 200 characters; a second submit with the same key (in the
    /// tenant) returns the first job.
    #[schema(min_length = 1, max_length = 200)]
    pub idempotency_key: Option<String>,
    /// -100..=100, default 0: higher runs first; FIFO within one priority.
    #[schema(minimum = -100, maximum = 100)]
    pub priority: Option<i32>,
    /// Jobs with the same key share its limit on how many run at once
    /// (`PUT /v1/concurrency-limits/{prefix}`), across every worker. 1 to
    /// 200 characters, no control characters, e.g. `tenant:acme`.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub concurrency_key: Option<String>,
    /// Where to POST this job's terminal event (signed with `secret`, or
    /// with the tenant's signing secret, `GET /v1/webhook-signing-secret`,
    /// when it brings none).
    pub webhook: Option<JobWebhook>,
}

/// A job's own webhook.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobWebhook {
    /// http or https; must pass the SSRF guard.
    #[schema(pattern = "^https?://")]
    pub url: String,
    /// `whsec_` + base64 of 24 to 64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^whsec_[A-Za-z0-9+/=]+$")]
    pub secret: Option<String>,
}

pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;
pub const DEFAULT_TIMEOUT_SECS: i32 = 300;
/// The range a job's `priority` may take.
pub const PRIORITIES: std::ops::RangeInclusive<i16> = -100..=100;

/// A submit request that passed validation; only `NewJob::parse` builds one.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub kind: String,
    pub payload: serde_json::Value,
    pub max_attempts: i32,
    pub timeout_secs: i32,
    pub backoff: Backoff,
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub parent_id: Option<Uuid>,
    pub webhook: Option<JobWebhook>,
    /// Higher first. A child takes its parent's from the database.
    pub priority: i16,
    pub concurrency_key: Option<String>,
    /// Whose job it is: the submitting key's tenant. A child takes its
    /// parent's tenant from the database, whatever this says.
    pub tenant: String,
    /// The schedule and fire time that made it, for scheduled jobs.
    pub scheduled: Option<(String, DateTime<Utc>)>,
    /// The trace its attempts continue: the submit's `traceparent` header
    /// or span, or for a child the attempt that made it.
    pub traceparent: Option<TraceParent>,
}

impl NewJob {
    pub fn parse(req: SubmitRequest, kinds: &Kinds) -> Result<Self, FieldError> {
        let handler = kinds.get(&req.kind).ok_or_else(|| {
            FieldError::new(
                "kind",
                format!(
                    "unknown kind {:?}; known: {}",
                    req.kind,
                    kinds.names().join(", ")
                ),
            )
        })?;
        let default_key = handler.validate(&req.payload).map_err(|e| {
            let field = if e.field.is_empty() {
                "payload".to_owned()
            } else {
                format!("payload.{}", e.field)
            };
            FieldError::new(field, e.message)
        })?;
        let mut job = Self::checked(req)?;
        if job.concurrency_key.is_none() {
            job.concurrency_key = default_key;
        }
        Ok(job)
    }

    /// Every check but the kind's own: for a body that passed [`Self::parse`]
    /// once already (a schedule's job, at each fire).
    pub fn checked(req: SubmitRequest) -> Result<Self, FieldError> {
        let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=25).contains(&max_attempts) {
            return Err(FieldError::new("max_attempts", "must be between 1 and 25"));
        }
        let timeout_secs = req.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if !(1..=86_400).contains(&timeout_secs) {
            return Err(FieldError::new(
                "timeout_secs",
                "must be between 1 and 86400",
            ));
        }
        let backoff = req.backoff.unwrap_or_default();
        if backoff.base_ms == 0 || backoff.base_ms > 3_600_000 {
            return Err(FieldError::new(
                "backoff.base_ms",
                "must be between 1 and 3600000",
            ));
        }
        if backoff.max_ms < backoff.base_ms || backoff.max_ms > 86_400_000 {
            return Err(FieldError::new(
                "backoff.max_ms",
                "must be at least base_ms and at most 86400000",
            ));
        }
        let priority = match req.priority {
            None => 0,
            Some(p) => i16::try_from(p)
                .ok()
                .filter(|p| PRIORITIES.contains(p))
                .ok_or_else(|| FieldError::new("priority", "must be between -100 and 100"))?,
        };
        if let Some(key) = &req.concurrency_key {
            // Characters, not bytes: what the documented maxLength counts.
            if key.is_empty() || key.chars().count() > 200 || key.chars().any(char::is_control) {
                return Err(FieldError::new(
                    "concurrency_key",
                    "must be 1 to 200 characters, none of them control characters",
                ));
            }
        }
        if let Some(key) = &req.idempotency_key {
            if key.is_empty() || key.chars().count() > 200 {
                return Err(FieldError::new(
                    "idempotency_key",
                    "must be 1 to 200 characters",
                ));
            }
        }
        if let Some(w) = &req.webhook {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(FieldError::new(
                    "webhook.url",
                    "must be an http or https URL",
                ));
            }
            if let Some(secret) = &w.secret {
                Secret::parse(secret).map_err(|e| FieldError::new("webhook.secret", e))?;
            }
        }
        Ok(Self {
            id: Uuid::now_v7(),
            kind: req.kind,
            payload: req.payload,
            max_attempts,
            timeout_secs,
            backoff,
            run_at: req.run_at,
            idempotency_key: req.idempotency_key,
            parent_id: None,
            webhook: req.webhook,
            priority,
            concurrency_key: req.concurrency_key,
            tenant: crate::auth::DEFAULT_TENANT.to_owned(),
            scheduled: None,
            traceparent: None,
        })
    }

    /// A child submitted by a finishing job (chains). The parent's handler
    /// built the payload, so it is validated like any other submit.
    pub fn child(
        parent: Uuid,
        child: stevedore_handler::ChildJob,
        kinds: &Kinds,
    ) -> Result<Self, FieldError> {
        let req = SubmitRequest {
            kind: child.kind,
            payload: child.payload,
            max_attempts: None,
            timeout_secs: None,
            backoff: None,
            run_at: None,
            idempotency_key: None,
            priority: None,
            concurrency_key: None,
            webhook: None,
        };
        let mut job = Self::parse(req, kinds)?;
        job.parent_id = Some(parent);
        Ok(job)
    }
}

/// Result of inserting one job: `created` is false when an earlier job with
/// the same idempotency key was returned instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Inserted {
    pub id: Uuid,
    pub status: JobStatus,
    pub created: bool,
}

/// A job's child as the parent shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChildRef {
    pub id: Uuid,
    pub kind: String,
    pub status: JobStatus,
}

/// A stored job, everything included.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub status: JobStatus,
    /// Attempts started so far, replays included.
    pub attempt: i32,
    pub max_attempts: i32,
    /// The attempt number that is the last one allowed (moves on replay).
    pub attempt_limit: i32,
    pub backoff: Backoff,
    pub timeout_secs: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    /// Higher runs first (-100..=100).
    pub priority: i16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// The tenant the job belongs to.
    pub tenant: String,
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    pub errors: Vec<AttemptError>,
    /// The latest progress its handler reported (null before the first
    /// report); kept once the job has ended.
    pub progress: Option<JobProgress>,
    pub parent_id: Option<Uuid>,
    pub children: Vec<ChildRef>,
    /// The schedule that made the job, and the fire time it was made for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}
