//! Recording progress reports on SQLite (see the Postgres store): the one
//! connection serialises writers, so no row is ever busy here.

use std::collections::HashMap;

use uuid::Uuid;

use super::{now_ms, SqliteStore};
use crate::model::progress::ProgressReport;
use crate::model::{EventType, JobStatus};
use crate::store::{ProgressRecorded, StoreResult};

impl SqliteStore {
    pub(super) async fn record_progress_batch(
        &self,
        reports: &[ProgressReport],
    ) -> StoreResult<ProgressRecorded> {
        let mut out = ProgressRecorded::default();
        if reports.is_empty() {
            return Ok(out);
        }
        // Each job's last report is its progress.
        let mut latest: HashMap<Uuid, &ProgressReport> = HashMap::new();
        for r in reports {
            latest.insert(r.job_id, r);
        }
        let mut tx = self.pool.begin().await?;
        for (id, r) in &latest {
            let n = sqlx::query(
                "UPDATE jobs SET progress = ? WHERE id = ? AND status = ? AND attempt = ?",
            )
            .bind(r.progress.to_json().to_string())
            .bind(id.to_string())
            .bind(JobStatus::Running.as_str())
            .bind(r.progress.attempt)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                out.written.push(*id);
            }
        }
        let at = now_ms();
        let of_written = |r: &&ProgressReport| {
            out.written.contains(&r.job_id)
                && latest
                    .get(&r.job_id)
                    .is_some_and(|l| l.progress.attempt == r.progress.attempt)
        };
        for r in reports.iter().filter(of_written) {
            sqlx::query(
                "INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id, at, progress)
                 SELECT id, kind, ?, status, attempt, parent_id, ?, ? FROM jobs WHERE id = ?",
            )
            .bind(EventType::Progress.as_str())
            .bind(at)
            .bind(r.progress.to_json().to_string())
            .bind(r.job_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        if !out.written.is_empty() {
            // Before the commit is safe: the notifier's read waits for it
            // on the one connection.
            self.bell.notify_one();
        }
        tx.commit().await?;
        Ok(out)
    }
}
