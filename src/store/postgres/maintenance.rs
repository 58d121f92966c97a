//! The dispatcher's queries on Postgres: relaying the outbox to brokers,
//! and finding jobs a broker should hold but may have lost.

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

use super::PgStore;
use crate::model::JobStatus;
use crate::store::{ms, publish_all, sql_list, Outgoing, Publisher, StoreResult};

impl PgStore {
    pub(super) async fn relay(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize> {
        // The rows stay locked (and the transaction open) while the broker
        // confirms: deleting them in the same transaction costs one commit
        // per batch, where a lease on the rows would cost two and a WAL
        // record per row, and commits are the scarce resource on a disk
        // with slow fsync. SKIP LOCKED lets other relays go on meanwhile,
        // and PUBLISH_TIMEOUT bounds how long a stalled broker holds them.
        let mut tx = self.pool.begin().await?;
        // Rows of a paused pool stay here until it resumes, and rows held
        // for a full concurrency key until a job of the key ends; the most
        // urgent go first, and within a priority the oldest.
        let rows: Vec<(i64, i64, Uuid, String, i16)> = sqlx::query_as(
            "DELETE FROM outbox WHERE id IN (
                SELECT id FROM outbox WHERE available_at <= now() AND held_key IS NULL
                  AND pool NOT IN (SELECT name FROM pools WHERE paused)
                ORDER BY priority DESC, available_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, (extract(epoch FROM available_at) * 1000)::bigint, job_id, pool, priority",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len();
        let rows = rows
            .into_iter()
            .map(|(seq, due_ms, job_id, pool, priority)| Outgoing {
                due_ms,
                seq,
                job_id,
                pool,
                priority,
            })
            .collect();
        // Publish before commit: if the commit fails the rows come back and
        // are sent twice, which the conditional claim makes harmless; the
        // other order could lose them.
        if let Err(e) = publish_all(publisher, rows).await {
            // Give the rows back now: a dropped transaction rolls back only
            // when its connection is next used, and until then every relay
            // would skip the still-locked rows.
            tx.rollback().await?;
            return Err(e);
        }
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn waiting_by_pool(&self) -> StoreResult<HashMap<String, i64>> {
        // Only waiting jobs count, and only those whose outbox row is gone:
        // a row left by a job cancelled before it was due is not one the
        // broker should hold, and must not hide a lost message.
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT kind, count(*)::bigint FROM jobs j
             WHERE status IN {} AND NOT j.cancel_requested
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
        let n: i64 = sqlx::query_scalar(&format!(
            "WITH x AS (
                SELECT id FROM jobs j
                WHERE status IN {} AND kind = $3
                  AND greatest(updated_at, coalesce(next_run_at, updated_at))
                      < now() - $1 * interval '1 millisecond'
                  AND NOT cancel_requested
                  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
                ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), upd AS (
                UPDATE jobs j SET updated_at = now() FROM x WHERE j.id = x.id
                RETURNING j.id, j.kind, j.priority
             ), ob AS (
                INSERT INTO outbox (job_id, pool, priority) SELECT id, kind, priority FROM upd
             )
             SELECT count(*) FROM upd",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .bind(ms(older_than) as f64)
        .bind(limit)
        .bind(pool)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as usize)
    }
}
