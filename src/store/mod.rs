//! All of the project's SQL, and the interfaces over it. [`Store`] is the
//! one interface the API, dispatcher and workers use for jobs;
//! [`events::EventStore`] is the notifier's. `postgres/` is production,
//! `sqlite/` the embedded dev mode (which also keeps the embedded queue and
//! the analyze kind's rate limits and answer cache in its file). Neither
//! decides anything: the rules are [`crate::model::lifecycle`]'s, and the
//! stores apply the [`Transition`]s it returns, each fenced on the status
//! and attempt it was decided from.

pub mod events;
pub mod keys;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::job::{Backoff, Inserted, Job, NewJob};
use crate::model::lifecycle::{Illegal, JobState, Outcome, Transition};
use crate::model::progress::ProgressReport;
use crate::model::schedule::{Firing, NewSchedule, Schedule};
use crate::model::{EventType, JobStatus};

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
            // A refused certificate, or a server without the TLS that
            // `sslmode` demands, will not mend by waiting: say so at once
            // instead of retrying it as a database that is still starting.
            sqlx::Error::Tls(_) => Self::Other(tls_failure(e)),
            sqlx::Error::Io(ref io) if crate::connect::is_tls_failure(io) => {
                Self::Other(tls_failure(e))
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
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

fn tls_failure(e: sqlx::Error) -> anyhow::Error {
    anyhow::Error::new(e).context(
        "TLS to Postgres failed: check sslmode and sslrootcert in DATABASE_URL \
         (the CA that signed the server's certificate, which must name the URL's host)",
    )
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            // Connecting and running the scripts fail like any query, so
            // "the database is not up yet" stays retryable at start.
            sqlx::migrate::MigrateError::Execute(e)
            | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => e.into(),
            other => Self::Other(anyhow::Error::new(other).context("applying migrations")),
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
    pub max_attempts: i32,
    pub timeout_secs: i32,
    pub backoff: Backoff,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Its concurrency key: a Retry-After from the remote side cools the
    /// key down for every worker.
    pub concurrency_key: Option<String>,
    /// When the job last became runnable, as the claim found it: its retry
    /// or `run_at` time (`next_run_at`), else its last move (`updated_at`:
    /// submit, hand-back, replay). For the start lag, so delayed and
    /// retried jobs do not look late.
    pub due_at: chrono::DateTime<chrono::Utc>,
    /// The trace this attempt continues (stored at submit, never carried
    /// by the broker message).
    pub traceparent: Option<crate::model::trace::TraceParent>,
}

impl Claimed {
    /// The state the lifecycle rules decide this attempt's end from.
    pub fn state(&self) -> JobState {
        JobState {
            id: self.id,
            status: JobStatus::Running,
            attempt: self.attempt,
            attempt_limit: self.attempt_limit,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            // Only the lease rescuer reads it; a worker learns of a cancel
            // from its heartbeat.
            cancel_requested: false,
        }
    }
}

/// What [`Store::decide`] did.
#[derive(Debug, Clone)]
pub enum Decision {
    Applied(Transition),
    /// The outcome cannot happen to the job as it is; nothing was written.
    Illegal(Illegal),
    NotFound,
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
    /// Only this tenant's jobs.
    pub tenant: Option<String>,
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// `job.queued`, `job.started`, ...
    pub kind: String,
    pub attempt: i32,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Which jobs a bulk action takes: every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub statuses: Vec<JobStatus>,
    pub kind: Option<String>,
    /// Text in one of the job's error messages, ignoring case.
    pub error_contains: Option<String>,
    /// Ended at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Ended before this time.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only this tenant's jobs.
    pub tenant: Option<String>,
    /// Only jobs with this concurrency key.
    pub concurrency_key: Option<String>,
}

/// How many jobs a bulk action reads and writes at once.
pub const BULK_BATCH: i64 = 500;

/// Applies `outcome` to every job of `ids` whose state allows it, as one
/// batch fenced per row (a job that moved meanwhile is left as it is);
/// answers the transitions applied. The rules are the model's, as for one
/// job.
pub async fn decide_all(
    store: &dyn Store,
    ids: &[Uuid],
    outcome: impl Fn() -> Outcome,
) -> StoreResult<Vec<Transition>> {
    let now = chrono::Utc::now();
    let batch: Vec<Transition> = store
        .states(ids)
        .await?
        .iter()
        .filter_map(|s| crate::model::lifecycle::next(s, outcome(), now).ok())
        .collect();
    let applied: std::collections::HashSet<Uuid> = store.apply(&batch).await?.into_iter().collect();
    Ok(batch
        .into_iter()
        .filter(|t| applied.contains(&t.id))
        .collect())
}

/// A pool's flow-control state and the workers serving it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolState {
    pub name: String,
    pub paused: bool,
    /// Worker processes seen recently.
    pub workers: i64,
    /// Their concurrency added up.
    pub concurrency: i64,
}

