//! The source of truth for jobs. [`Store`] is the one interface the API,
//! dispatcher and workers use; `postgres` is production, `sqlite` is the
//! embedded dev mode. Both apply the same lifecycle rules: every transition
//! is one conditional UPDATE that also appends to `job_events`.
//! `sqlite_analyze` keeps the analyze kind's rate limits and answer cache in
//! the SQLite file for dev mode (production keeps them in Redis).

pub mod postgres;
pub mod sqlite;
pub mod sqlite_analyze;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::job::{Backoff, Inserted, Job, JobStatus, NewJob};
use crate::lifecycle::FinishCmd;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| {
                    // 57P01 admin shutdown, 57P03 cannot connect now, 08xxx
                    // connection exceptions: the server is going away.
                    c.starts_with("57P") || c.starts_with("08")
                }) =>
            {
                Self::Unavailable(e.to_string())
            }
            other => Self::Other(other.into()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A job as a worker claimed it: what it needs to run the attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub kind: String,
    pub payload: serde_json::Value,
    /// This attempt's number, also its fencing token.
    pub attempt: i32,
    pub attempt_limit: i32,
    pub timeout_secs: i32,
    pub backoff: Backoff,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A lease still held after a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub id: Uuid,
    pub cancel_requested: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    Cancelled,
    /// Running: the worker cancels it at its next lease check.
    Requested,
    AlreadyFinished(JobStatus),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterOutcome {
    Done,
    NotDead(JobStatus),
    NotFound,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub limit: i64,
    /// Only jobs with an id below this one (ids are UUIDv7, so newest first).
    pub before: Option<Uuid>,
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// `job.queued`, `job.started`, ...
    pub kind: String,
    pub attempt: i32,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Counts for the metrics gauges.
#[derive(Debug, Clone, Default)]
pub struct Depths {
    /// (kind, status) → jobs, for queued, retrying, running and dead.
    pub by_kind_status: HashMap<(String, JobStatus), i64>,
}

/// Publishes job ids to the pool's queue; implemented by the broker router so
/// the store can publish inside its outbox transaction.
#[async_trait]
pub trait Publisher: Send + Sync {
    async fn publish(&self, pool: &str, ids: &[Uuid]) -> anyhow::Result<()>;
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;

    /// Inserts jobs with their outbox rows in one transaction. A repeated
    /// idempotency key yields the first job (`created: false`).
    async fn insert_jobs(&self, jobs: &[NewJob]) -> StoreResult<Vec<Inserted>>;
    async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>>;
    async fn list_jobs(&self, filter: &ListFilter) -> StoreResult<Vec<Job>>;
    async fn cancel(&self, id: Uuid) -> StoreResult<CancelOutcome>;
    async fn replay(&self, id: Uuid) -> StoreResult<DeadLetterOutcome>;
    async fn purge(&self, id: Uuid) -> StoreResult<DeadLetterOutcome>;

    /// Claims the given jobs for one attempt each: `queued`/`retrying` and
    /// due → `running`, attempt + 1, lease until now + `lease`. Ids that are
    /// not claimable (duplicates, running elsewhere, finished) are left out.
    async fn claim(&self, ids: &[Uuid], worker: &str, lease: Duration)
        -> StoreResult<Vec<Claimed>>;
    /// Extends the leases still held; the ones missing from the answer were
    /// lost (expired and re-claimed, or finished elsewhere).
    async fn heartbeat(&self, held: &[(Uuid, i32)], lease: Duration) -> StoreResult<Vec<Held>>;
    /// Applies finishes conditional on `running` with the same attempt;
    /// returns the ids applied. The others were fenced.
    async fn finish(&self, cmds: &[FinishCmd]) -> StoreResult<Vec<Uuid>>;

    /// Moves up to `limit` due outbox rows to the broker: rows are removed
    /// only once `publisher` has them, so a crash re-sends rather than loses.
    async fn relay_outbox(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize>;
    /// Jobs whose lease ran out (their worker died): back to the queue, or
    /// dead when that was the last attempt. Returns how many moved.
    async fn rescue_expired(&self, limit: i64) -> StoreResult<usize>;
    /// Jobs of `pool` the broker should be holding: queued or retrying,
    /// minus those whose outbox row is not yet published.
    async fn published_waiting(&self) -> StoreResult<HashMap<String, i64>>;
    /// Up to `limit` jobs of `pool` still waiting `older_than` after they
    /// were last sent, with nothing in the outbox, oldest first: sent again.
    async fn repair_lost(&self, pool: &str, older_than: Duration, limit: i64)
        -> StoreResult<usize>;
    async fn depths(&self) -> StoreResult<Depths>;
    /// Jobs by status, optionally only ids from `since` on (UUIDv7 order)
    /// and of one kind.
    async fn counts(
        &self,
        since: Option<Uuid>,
        kind: Option<&str>,
    ) -> StoreResult<HashMap<String, i64>>;
    /// Event rows of one job, oldest first.
    async fn job_events(&self, id: Uuid) -> StoreResult<Vec<JobEvent>>;
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
