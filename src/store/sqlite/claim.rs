//! The hot path on SQLite: claiming delivered jobs for one attempt and
//! extending the leases of running ones (see `postgres/claim.rs` for why
//! these are not model transitions).

use std::time::Duration;

use anyhow::Context as _;
use sqlx::Row;
use uuid::Uuid;

use super::apply::{backoff, event};
use super::{from_ms, now_ms, SqliteStore};
use crate::model::{EventType, JobStatus};
use crate::store::{ms, sql_list, traceparent, Claimed, Held, StoreResult};

/// When a job last became runnable (see [`Claimed::due_at`]).
const DUE_AT: &str = "SELECT coalesce(next_run_at, updated_at) FROM jobs WHERE id = ?";

impl SqliteStore {
    pub(super) async fn claim_ids(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> StoreResult<Vec<Claimed>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let now = now_ms();
        let sql = format!(
            "UPDATE jobs SET status = ?5, attempt = attempt + 1, lease_until = ?2,
               worker = ?3, started_at = ?4, next_run_at = NULL, updated_at = ?4
             WHERE id = ?1 AND status IN {}
               AND (next_run_at IS NULL OR next_run_at <= ?4) AND cancel_requested = 0
               AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = jobs.kind AND p.paused)
             RETURNING kind, payload, attempt, attempt_limit, max_attempts, timeout_secs,
                       backoff_base_ms, backoff_max_ms, created_at, traceparent",
            sql_list(&JobStatus::CLAIMABLE)
        );
        for id in ids {
            let sid = id.to_string();
            // Read before the claim clears it: SQLite's RETURNING, and its
            // subqueries, see only the updated row.
            let due: Option<i64> = sqlx::query_scalar(DUE_AT)
                .bind(&sid)
                .fetch_optional(&mut *tx)
                .await?;
            let row = sqlx::query(&sql)
                .bind(&sid)
                .bind(now + ms(lease))
                .bind(worker)
                .bind(now)
                .bind(JobStatus::Running.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let Some(r) = row else {
                park_paused(&mut tx, &sid, now).await?;
                continue;
            };
            event(&mut tx, &sid, EventType::Started, &self.bell).await?;
            let payload: String = r.try_get("payload")?;
            out.push(Claimed {
                id: *id,
                kind: r.try_get("kind")?,
                payload: serde_json::from_str(&payload).context("stored payload")?,
                attempt: r.try_get("attempt")?,
                attempt_limit: r.try_get("attempt_limit")?,
                max_attempts: r.try_get("max_attempts")?,
                timeout_secs: r.try_get("timeout_secs")?,
                backoff: backoff(&r)?,
                created_at: from_ms(r.try_get("created_at")?).unwrap_or_default(),
                due_at: from_ms(due).unwrap_or_default(),
                traceparent: traceparent(r.try_get("traceparent")?),
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn extend_leases(
        &self,
        held: &[(Uuid, i32)],
        lease: Duration,
    ) -> StoreResult<Vec<Held>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let until = now_ms() + ms(lease);
        for (id, attempt) in held {
            let cancel: Option<i64> = sqlx::query_scalar(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND attempt = ? AND status = ?
                 RETURNING cancel_requested",
            )
            .bind(until)
            .bind(id.to_string())
            .bind(attempt)
            .bind(JobStatus::Running.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(c) = cancel {
                out.push(Held {
                    id: *id,
                    cancel_requested: c != 0,
                });
            }
        }
        tx.commit().await?;
        Ok(out)
    }
}

/// A job of a paused pool that a worker received before it knew of the
/// pause goes back to the outbox until the resume (see the Postgres store).
async fn park_paused(tx: &mut sqlx::SqliteConnection, id: &str, now: i64) -> StoreResult<()> {
    sqlx::query(&format!(
        "INSERT INTO outbox (job_id, pool, available_at, priority)
         SELECT j.id, j.kind, min(?2, coalesce(j.next_run_at, j.run_at, j.created_at)), j.priority
         FROM jobs j JOIN pools p ON p.name = j.kind AND p.paused
         WHERE j.id = ?1 AND j.status IN {} AND j.cancel_requested = 0
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
        sql_list(&JobStatus::CLAIMABLE)
    ))
    .bind(id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
