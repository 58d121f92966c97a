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
use crate::store::{ms, sql_list, Claimed, Held, StoreResult};

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
                RETURNING id, kind, payload, status, attempt, attempt_limit, max_attempts, timeout_secs,
                          backoff_base_ms, backoff_max_ms, created_at, parent_id
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
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
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
