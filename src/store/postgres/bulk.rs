//! Bulk actions on Postgres: selecting jobs by filter, reading their
//! states in one query, and purging dead ones together.

use uuid::Uuid;

use super::apply::row_to_state;
use super::PgStore;
use crate::model::lifecycle::JobState;
use crate::model::JobStatus;
use crate::store::{Selection, StoreResult, STATE_COLUMNS};

impl PgStore {
    pub(super) async fn select_ids(
        &self,
        sel: &Selection,
        after: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<Uuid>> {
        let statuses: Vec<&str> = sel.statuses.iter().map(|s| s.as_str()).collect();
        Ok(sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE status = ANY($1) AND ($2::text IS NULL OR kind = $2)
               AND ($3::text IS NULL OR EXISTS (
                     SELECT 1 FROM jsonb_array_elements(errors) e
                     WHERE strpos(lower(e->>'message'), lower($3)) > 0))
               AND ($4::timestamptz IS NULL OR finished_at >= $4)
               AND ($5::timestamptz IS NULL OR finished_at < $5)
               AND ($6::text IS NULL OR tenant = $6)
               AND ($7::uuid IS NULL OR id > $7)
               AND ($9::text IS NULL OR concurrency_key = $9)
             ORDER BY id LIMIT $8",
        )
        .bind(&statuses)
        .bind(sel.kind.as_deref())
        .bind(sel.error_contains.as_deref())
        .bind(sel.since)
        .bind(sel.until)
        .bind(sel.tenant.as_deref())
        .bind(after)
        .bind(limit)
        .bind(sel.concurrency_key.as_deref())
        .fetch_all(&self.pool)
        .await?)
    }

    pub(super) async fn states_of(&self, ids: &[Uuid]) -> StoreResult<Vec<JobState>> {
        let rows = sqlx::query(&format!(
            "SELECT {STATE_COLUMNS} FROM jobs WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(row_to_state)
            .collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn purge_many(&self, ids: &[Uuid]) -> StoreResult<u64> {
        Ok(
            sqlx::query("DELETE FROM jobs WHERE id = ANY($1) AND status = $2")
                .bind(ids)
                .bind(JobStatus::Dead.as_str())
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

impl PgStore {
    pub(super) async fn prune_jobs(
        &self,
        statuses: &[JobStatus],
        older_than: std::time::Duration,
        limit: i64,
    ) -> StoreResult<u64> {
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let n: i64 = sqlx::query_scalar(
            "WITH d AS (
                DELETE FROM jobs WHERE id IN (
                    SELECT id FROM jobs
                    WHERE id < $1 AND status = ANY($2)
                      AND finished_at < now() - $3 * interval '1 millisecond'
                    ORDER BY id LIMIT $4)
                RETURNING id
             ), e AS (DELETE FROM job_events WHERE job_id IN (SELECT id FROM d)),
             o AS (DELETE FROM outbox WHERE job_id IN (SELECT id FROM d))
             SELECT count(*) FROM d",
        )
        .bind(crate::store::id_cutoff(older_than))
        .bind(&statuses)
        .bind(crate::store::ms(older_than) as f64)
        .bind(limit)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
