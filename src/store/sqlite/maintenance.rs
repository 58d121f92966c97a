//! The dispatcher's queries on SQLite: relaying the outbox to the broker,
//! finding expired leases, and jobs a broker should hold but may have lost.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::SqliteConnection;

use super::apply::{outbox, row_to_state};
use super::{json_list, now_ms, parse_id, SqliteStore};
use crate::model::lifecycle::JobState;
use crate::model::JobStatus;
use crate::store::{ms, publish_all, sql_list, Outgoing, Publisher, StoreResult, STATE_COLUMNS};

impl SqliteStore {
    pub(super) async fn relay(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize> {
        // Rows of a paused pool stay until it resumes, rows held for a full
        // concurrency key until a job of the key ends; the most urgent go
        // first, and within a priority the oldest.
        let rows: Vec<(i64, i64, String, String, i16)> = sqlx::query_as(
            "SELECT id, available_at, job_id, pool, priority FROM outbox
             WHERE available_at <= ? AND held_key IS NULL
               AND pool NOT IN (SELECT name FROM pools WHERE paused)
             ORDER BY priority DESC, available_at, id LIMIT ?",
        )
        .bind(now_ms())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let outgoing = rows
            .iter()
            .map(|(seq, due_ms, id, pool, priority)| {
                Ok(Outgoing {
                    due_ms: *due_ms,
                    seq: *seq,
                    job_id: parse_id(id)?,
                    pool: pool.clone(),
                    priority: *priority,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        // Dev mode runs one relay, so no row lock is needed and no
        // transaction is held while publishing; rows are deleted only after
        // the publish, so a crash in between re-sends, never loses.
        publish_all(publisher, outgoing).await?;
        let ids: Vec<i64> = rows.iter().map(|(rowid, ..)| *rowid).collect();
        sqlx::query("DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))")
            .bind(json_list(&ids))
            .execute(&self.pool)
            .await?;
        Ok(rows.len())
    }

    pub(super) async fn expired_in(
        &self,
        conn: &mut SqliteConnection,
        limit: i64,
    ) -> StoreResult<Vec<JobState>> {
        let rows = sqlx::query(&format!(
            "SELECT {STATE_COLUMNS} FROM jobs WHERE status = ? AND lease_until < ?
             ORDER BY lease_until LIMIT ?"
        ))
        .bind(JobStatus::Running.as_str())
        .bind(now_ms())
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .iter()
            .map(row_to_state)
            .collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn waiting_by_pool(&self) -> StoreResult<HashMap<String, i64>> {
        // Only waiting jobs count, and only those whose outbox row is gone:
        // a row left by a job cancelled before it was due is not one the
        // broker should hold, and must not hide a lost message.
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT kind, count(*) FROM jobs j
             WHERE status IN {} AND j.cancel_requested = 0
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
             GROUP BY kind",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub(super) async fn resend_lost(
        &self,
        pool: &str,
        older_than: Duration,
        limit: i64,
    ) -> StoreResult<usize> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT id, kind FROM jobs j WHERE status IN {} AND kind = ?
               AND max(updated_at, coalesce(next_run_at, updated_at)) < ? AND cancel_requested = 0
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id) ORDER BY updated_at LIMIT ?",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .bind(pool)
        .bind(now - ms(older_than))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (id, kind) in &rows {
            sqlx::query("UPDATE jobs SET updated_at = ? WHERE id = ?")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            outbox(&mut tx, id, kind, now).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }
}
