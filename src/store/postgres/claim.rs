//! The hot path on Postgres: claiming delivered jobs for one attempt and
//! extending the leases of running ones. Kept as SQL of their own (not
//! model transitions) because they run per delivered batch and need the
//! database's clock for leases; the statuses they use are the model's.

use std::time::Duration;

use sqlx::Row;
use uuid::Uuid;

use super::apply::backoff;
use super::PgStore;
use crate::model::{EventType, JobStatus};
use crate::store::{ms, sql_list, traceparent, Claimed, Held, StoreResult};

impl PgStore {
    pub(super) async fn claim_ids(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> StoreResult<Vec<Claimed>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        // Sorted ids make concurrent batch claims lock rows in the same
        // order, which keeps two workers given overlapping duplicates from
        // deadlocking each other.
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        let rows = sqlx::query(&format!(
            "WITH c AS (
                UPDATE jobs SET status = $4, attempt = attempt + 1,
                  lease_until = now() + $3 * interval '1 millisecond', worker = $2,
                  started_at = now(), next_run_at = NULL, updated_at = now()
                WHERE id = ANY($1) AND status IN {}
                  AND (next_run_at IS NULL OR next_run_at <= now()) AND NOT cancel_requested
                  AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = jobs.kind AND p.paused)
                RETURNING id, kind, payload, status, attempt, attempt_limit, max_attempts, timeout_secs,
                          backoff_base_ms, backoff_max_ms, created_at, parent_id, traceparent,
                          -- The row as it was: a statement's subqueries do not see its own update.
                          (SELECT coalesce(o.next_run_at, o.updated_at) FROM jobs o WHERE o.id = jobs.id) AS due_at
             ), ev AS (
                INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
                SELECT id, kind, $5, status, attempt, parent_id FROM c
             )
             SELECT * FROM c",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .bind(&ids)
        .bind(worker)
        .bind(ms(lease) as f64)
        .bind(JobStatus::Running.as_str())
        .bind(EventType::Started.as_str())
        .fetch_all(&self.pool)
        .await?;
        if rows.len() < ids.len() {
            self.park_paused(&ids).await?;
        }
        rows.iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    payload: r.try_get("payload")?,
                    attempt: r.try_get("attempt")?,
                    attempt_limit: r.try_get("attempt_limit")?,
                    max_attempts: r.try_get("max_attempts")?,
                    timeout_secs: r.try_get("timeout_secs")?,
                    backoff: backoff(r)?,
                    created_at: r.try_get("created_at")?,
                    due_at: r.try_get("due_at")?,
                    traceparent: traceparent(r.try_get("traceparent")?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Jobs of a paused pool that a worker received before it knew of the
    /// pause go back to the outbox, where they wait for the resume behind
    /// nothing of lower priority and in their first place among their own
    /// (due when they were first due); the worker then acks their messages.
    async fn park_paused(&self, ids: &[Uuid]) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO outbox (job_id, pool, priority, available_at)
             SELECT j.id, j.kind, j.priority, coalesce(j.next_run_at, j.run_at, j.created_at) FROM jobs j JOIN pools p ON p.name = j.kind AND p.paused
             WHERE j.id = ANY($1) AND j.status IN {} AND NOT j.cancel_requested
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn extend_leases(
        &self,
        held: &[(Uuid, i32)],
        lease: Duration,
    ) -> StoreResult<Vec<Held>> {
        if held.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
        let attempts: Vec<i32> = held.iter().map(|h| h.1).collect();
        let rows = sqlx::query(
            "UPDATE jobs j SET lease_until = now() + $3 * interval '1 millisecond'
             FROM unnest($1::uuid[], $2::int[]) AS h(id, attempt)
             WHERE j.id = h.id AND j.attempt = h.attempt AND j.status = $4
             RETURNING j.id, j.cancel_requested",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(ms(lease) as f64)
        .bind(JobStatus::Running.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Held {
                    id: r.try_get(0)?,
                    cancel_requested: r.try_get(1)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}
