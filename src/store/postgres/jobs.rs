//! Reading jobs on Postgres (one, a page, their events, counts) and
//! purging a dead letter.

use std::collections::HashMap;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::apply::backoff;
use super::{parse_status, PgStore};
use crate::model::job::{ChildRef, Job};
use crate::model::JobStatus;
use crate::store::{sql_list, DeadLetterOutcome, Depths, JobEvent, ListFilter, StoreResult};

fn row_to_job(r: &PgRow) -> anyhow::Result<Job> {
    let errors: serde_json::Value = r.try_get("errors")?;
    let progress: Option<serde_json::Value> = r.try_get("progress")?;
    Ok(Job {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        payload: r.try_get("payload")?,
        status: parse_status(r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        attempt_limit: r.try_get("attempt_limit")?,
        backoff: backoff(r)?,
        timeout_secs: r.try_get("timeout_secs")?,
        run_at: r.try_get("run_at")?,
        idempotency_key: r.try_get("idempotency_key")?,
        priority: r.try_get("priority")?,
        concurrency_key: r.try_get("concurrency_key")?,
        tenant: r.try_get("tenant")?,
        result: r.try_get("result")?,
        errors: serde_json::from_value(errors).context("errors column")?,
        progress: progress
            .map(serde_json::from_value)
            .transpose()
            .context("progress column")?,
        parent_id: r.try_get("parent_id")?,
        children: vec![],
        schedule: r.try_get("schedule")?,
        scheduled_for: r.try_get("scheduled_for")?,
        cancel_requested: r.try_get("cancel_requested")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        next_run_at: r.try_get("next_run_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl PgStore {
    pub(super) async fn job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        let Some(row) = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut job = row_to_job(&row)?;
        job.children =
            sqlx::query("SELECT id, kind, status FROM jobs WHERE parent_id = $1 ORDER BY id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(ChildRef {
                        id: r.try_get(0)?,
                        kind: r.try_get(1)?,
                        status: parse_status(r.try_get(2)?)?,
                    })
                })
                .collect::<anyhow::Result<_>>()?;
        Ok(Some(job))
    }

    pub(super) async fn jobs(&self, f: &ListFilter) -> StoreResult<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
               AND ($3::uuid IS NULL OR id < $3) AND ($5::text IS NULL OR tenant = $5)
             ORDER BY id DESC LIMIT $4",
        )
        .bind(f.status.map(JobStatus::as_str))
        .bind(f.kind.as_deref())
        .bind(f.before)
        .bind(f.limit)
        .bind(f.tenant.as_deref())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row_to_job).collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn purge_dead(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        let n = sqlx::query("DELETE FROM jobs WHERE id = $1 AND status = $2")
            .bind(id)
            .bind(JobStatus::Dead.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n > 0 {
            return Ok(DeadLetterOutcome::Done);
        }
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
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
            "SELECT status, count(*) FROM jobs
             WHERE ($1::uuid IS NULL OR id >= $1) AND ($2::text IS NULL OR kind = $2)
               AND ($3::text IS NULL OR tenant = $3) GROUP BY status",
        )
        .bind(since)
        .bind(kind)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub(super) async fn events_of(&self, id: Uuid) -> StoreResult<Vec<JobEvent>> {
        let rows: Vec<(String, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT type, attempt, at FROM job_events WHERE job_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, attempt, at)| JobEvent { kind, attempt, at })
            .collect())
    }
}
