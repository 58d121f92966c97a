//! The SQLite store for `stevedore dev`: the same lifecycle on one file.
//! The pool holds a single connection, so writes are serialised inside the
//! process and SQLite never answers "database is locked" to our own
//! transactions. Each statement is a round trip to that connection's
//! thread, so the hot path writes a batch in one statement per step
//! (`json_each` over a JSON array, see [`json_list`]), not one per row.
//! `apply.rs` writes the lifecycle, `claim.rs` claims and extends leases,
//! `jobs.rs` reads, `maintenance.rs` serves the dispatcher, `schedules.rs`
//! keeps the cron schedules, `progress.rs` records progress reports,
//! `events.rs` the notifier, `queue.rs` the embedded broker, `keys.rs` the
//! API keys and `analyze.rs` the analyze kind's limits and cache.

pub mod analyze;
mod apply;
mod bulk;
mod claim;
mod concurrency;
pub mod events;
mod jobs;
mod keys;
mod maintenance;
mod pools;
mod progress;
pub mod queue;
mod schedules;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use tokio::sync::Notify;
use uuid::Uuid;

use self::apply::{apply_in, insert_in, state_in};
use super::{
    parse_status, Claimed, DeadLetterOutcome, Decision, Depths, Held, JobEvent, ListFilter,
    ProgressRecorded, Publisher, Store, StoreResult,
};
use crate::model::job::{Inserted, Job, NewJob};
use crate::model::lifecycle::{self, Outcome, Transition};
use crate::model::progress::ProgressReport;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Rung when events are written: SQLite has no NOTIFY. Ringing before
    /// the commit is safe: the pool's one connection makes the notifier's
    /// read wait for that commit.
    bell: Arc<Notify>,
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|v| Utc.timestamp_millis_opt(v).single())
}

/// A list as one JSON array parameter: set-based statements read it with
/// `json_each`, so a batch costs one statement instead of one per row (each
/// statement is a round trip to the connection's thread).
pub(crate) fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_id(s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("bad job id {s:?} in the database"))
}

impl SqliteStore {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .context("SQLite path")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            pool,
            bell: Arc::new(Notify::new()),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_jobs(&self, jobs: &[NewJob]) -> StoreResult<Vec<Inserted>> {
        let mut tx = self.pool.begin().await?;
        let out = insert_in(&mut tx, jobs, &self.bell).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        self.job(id).await
    }

    async fn list_jobs(&self, f: &ListFilter) -> StoreResult<Vec<Job>> {
        self.jobs(f).await
    }

    async fn decide(&self, id: Uuid, outcome: Outcome) -> StoreResult<Decision> {
        // The single connection serialises transactions: what is read here
        // is what the transition applies to.
        let mut tx = self.pool.begin().await?;
        let Some(state) = state_in(&mut tx, id).await? else {
            return Ok(Decision::NotFound);
        };
        match lifecycle::next(&state, outcome, Utc::now()) {
            Err(e) => Ok(Decision::Illegal(e)),
            Ok(t) => {
                apply_in(&mut tx, std::slice::from_ref(&t), &self.bell).await?;
                tx.commit().await?;
                Ok(Decision::Applied(t))
            }
        }
    }

    async fn purge(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        self.purge_dead(id).await
    }

