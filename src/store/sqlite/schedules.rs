//! Cron schedules on SQLite (see the Postgres store). Firing takes the
//! file's write lock first (BEGIN IMMEDIATE), so two processes on one file
//! cannot both read a schedule as due.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::apply::insert_in;
use super::{from_ms, now_ms, parse_id, to_ms, SqliteStore};
use crate::model::schedule::{NewSchedule, Schedule};
use crate::store::{fired, FireFn, Fired, StoreResult};

fn row_to_schedule(r: &SqliteRow) -> anyhow::Result<Schedule> {
    let job: String = r.try_get("job")?;
    let last_job: Option<String> = r.try_get("last_job_id")?;
    Ok(Schedule {
        name: r.try_get("name")?,
        tenant: r.try_get("tenant")?,
        cron: r.try_get("cron")?,
        timezone: r.try_get("timezone")?,
        jitter_secs: u32::try_from(r.try_get::<i64, _>("jitter_secs")?).unwrap_or(0),
        job: serde_json::from_str(&job).context("a schedule's job in the database")?,
        paused: r.try_get::<i64, _>("paused")? != 0,
        next_fire_at: from_ms(r.try_get("next_fire_at")?),
        last_fire_at: from_ms(r.try_get("last_fire_at")?),
        last_job_id: last_job.as_deref().map(parse_id).transpose()?,
        last_error: r.try_get("last_error")?,
        created_at: from_ms(r.try_get("created_at")?).unwrap_or_default(),
        updated_at: from_ms(r.try_get("updated_at")?).unwrap_or_default(),
    })
}

impl SqliteStore {
    pub(super) async fn upsert_schedule(&self, s: &NewSchedule) -> StoreResult<bool> {
        let job = serde_json::to_string(&s.job).context("encoding a schedule's job")?;
        let mut tx = self.pool.begin().await?;
        let existed: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM schedules WHERE tenant = ?1 AND name = ?2")
                .bind(&s.tenant)
                .bind(&s.name)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO schedules (tenant, name, cron, timezone, jitter_secs, job, next_fire_at,
                                    created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
             ON CONFLICT (tenant, name) DO UPDATE SET
                cron = ?3, timezone = ?4, jitter_secs = ?5, job = ?6,
                next_fire_at = CASE WHEN paused THEN NULL ELSE ?7 END,
                last_error = NULL, updated_at = ?8",
        )
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(&s.cron)
        .bind(&s.timezone)
        .bind(i64::from(s.jitter_secs))
        .bind(job)
        .bind(s.next_fire_at.map(to_ms))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(existed.is_none())
    }

    pub(super) async fn schedules_of(
        &self,
        tenant: &str,
        name: Option<&str>,
    ) -> StoreResult<Vec<Schedule>> {
        let rows = sqlx::query(
            "SELECT * FROM schedules WHERE tenant = ?1 AND (?2 IS NULL OR name = ?2)
             ORDER BY name",
        )
        .bind(tenant)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(row_to_schedule)
            .collect::<anyhow::Result<_>>()?)
    }

    pub(super) async fn remove_schedule(&self, tenant: &str, name: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM schedules WHERE tenant = ?1 AND name = ?2")
            .bind(tenant)
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    pub(super) async fn pause_schedule(
        &self,
        tenant: &str,
        name: &str,
        next_fire_at: Option<DateTime<Utc>>,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE schedules SET paused = ?3 IS NULL, next_fire_at = ?3, updated_at = ?4
             WHERE tenant = ?1 AND name = ?2",
        )
        .bind(tenant)
        .bind(name)
        .bind(next_fire_at.map(to_ms))
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub(super) async fn fire_due(
        &self,
        now: DateTime<Utc>,
        limit: i64,
        fire: &FireFn,
    ) -> StoreResult<Vec<Fired>> {
        let mut conn = self.pool.acquire().await?;
        // Cheap check first: most rounds find nothing and need no write lock.
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM schedules WHERE paused = 0 AND next_fire_at <= ?1 LIMIT 1",
        )
        .bind(to_ms(now))
        .fetch_optional(&mut *conn)
        .await?;
        if due.is_none() {
            return Ok(vec![]);
        }
        let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "SELECT * FROM schedules WHERE paused = 0 AND next_fire_at <= ?1
             ORDER BY next_fire_at LIMIT ?2",
        )
        .bind(to_ms(now))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let s = row_to_schedule(row)?;
            let f = fire(&s);
            let job_id = match &f.job {
                Some(job) => insert_in(&mut tx, std::slice::from_ref(job), &self.bell)
                    .await?
                    .first()
                    .map(|i| i.id),
                None => None,
            };
            let done = fired(&s, &f, job_id);
            sqlx::query(
                "UPDATE schedules SET next_fire_at = ?3,
                    last_fire_at = coalesce(?4, last_fire_at),
                    last_job_id = coalesce(?5, last_job_id),
                    last_error = ?6, updated_at = ?7
                 WHERE tenant = ?1 AND name = ?2",
            )
            .bind(&s.tenant)
            .bind(&s.name)
            .bind(f.next_fire_at.map(to_ms))
            .bind(done.fire_at.map(to_ms))
            .bind(done.job_id.map(|id| id.to_string()))
            .bind(done.error.as_deref())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            out.push(done);
        }
        tx.commit().await?;
        Ok(out)
    }
}
