//! The Postgres store: production source of truth. `apply.rs` writes the
//! lifecycle, `claim.rs` claims and extends leases, `jobs.rs` reads jobs,
//! `maintenance.rs` holds the dispatcher's queries, `schedules.rs` the cron
//! schedules, `progress.rs` records progress reports, `events.rs` the
//! notifier's queries and `keys.rs` the API keys.

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
mod schedules;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use self::apply::{apply_in, insert_in, row_to_state};
use super::{
    parse_status, Claimed, DeadLetterOutcome, Decision, Depths, Held, JobEvent, ListFilter,
    ProgressRecorded, Publisher, Store, StoreResult, STATE_COLUMNS,
};
use crate::model::job::{Inserted, Job, NewJob};
use crate::model::lifecycle::{self, Outcome, Transition};
use crate::model::progress::ProgressReport;
use crate::model::JobStatus;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let opts = crate::connect::pg_options(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // A short acquire timeout turns "Postgres is down" into a fast
            // 503 instead of a hung request.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(opts);
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Commits in this database and the cluster's WAL position, for
    /// benchmarks (`pg_stat_database` is flushed about once a second, so
    /// read it a second after the work you measure).
    pub async fn db_stats(&self) -> StoreResult<DbStats> {
        let (commits, wal_bytes): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
                    (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(DbStats { commits, wal_bytes })
    }
}

/// See [`PgStore::db_stats`].
#[derive(Debug, Clone, Copy)]
pub struct DbStats {
    pub commits: i64,
    pub wal_bytes: i64,
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/postgres")
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
        let out = insert_in(&mut tx, jobs).await?;
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
        let mut tx = self.pool.begin().await?;
        // The lock makes the state read the state the transition applies
        // to: a worker's heartbeat or finish waits for this commit.
        let row = sqlx::query(&format!(
            "SELECT {STATE_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Decision::NotFound);
        };
        let state = row_to_state(&row)?;
        match lifecycle::next(&state, outcome, chrono::Utc::now()) {
            Err(e) => Ok(Decision::Illegal(e)),
            Ok(t) => {
                apply_in(&mut tx, std::slice::from_ref(&t)).await?;
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
        let applied = apply_in(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn relay_outbox(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize> {
        self.relay(limit, publisher).await
    }

    async fn rescue_expired(&self, limit: i64) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED shares the work between dispatchers; the row locks
        // also make a heartbeat racing the rescue wait, then find its
        // lease gone.
        let rows = sqlx::query(&format!(
            "SELECT {STATE_COLUMNS} FROM jobs
             WHERE status = '{}' AND lease_until < now()
             ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED",
            JobStatus::Running.as_str()
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let now = chrono::Utc::now();
        let batch: Vec<Transition> = rows
            .iter()
            .map(row_to_state)
            .collect::<anyhow::Result<Vec<_>>>()?
            .iter()
            .filter_map(|s| lifecycle::next(s, Outcome::LeaseExpired, now).ok())
            .collect();
        let applied = apply_in(&mut tx, &batch).await?;
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
            "SELECT count(*) FROM jobs WHERE tenant = $1 AND status IN {}",
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
        statuses: &[JobStatus],
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