    async fn claim(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> StoreResult<Vec<Claimed>> {
        self.claim_ids(ids, worker, lease).await
    }

    async fn heartbeat(&self, held: &[(Uuid, i32)], lease: Duration) -> StoreResult<Vec<Held>> {
        self.extend_leases(held, lease).await
    }

    async fn record_progress(&self, reports: &[ProgressReport]) -> StoreResult<ProgressRecorded> {
        self.record_progress_batch(reports).await
    }

    async fn apply(&self, batch: &[Transition]) -> StoreResult<Vec<Uuid>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut tx = self.pool.begin().await?;
        let applied = apply_in(&mut tx, batch, &self.bell).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn relay_outbox(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize> {
        self.relay(limit, publisher).await
    }

    async fn rescue_expired(&self, limit: i64) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await?;
        let states = self.expired_in(&mut tx, limit).await?;
        let now = Utc::now();
        let batch: Vec<Transition> = states
            .iter()
            .filter_map(|s| lifecycle::next(s, Outcome::LeaseExpired, now).ok())
            .collect();
        let applied = apply_in(&mut tx, &batch, &self.bell).await?;
        tx.commit().await?;
        Ok(applied.len())
    }

    async fn published_waiting(&self) -> StoreResult<HashMap<String, i64>> {
        self.waiting_by_pool().await
    }

    async fn repair_lost(
        &self,
        pool: &str,
        older_than: Duration,
        limit: i64,
    ) -> StoreResult<usize> {
        self.resend_lost(pool, older_than, limit).await
    }

    async fn depths(&self) -> StoreResult<Depths> {
        self.depth_counts().await
    }

    async fn counts(
        &self,
        since: Option<Uuid>,
        kind: Option<&str>,
        tenant: Option<&str>,
    ) -> StoreResult<HashMap<String, i64>> {
        self.status_counts(since, kind, tenant).await
    }

    async fn job_events(&self, id: Uuid) -> StoreResult<Vec<JobEvent>> {
        self.events_of(id).await
    }

    async fn waiting(&self, tenant: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM jobs WHERE tenant = ? AND status IN {}",
            super::sql_list(&crate::model::JobStatus::CLAIMABLE)
        ))
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn set_paused(&self, pool: &str, paused: bool) -> StoreResult<()> {
        self.pause(pool, paused).await
    }

    async fn pools(&self, alive: Duration) -> StoreResult<Vec<super::PoolState>> {
        self.pool_states(alive).await
    }

    async fn worker_seen(&self, pool: &str, worker: &str, concurrency: i32) -> StoreResult<bool> {
        self.seen(pool, worker, concurrency).await
    }

    async fn worker_gone(&self, worker: &str) -> StoreResult<()> {
        self.gone(worker).await
    }

    async fn select(
        &self,
        sel: &super::Selection,
        after: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<Uuid>> {
        self.select_ids(sel, after, limit).await
    }

    async fn states(&self, ids: &[Uuid]) -> StoreResult<Vec<crate::model::lifecycle::JobState>> {
        self.states_of(ids).await
    }

    async fn purge_all(&self, ids: &[Uuid]) -> StoreResult<u64> {
        self.purge_many(ids).await
    }

    async fn prune_finished(
        &self,
        statuses: &[crate::model::JobStatus],
        older_than: Duration,
        limit: i64,
    ) -> StoreResult<u64> {
        self.prune_jobs(statuses, older_than, limit).await
    }

    async fn set_concurrency_limit(
        &self,
        prefix: &str,
        max_running: Option<i32>,
    ) -> StoreResult<bool> {
        self.set_limit(prefix, max_running).await
    }

    async fn concurrency_limits(&self) -> StoreResult<Vec<super::LimitState>> {
        self.limit_states().await
    }

    async fn cool_down(&self, key: &str, until: DateTime<Utc>) -> StoreResult<()> {
        self.cool(key, until).await
    }

    async fn release_held(&self) -> StoreResult<u64> {
        self.release_all_held().await
    }

    async fn put_schedule(&self, s: &crate::model::schedule::NewSchedule) -> StoreResult<bool> {
        self.upsert_schedule(s).await
    }

    async fn schedules(&self, tenant: &str) -> StoreResult<Vec<crate::model::schedule::Schedule>> {
        self.schedules_of(tenant, None).await
    }

    async fn schedule(
        &self,
        tenant: &str,
        name: &str,
    ) -> StoreResult<Option<crate::model::schedule::Schedule>> {
        Ok(self.schedules_of(tenant, Some(name)).await?.pop())
    }

    async fn delete_schedule(&self, tenant: &str, name: &str) -> StoreResult<bool> {
        self.remove_schedule(tenant, name).await
    }

    async fn set_schedule_paused(
        &self,
        tenant: &str,
        name: &str,
        next_fire_at: Option<DateTime<Utc>>,
    ) -> StoreResult<bool> {
        self.pause_schedule(tenant, name, next_fire_at).await
    }

    async fn fire_schedules(
        &self,
        now: DateTime<Utc>,
        limit: i64,
        fire: &super::FireFn,
    ) -> StoreResult<Vec<super::Fired>> {
        self.fire_due(now, limit, fire).await
    }
}
