//! Cron schedules on Postgres (table `schedules`): storing them, and firing
//! the due ones, where row locks skip what another dispatcher is firing and
//! the jobs commit together with each schedule's next fire time.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::apply::insert_in;
use super::PgStore;
use crate::model::schedule::{Firing, NewSchedule, Schedule};
use crate::store::{fired, FireFn, Fired, StoreResult};

fn row_to_schedule(r: &PgRow) -> anyhow::Result<Schedule> {
    let job: serde_json::Value = r.try_get("job")?;
    Ok(Schedule {
        name: r.try_get("name")?,
        tenant: r.try_get("tenant")?,
        cron: r.try_get("cron")?,
        timezone: r.try_get("timezone")?,
        jitter_secs: u32::try_from(r.try_get::<i32, _>("jitter_secs")?).unwrap_or(0),
        job: serde_json::from_value(job).context("a schedule's job in the database")?,
        paused: r.try_get("paused")?,
        next_fire_at: r.try_get("next_fire_at")?,
        last_fire_at: r.try_get("last_fire_at")?,
        last_job_id: r.try_get("last_job_id")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl PgStore {
    pub(super) async fn upsert_schedule(&self, s: &NewSchedule) -> StoreResult<bool> {
        let job = serde_json::to_value(&s.job).context("encoding a schedule's job")?;
        // `xmax = 0` only on a row this statement inserted.
        let created: bool = sqlx::query_scalar(
            "INSERT INTO schedules (tenant, name, cron, timezone, jitter_secs, job, next_fire_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant, name) DO UPDATE SET
                cron = $3, timezone = $4, jitter_secs = $5, job = $6,
                next_fire_at = CASE WHEN schedules.paused THEN NULL ELSE $7 END,
                last_error = NULL, updated_at = now()
             RETURNING xmax = 0",
        )
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(&s.cron)
        .bind(&s.timezone)
        .bind(s.jitter_secs as i32)
        .bind(job)
        .bind(s.next_fire_at)
        .fetch_one(&self.pool)
        .await?;
        Ok(created)
    }

    pub(super) async fn schedules_of(
        &self,
        tenant: &str,
        name: Option<&str>,
    ) -> StoreResult<Vec<Schedule>> {
        let rows = sqlx::query(
            "SELECT * FROM schedules WHERE tenant = $1 AND ($2::text IS NULL OR name = $2)
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
        let n = sqlx::query("DELETE FROM schedules WHERE tenant = $1 AND name = $2")
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
            "UPDATE schedules SET paused = $3::timestamptz IS NULL, next_fire_at = $3,
                updated_at = now()
             WHERE tenant = $1 AND name = $2",
        )
        .bind(tenant)
        .bind(name)
        .bind(next_fire_at)
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
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT * FROM schedules WHERE NOT paused AND next_fire_at <= $1
             ORDER BY next_fire_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(vec![]);
        }
        let schedules = rows
            .iter()
            .map(row_to_schedule)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let firings: Vec<Firing> = schedules.iter().map(fire).collect();
        let jobs: Vec<_> = firings.iter().filter_map(|f| f.job.clone()).collect();
        let mut made = insert_in(&mut tx, &jobs).await?.into_iter();
        let mut out = Vec::with_capacity(schedules.len());
        for (s, f) in schedules.iter().zip(&firings) {
            let job_id = f.job.as_ref().and_then(|_| made.next()).map(|i| i.id);
            out.push(fired(s, f, job_id));
        }
        let col = |g: fn(&Fired) -> &str| out.iter().map(g).collect::<Vec<_>>();
        let next: Vec<Option<DateTime<Utc>>> = firings.iter().map(|f| f.next_fire_at).collect();
        let fire_at: Vec<Option<DateTime<Utc>>> = out.iter().map(|f| f.fire_at).collect();
        let ids: Vec<Option<Uuid>> = out.iter().map(|f| f.job_id).collect();
        let errors: Vec<Option<&str>> = out.iter().map(|f| f.error.as_deref()).collect();
        sqlx::query(
            "UPDATE schedules s SET next_fire_at = u.next,
                last_fire_at = coalesce(u.fire_at, s.last_fire_at),
                last_job_id = coalesce(u.job_id, s.last_job_id),
                last_error = u.error, updated_at = now()
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                         $5::uuid[], $6::text[])
                  AS u(tenant, name, next, fire_at, job_id, error)
             WHERE s.tenant = u.tenant AND s.name = u.name",
        )
        .bind(col(|f| f.tenant.as_str()))
        .bind(col(|f| f.name.as_str()))
        .bind(&next)
        .bind(&fire_at)
        .bind(&ids)
        .bind(&errors)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }
}