impl From<(String, bool, i64, i64)> for PoolState {
    /// A row of either store's pool query: name, paused, workers, slots.
    fn from((name, paused, workers, concurrency): (String, bool, i64, i64)) -> Self {
        Self {
            name,
            paused,
            workers,
            concurrency,
        }
    }
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
    /// `ids` all have `priority`; brokers that can, hand higher ones out first.
    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> anyhow::Result<()>;
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
    /// Reads the job under a row lock, asks [`crate::model::lifecycle::next`]
    /// what `outcome` makes of it and applies that, in one transaction.
    async fn decide(&self, id: Uuid, outcome: Outcome) -> StoreResult<Decision>;
    async fn purge(&self, id: Uuid) -> StoreResult<DeadLetterOutcome>;

    /// Claims the given jobs for one attempt each: `queued`/`retrying` and
    /// due → `running`, attempt + 1, lease until now + `lease`. Ids that are
    /// not claimable (duplicates, running elsewhere, finished) are left out.
    async fn claim(&self, ids: &[Uuid], worker: &str, lease: Duration)
        -> StoreResult<Vec<Claimed>>;
    /// Extends the leases still held; the ones missing from the answer were
    /// lost (expired and re-claimed, or finished elsewhere).
    async fn heartbeat(&self, held: &[(Uuid, i32)], lease: Duration) -> StoreResult<Vec<Held>>;
    /// Records progress reports (oldest first) in one transaction: a job
    /// still running at its reports' attempt keeps the last one as its
    /// progress and gets a `job.progress` event per report, its status and
    /// attempt untouched. Reports of any other attempt are refused (fenced,
    /// like heartbeats). Never waits for a row another transaction holds.
    async fn record_progress(&self, reports: &[ProgressReport]) -> StoreResult<ProgressRecorded>;
    /// Applies transitions in one transaction, each only while its job is
    /// still in `from` at `attempt`; returns the ids applied (the others
    /// were fenced). At most one transition per job applies in a batch. A
    /// success's children are inserted with it.
    async fn apply(&self, batch: &[Transition]) -> StoreResult<Vec<Uuid>>;

