//! Reading jobs on SQLite (one, a page, their events, counts) and purging
//! a dead letter.

use std::collections::HashMap;

use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::apply::backoff;
use super::{from_ms, parse_id, parse_status, SqliteStore};
use crate::model::job::{ChildRef, Job};
use crate::model::JobStatus;
use crate::store::{sql_list, DeadLetterOutcome, Depths, JobEvent, ListFilter, StoreResult};

fn row_to_job(r: &SqliteRow) -> anyhow::Result<Job> {
    let payload: String = r.try_get("payload")?;
    let result: Option<String> = r.try_get("result")?;
    let errors: String = r.try_get("errors")?;
    let parent: Option<String> = r.try_get("parent_id")?;
    let progress: Option<String> = r.try_get("progress")?;
    Ok(Job {
        id: parse_id(r.try_get("id")?)?,
        kind: r.try_get("kind")?,
        payload: serde_json::from_str(&payload)?,
        status: parse_status(r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        attempt_limit: r.try_get("attempt_limit")?,
        backoff: backoff(r)?,
        timeout_secs: r.try_get("timeout_secs")?,
        run_at: from_ms(r.try_get("run_at")?),
        idempotency_key: r.try_get("idempotency_key")?,
        priority: r.try_get("priority")?,
        concurrency_key: r.try_get("concurrency_key")?,
        tenant: r.try_get("tenant")?,
        result: result.as_deref().map(serde_json::from_str).transpose()?,
        errors: serde_json::from_str(&errors)?,
        progress: progress.as_deref().map(serde_json::from_str).transpose()?,
        parent_id: parent.as_deref().map(parse_id).transpose()?,
        children: vec![],
        schedule: r.try_get("schedule")?,
        scheduled_for: from_ms(r.try_get("scheduled_for")?),
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        created_at: from_ms(r.try_get("created_at")?).unwrap_or_default(),
        started_at: from_ms(r.try_get("started_at")?),
        finished_at: from_ms(r.try_get("finished_at")?),
        next_run_at: from_ms(r.try_get("next_run_at")?),
        updated_at: from_ms(r.try_get("updated_at")?).unwrap_or_default(),
    })
}

impl SqliteStore {
    pub(super) async fn job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        let Some(row) = sqlx::query("SELECT * FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut job = row_to_job(&row)?;
        let kids: Vec<(String, String, String)> =
            sqlx::query_as("SELECT id, kind, status FROM jobs WHERE parent_id = ? ORDER BY id")
                .bind(id.to_string())
                .fetch_all(&self.pool)
                .await?;
        job.children = kids
            .into_iter()
            .map(|(id, kind, status)| {
                Ok(ChildRef {
                    id: parse_id(&id)?,
                    kind,
                    status: parse_status(&status)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Some(job))
    }

    pub(super) async fn jobs(&self, f: &ListFilter) -> StoreResult<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR kind = ?2)
               AND (?3 IS NULL OR id < ?3) AND (?5 IS NULL OR tenant = ?5)
             ORDER BY id DESC LIMIT ?4",
        )
        .bind(f.status.map(JobStatus::as_str))
        .bind(f.kind.as_deref())
        .bind(f.before.map(|b| b.to_string()))
        .bind(f.limit)
        .bind(f.tenant.as_deref())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row_to_job).collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn purge_dead(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        let n = sqlx::query("DELETE FROM jobs WHERE id = ? AND status = ?")
            .bind(id.to_string())
            .bind(JobStatus::Dead.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n > 0 {
            return Ok(DeadLetterOutcome::Done);
        }
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match status.as_deref().map(parse_status).transpose()? {
            Some(s) => DeadLetterOutcome::NotDead(s),
            None => DeadLetterOutcome::NotFound,
        })
    }

    pub(super) async fn depth_counts(&self) -> StoreResult<Depths> {
        use JobStatus::*;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(&format!(
            "SELECT kind, status, count(*) FROM jobs WHERE status IN {} GROUP BY kind, status",
            sql_list(&[Queued, Retrying, Running, Dead])
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut d = Depths::default();
        for (kind, status, n) in rows {
            d.by_kind_status.insert((kind, parse_status(&status)?), n);
        }
        Ok(d)
    }

    pub(super) async fn status_counts(
        &self,
        since: Option<Uuid>,
        kind: Option<&str>,
        tenant: Option<&str>,
    ) -> StoreResult<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM jobs WHERE (?1 IS NULL OR id >= ?1) AND (?2 IS NULL OR kind = ?2)
               AND (?3 IS NULL OR tenant = ?3) GROUP BY status",
        )
        .bind(since.map(|s| s.to_string()))
        .bind(kind)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub(super) async fn events_of(&self, id: Uuid) -> StoreResult<Vec<JobEvent>> {
        let rows: Vec<(String, i32, i64)> =
            sqlx::query_as("SELECT type, attempt, at FROM job_events WHERE job_id = ? ORDER BY id")
                .bind(id.to_string())
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, attempt, at)| JobEvent {
                kind,
                attempt,
                at: from_ms(Some(at)).unwrap_or_default(),
            })
            .collect())
    }
}
