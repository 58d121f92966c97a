//! Recording progress reports on Postgres: one statement per batch, fenced
//! per job on `running` at the reports' attempt, like a heartbeat.

use uuid::Uuid;

use super::PgStore;
use crate::model::progress::ProgressReport;
use crate::model::{EventType, JobStatus};
use crate::store::{ProgressRecorded, StoreResult};

impl PgStore {
    pub(super) async fn record_progress_batch(
        &self,
        reports: &[ProgressReport],
    ) -> StoreResult<ProgressRecorded> {
        if reports.is_empty() {
            return Ok(ProgressRecorded::default());
        }
        let ids: Vec<Uuid> = reports.iter().map(|r| r.job_id).collect();
        let attempts: Vec<i32> = reports.iter().map(|r| r.progress.attempt).collect();
        let bodies: Vec<serde_json::Value> = reports.iter().map(|r| r.progress.to_json()).collect();
        // SKIP LOCKED: a row another transaction holds belongs to a
        // heartbeat or a finish. Waiting for it could deadlock with those
        // multi-row updates, and a finishing job's progress is moot anyway;
        // the caller tries a busy job again. The lock re-checks status and
        // attempt on the newest row version, so fencing holds.
        let rows: Vec<(Uuid, bool)> = sqlx::query_as(
            "WITH r AS (
                SELECT * FROM unnest($1::uuid[], $2::int[], $3::jsonb[]) WITH ORDINALITY
                  AS r(id, attempt, progress, n)
             ), latest AS (
                SELECT DISTINCT ON (id) id, attempt, progress FROM r ORDER BY id, n DESC
             ), locked AS (
                SELECT j.id, l.progress FROM jobs j JOIN latest l ON l.id = j.id
                WHERE j.status = $4 AND j.attempt = l.attempt
                ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
             ), upd AS (
                UPDATE jobs j SET progress = k.progress FROM locked k WHERE j.id = k.id
                RETURNING j.id, j.kind, j.status, j.attempt, j.parent_id
             ), ev AS (
                INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id, progress)
                SELECT u.id, u.kind, $5, u.status, u.attempt, u.parent_id, r.progress
                FROM r JOIN upd u ON u.id = r.id AND u.attempt = r.attempt ORDER BY r.n
             )
             SELECT id, true FROM upd
             UNION ALL
             SELECT j.id, false FROM jobs j JOIN latest l ON l.id = j.id
             WHERE j.status = $4 AND j.attempt = l.attempt
               AND j.id NOT IN (SELECT id FROM locked)",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&bodies)
        .bind(JobStatus::Running.as_str())
        .bind(EventType::Progress.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut out = ProgressRecorded::default();
        for (id, written) in rows {
            if written {
                out.written.push(id);
            } else {
                out.busy.push(id);
            }
        }
        Ok(out)
    }
}