    /// Moves up to `limit` due outbox rows to the broker: rows are removed
    /// only once `publisher` has them, so a crash re-sends rather than loses.
    async fn relay_outbox(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize>;
    /// Jobs whose lease ran out (their worker died) get the model's
    /// [`Outcome::LeaseExpired`]; returns how many moved.
    async fn rescue_expired(&self, limit: i64) -> StoreResult<usize>;
    /// Per pool, the jobs its broker should be holding: queued or retrying,
    /// not cancelled, and already published (no outbox row left).
    async fn published_waiting(&self) -> StoreResult<HashMap<String, i64>>;
    /// Up to `limit` jobs of `pool` still waiting `older_than` after they
    /// were last sent, with nothing in the outbox, oldest first: sent again.
    async fn repair_lost(&self, pool: &str, older_than: Duration, limit: i64)
        -> StoreResult<usize>;
    async fn depths(&self) -> StoreResult<Depths>;
    /// Jobs by status, optionally only ids from `since` on (UUIDv7 order),
    /// of one kind and of one tenant.
    async fn counts(
        &self,
        since: Option<Uuid>,
        kind: Option<&str>,
        tenant: Option<&str>,
    ) -> StoreResult<HashMap<String, i64>>;
    /// Event rows of one job, oldest first.
    async fn job_events(&self, id: Uuid) -> StoreResult<Vec<JobEvent>>;
    /// A tenant's jobs waiting to run (queued or retrying), for its cap.
    async fn waiting(&self, tenant: &str) -> StoreResult<i64>;

    /// Pauses or resumes a pool. The flag lives in the database, so it
    /// holds across restarts of every process: while it is set the relay
    /// keeps the pool's messages and no job of the pool is claimed.
    async fn set_paused(&self, pool: &str, paused: bool) -> StoreResult<()>;
    /// Pools that were ever paused or have a worker seen within `alive`.
    async fn pools(&self, alive: Duration) -> StoreResult<Vec<PoolState>>;
    /// A worker process of `pool` says it is alive (and how many jobs it
    /// runs at once); answers whether the pool is paused.
    async fn worker_seen(&self, pool: &str, worker: &str, concurrency: i32) -> StoreResult<bool>;
    /// A worker process stopped cleanly.
    async fn worker_gone(&self, worker: &str) -> StoreResult<()>;

    /// Up to `limit` ids the selection takes, in id order, after `after`.
    async fn select(
        &self,
        sel: &Selection,
        after: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<Uuid>>;
    /// The states the lifecycle rules decide from, of those of `ids` that
    /// exist.
    async fn states(&self, ids: &[Uuid]) -> StoreResult<Vec<JobState>>;
    /// Deletes the dead jobs among `ids`; answers how many.
    async fn purge_all(&self, ids: &[Uuid]) -> StoreResult<u64>;

    /// Deletes up to `limit` jobs in `statuses` that ended more than
    /// `older_than` ago, with their events and any outbox row left; answers
    /// how many. Their idempotency keys go with them.
    async fn prune_finished(
        &self,
        statuses: &[JobStatus],
        older_than: Duration,
        limit: i64,
    ) -> StoreResult<u64>;

    /// Sets (`Some`) or removes (`None`) the limit on running jobs per key
    /// for keys starting with `prefix`; answers whether one was there.
    async fn set_concurrency_limit(
        &self,
        prefix: &str,
        max_running: Option<i32>,
    ) -> StoreResult<bool>;
    /// Every limit, with the jobs of its keys running and held now.
    async fn concurrency_limits(&self) -> StoreResult<Vec<LimitState>>;
    /// Every job of `key` waits until `until` before it starts (a remote
    /// side answered 429 or 503 with Retry-After); a later cool-down wins.
    async fn cool_down(&self, key: &str, until: DateTime<Utc>) -> StoreResult<()>;
    /// Lets go held jobs whose key has room (a limit raised or removed, a
    /// cool-down over, a release that found a cancelled job): the safety
    /// net under the release each ending job makes. Answers how many.
    async fn release_held(&self) -> StoreResult<u64>;

    /// Creates a tenant's schedule or replaces the one of the same name
    /// (keeping its history and paused flag); answers whether it is new.
    async fn put_schedule(&self, s: &NewSchedule) -> StoreResult<bool>;
    /// A tenant's schedules by name.
    async fn schedules(&self, tenant: &str) -> StoreResult<Vec<Schedule>>;
    async fn schedule(&self, tenant: &str, name: &str) -> StoreResult<Option<Schedule>>;
    /// Answers whether there was one. Jobs it made stay.
    async fn delete_schedule(&self, tenant: &str, name: &str) -> StoreResult<bool>;
    /// Pauses (`next_fire_at` none) or resumes a schedule from the given
    /// next fire time; answers whether it exists.
    async fn set_schedule_paused(
        &self,
        tenant: &str,
        name: &str,
        next_fire_at: Option<DateTime<Utc>>,
    ) -> StoreResult<bool>;
    /// Fires up to `limit` schedules due at `now`, each as `fire` decides,
    /// in one transaction: the jobs are inserted and each schedule's next
    /// fire time set together. A schedule another dispatcher is firing is
    /// skipped, so a fire time makes one job however many dispatchers run.
    async fn fire_schedules(
        &self,
        now: DateTime<Utc>,
        limit: i64,
        fire: &FireFn,
    ) -> StoreResult<Vec<Fired>>;

    async fn cancel(&self, id: Uuid) -> StoreResult<CancelOutcome> {
        Ok(match self.decide(id, Outcome::Cancel).await? {
            Decision::Applied(t) if t.to == JobStatus::Cancelled => CancelOutcome::Cancelled,
            Decision::Applied(_) => CancelOutcome::Requested,
            Decision::Illegal(e) => CancelOutcome::AlreadyFinished(e.from),
            Decision::NotFound => CancelOutcome::NotFound,
        })
    }

    async fn replay(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        Ok(match self.decide(id, Outcome::Replay).await? {
            Decision::Applied(_) => DeadLetterOutcome::Done,
            Decision::Illegal(e) => DeadLetterOutcome::NotDead(e.from),
            Decision::NotFound => DeadLetterOutcome::NotFound,
        })
    }
}

/// What [`Store::record_progress`] did; a job in neither list was fenced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressRecorded {
    pub written: Vec<Uuid>,
    /// Still running at the reports' attempt, but its row was held by
    /// another transaction (a heartbeat, a finish): nothing was written.
    pub busy: Vec<Uuid>,
}

/// A concurrency limit as `GET /v1/concurrency-limits` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct LimitState {
    pub prefix: String,
    /// Per key: at most this many of a key's jobs run at once.
    pub max_running: i32,
    /// Jobs of keys with this prefix running now (all keys together).
    pub running: i64,
    /// Jobs of keys with this prefix waiting for room on their key.
    pub held: i64,
}

impl From<(String, i32, i64, i64)> for LimitState {
    fn from((prefix, max_running, running, held): (String, i32, i64, i64)) -> Self {
        Self {
            prefix,
            max_running,
            running,
            held,
        }
    }
}

/// Keys with held jobs one [`Store::release_held`] round looks at.
pub(crate) const HELD_KEYS_PER_ROUND: i64 = 1000;

