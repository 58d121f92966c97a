//! What a running job reports of itself: its latest [`JobProgress`] (on
//! the job, `GET /v1/jobs/{id}`) and one per `job.progress` event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A progress report of a running attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobProgress {
    /// How far the attempt got, 0.0 to 1.0.
    pub fraction: f32,
    /// What it is doing (scrape: `loading`, `rendering`, `extracting`; at
    /// most 200 characters).
    pub message: String,
    /// A piece of the result ready before the whole. Analyze sends one per
    /// answered question: `{"answer": {...}}`, shaped like an item of its
    /// result's `answers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub partial: Option<serde_json::Value>,
    /// The attempt that reported it (a retry starts over).
    pub attempt: i32,
    /// When the handler reported it.
    pub at: DateTime<Utc>,
}

impl JobProgress {
    /// A handler's report, stamped with its attempt and the time now.
    pub fn reported(p: stevedore_handler::Progress, attempt: i32) -> Self {
        Self {
            fraction: p.fraction,
            message: p.message,
            partial: p.partial,
            attempt,
            at: Utc::now(),
        }
    }

    /// The stored JSON (jobs.progress, job_events.progress).
    pub fn to_json(&self) -> serde_json::Value {
        // Plain fields and a `serde_json::Value`: serialising cannot fail.
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// One report to record for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressReport {
    pub job_id: Uuid,
    pub progress: JobProgress,
}
