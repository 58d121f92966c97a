//! Bulk actions on SQLite (see the Postgres store). Id lists are bound as
//! one JSON array and read back with `json_each`.

use uuid::Uuid;

use super::apply::row_to_state;
use super::{to_ms, SqliteStore};
use crate::model::lifecycle::JobState;
use crate::model::JobStatus;
use crate::store::{Selection, StoreResult, STATE_COLUMNS};

fn json_ids(ids: &[Uuid]) -> String {
    serde_json::Value::from(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).to_string()
}

impl SqliteStore {
    pub(super) async fn select_ids(
        &self,
        sel: &Selection,
        after: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<Uuid>> {
        let statuses: Vec<&str> = sel.statuses.iter().map(|s| s.as_str()).collect();
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE status IN (SELECT value FROM json_each(?1)) AND (?2 IS NULL OR kind = ?2)
               AND (?3 IS NULL OR EXISTS (
                     SELECT 1 FROM json_each(errors) e
                     WHERE instr(lower(json_extract(e.value, '$.message')), lower(?3)) > 0))
               AND (?4 IS NULL OR finished_at >= ?4)
               AND (?5 IS NULL OR finished_at < ?5)
               AND (?6 IS NULL OR tenant = ?6)
               AND (?7 IS NULL OR id > ?7)
               AND (?9 IS NULL OR concurrency_key = ?9)
             ORDER BY id LIMIT ?8",
        )
        .bind(serde_json::Value::from(statuses).to_string())
        .bind(sel.kind.as_deref())
        .bind(sel.error_contains.as_deref())
        .bind(sel.since.map(to_ms))
        .bind(sel.until.map(to_ms))
        .bind(sel.tenant.as_deref())
        .bind(after.map(|a| a.to_string()))
        .bind(limit)
        .bind(sel.concurrency_key.as_deref())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids
            .iter()
            .map(|i| super::parse_id(i))
            .collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn states_of(&self, ids: &[Uuid]) -> StoreResult<Vec<JobState>> {
        let rows = sqlx::query(&format!(
            "SELECT {STATE_COLUMNS} FROM jobs WHERE id IN (SELECT value FROM json_each(?))"
        ))
        .bind(json_ids(ids))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(row_to_state)
            .collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn purge_many(&self, ids: &[Uuid]) -> StoreResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?)) AND status = ?",
        )
        .bind(json_ids(ids))
        .bind(JobStatus::Dead.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

impl SqliteStore {
    pub(super) async fn prune_jobs(
        &self,
        statuses: &[JobStatus],
        older_than: std::time::Duration,
        limit: i64,
    ) -> StoreResult<u64> {
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE id < ?1 AND status IN (SELECT value FROM json_each(?2)) AND finished_at < ?3
             ORDER BY id LIMIT ?4",
        )
        .bind(crate::store::id_cutoff(older_than).to_string())
        .bind(serde_json::Value::from(statuses).to_string())
        .bind(super::now_ms() - crate::store::ms(older_than))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let list = serde_json::Value::from(ids.clone()).to_string();
        for table in [
            "job_events WHERE job_id",
            "outbox WHERE job_id",
            "jobs WHERE id",
        ] {
            sqlx::query(&format!(
                "DELETE FROM {table} IN (SELECT value FROM json_each(?))"
            ))
            .bind(&list)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}