/// How [`Store::fire_schedules`] is told to fire one schedule
/// ([`crate::model::schedule::fire`] with the time and a jitter draw).
pub type FireFn = dyn Fn(&Schedule) -> Firing + Send + Sync;

/// One schedule a [`Store::fire_schedules`] call fired.
#[derive(Debug, Clone)]
pub struct Fired {
    pub tenant: String,
    pub name: String,
    pub fire_at: Option<DateTime<Utc>>,
    /// The job made, or the one an earlier fire of the same time made.
    pub job_id: Option<Uuid>,
    pub error: Option<String>,
}

/// What a store records on a schedule after firing it (both dialects).
pub(crate) fn fired(s: &Schedule, f: &Firing, job_id: Option<Uuid>) -> Fired {
    Fired {
        tenant: s.tenant.clone(),
        name: s.name.clone(),
        fire_at: f.fire_at,
        job_id,
        error: f.error.clone(),
    }
}

/// The columns a [`JobState`] is read from, in both dialects.
pub(crate) const STATE_COLUMNS: &str = "id, status, attempt, attempt_limit, max_attempts, \
     backoff_base_ms, backoff_max_ms, cancel_requested";

/// A stored `traceparent`, read back. Only valid ones are written; one
/// that no longer parses is dropped, and the attempt starts a trace.
pub(crate) fn traceparent(stored: Option<String>) -> Option<crate::model::trace::TraceParent> {
    stored
        .as_deref()
        .and_then(crate::model::trace::TraceParent::parse)
}

pub(crate) fn parse_status(s: &str) -> anyhow::Result<JobStatus> {
    use anyhow::Context as _;
    JobStatus::parse(s).with_context(|| format!("unknown status {s:?} in the database"))
}

/// `('queued', 'retrying')`: statuses as an SQL list, spelled by the model.
/// Literal rather than bound, so the planner can match partial indexes.
pub(crate) fn sql_list(statuses: &[JobStatus]) -> String {
    let quoted: Vec<String> = statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("({})", quoted.join(", "))
}

/// The event columns both dialects read: the job's result rides on the
/// success event and its last error on the events that carry one; a
/// progress event carries its own report.
/// `last_error` is the dialect's expression for the last of `j.errors`.
pub(crate) fn event_columns(last_error: &str) -> String {
    let carrying: Vec<String> = EventType::ALL
        .into_iter()
        .filter(|t| t.carries_error())
        .map(|t| format!("'{}'", t.as_str()))
        .collect();
    format!(
        "e.id, e.type, e.job_id, e.kind, e.status, e.attempt, e.parent_id, e.at,
         CASE WHEN e.type = '{}' THEN j.result END AS result,
         CASE WHEN e.type IN ({}) THEN {last_error} END AS error,
         e.progress, j.webhook, j.tenant",
        EventType::Succeeded.as_str(),
        carrying.join(", ")
    )
}

/// How long the outbox relay waits for a broker to take a batch before it
/// gives the rows back for the next round.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// One outbox row on its way to a broker.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    /// When the row became due, in ms: FIFO order within one priority.
    pub due_ms: i64,
    /// The outbox row's id, for rows due at the same millisecond.
    pub seq: i64,
    pub job_id: Uuid,
    pub pool: String,
    pub priority: i16,
}

/// Publishes the rows in batches of one pool and priority, the most urgent
/// first and FIFO within a priority, each batch within [`PUBLISH_TIMEOUT`].
pub(crate) async fn publish_all(
    publisher: &dyn Publisher,
    mut rows: Vec<Outgoing>,
) -> StoreResult<()> {
    rows.sort_by(|a, b| (b.priority, a.due_ms, a.seq).cmp(&(a.priority, b.due_ms, b.seq)));
    let mut batches: Vec<(&str, i16, Vec<Uuid>)> = Vec::new();
    for r in &rows {
        match batches
            .iter_mut()
            .find(|(pool, p, _)| *pool == r.pool && *p == r.priority)
        {
            Some((_, _, ids)) => ids.push(r.job_id),
            None => batches.push((&r.pool, r.priority, vec![r.job_id])),
        }
    }
    for (pool, priority, ids) in batches {
        tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(pool, priority, &ids))
            .await
            .map_err(|_| StoreError::Other(anyhow::anyhow!("publishing to {pool} timed out")))??;
    }
    Ok(())
}

/// The smallest UUIDv7 of `older_than` ago: every job that ended before
/// then was created before then, so its id is below this one and a prune
/// walks the primary key instead of needing an index of its own.
pub(crate) fn id_cutoff(older_than: Duration) -> Uuid {
    let at = std::time::SystemTime::now()
        .checked_sub(older_than)
        .unwrap_or(std::time::UNIX_EPOCH);
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(ms).unwrap_or(u64::MAX), &[0; 10])
        .into_uuid()
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
