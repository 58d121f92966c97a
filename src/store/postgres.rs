//! The Postgres store: production source of truth. Batches are applied with
//! `unnest` so one statement carries many jobs, but each row keeps its own
//! condition (`status` and `attempt`), so batching never weakens fencing.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::{
    ms, CancelOutcome, Claimed, DeadLetterOutcome, Depths, Held, JobEvent, ListFilter, Publisher,
    Store, StoreResult,
};
use crate::job::{Backoff, ChildRef, Inserted, Job, JobStatus, NewJob};
use crate::lifecycle::{Finish, FinishCmd};

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// The event type of a status, in SQL, so events are written in the same
/// statement as the transition.
const EVENT_TYPE: &str = "'job.' || CASE status WHEN 'running' THEN 'started' ELSE status END";

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let opts: PgConnectOptions = url.parse().context("DATABASE_URL is not a valid URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // A short acquire timeout turns "Postgres is down" into a fast
            // 503 instead of a hung request.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(opts);
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

async fn insert_in(conn: &mut PgConnection, jobs: &[NewJob]) -> StoreResult<Vec<Inserted>> {
    if jobs.is_empty() {
        return Ok(vec![]);
    }
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    let payloads: Vec<&serde_json::Value> = jobs.iter().map(|j| &j.payload).collect();
    let max: Vec<i32> = jobs.iter().map(|j| j.max_attempts).collect();
    let timeouts: Vec<i32> = jobs.iter().map(|j| j.timeout_secs).collect();
    let base: Vec<i64> = jobs.iter().map(|j| j.backoff.base_ms as i64).collect();
    let cap: Vec<i64> = jobs.iter().map(|j| j.backoff.max_ms as i64).collect();
    let run_at: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.run_at).collect();
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.idempotency_key.as_deref()).collect();
    let parents: Vec<Option<Uuid>> = jobs.iter().map(|j| j.parent_id).collect();
    let hooks: Vec<Option<serde_json::Value>> = jobs
        .iter()
        .map(|j| j.webhook.as_ref().map(serde_json::to_value).transpose())
        .collect::<Result<_, _>>()
        .context("encoding the job's webhook")?;
    let created: Vec<Uuid> = sqlx::query_scalar(&format!(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int[], $5::int[],
                                 $6::bigint[], $7::bigint[], $8::timestamptz[], $9::text[], $10::uuid[],
                                 $11::jsonb[])
              AS t(id, kind, payload, max_attempts, timeout_secs, base_ms, max_ms, run_at, idem, parent_id,
                   webhook)
         ), ins AS (
            INSERT INTO jobs (id, kind, payload, status, max_attempts, attempt_limit, backoff_base_ms,
                              backoff_max_ms, timeout_secs, run_at, next_run_at, idempotency_key, parent_id, webhook)
            SELECT id, kind, payload, 'queued', max_attempts, max_attempts, base_ms, max_ms,
                   timeout_secs, run_at, run_at, idem, parent_id, webhook FROM input
            ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id, kind, status, attempt, next_run_at, parent_id
         ), ob AS (
            INSERT INTO outbox (job_id, pool, available_at)
            SELECT id, kind, coalesce(next_run_at, now()) FROM ins
         ), ev AS (
            INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
            SELECT id, kind, {EVENT_TYPE}, status, attempt, parent_id FROM ins
         )
         SELECT id FROM ins"
    ))
    .bind(&ids)
    .bind(&kinds)
    .bind(&payloads)
    .bind(&max)
    .bind(&timeouts)
    .bind(&base)
    .bind(&cap)
    .bind(&run_at)
    .bind(&keys)
    .bind(&parents)
    .bind(&hooks)
    .fetch_all(&mut *conn)
    .await?;

    let created: std::collections::HashSet<Uuid> = created.into_iter().collect();
    let missing_keys: Vec<&str> = jobs
        .iter()
        .filter(|j| !created.contains(&j.id))
        .filter_map(|j| j.idempotency_key.as_deref())
        .collect();
    // Conflicting keys: ON CONFLICT waited for the other transaction, so the
    // first job is committed and visible to this next statement.
    let existing: HashMap<String, (Uuid, String)> = if missing_keys.is_empty() {
        HashMap::new()
    } else {
        sqlx::query("SELECT idempotency_key, id, status FROM jobs WHERE idempotency_key = ANY($1)")
            .bind(&missing_keys)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?))))
            .collect::<Result<_, sqlx::Error>>()?
    };
    jobs.iter()
        .map(|j| {
            if created.contains(&j.id) {
                return Ok(Inserted {
                    id: j.id,
                    status: JobStatus::Queued,
                    created: true,
                });
            }
            let key = j.idempotency_key.as_deref().unwrap_or_default();
            let (id, status) = existing
                .get(key)
                .context("job neither inserted nor found by idempotency key")?;
            Ok(Inserted {
                id: *id,
                status: parse_status(status)?,
                created: false,
            })
        })
        .collect()
}

fn parse_status(s: &str) -> anyhow::Result<JobStatus> {
    JobStatus::parse(s).with_context(|| format!("unknown status {s:?} in the database"))
}

fn row_to_job(r: &PgRow) -> anyhow::Result<Job> {
    let errors: serde_json::Value = r.try_get("errors")?;
    Ok(Job {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        payload: r.try_get("payload")?,
        status: parse_status(r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        attempt_limit: r.try_get("attempt_limit")?,
        backoff: Backoff {
            base_ms: r.try_get::<i64, _>("backoff_base_ms")? as u64,
            max_ms: r.try_get::<i64, _>("backoff_max_ms")? as u64,
        },
        timeout_secs: r.try_get("timeout_secs")?,
        run_at: r.try_get("run_at")?,
        idempotency_key: r.try_get("idempotency_key")?,
        result: r.try_get("result")?,
        errors: serde_json::from_value(errors).context("errors column")?,
        parent_id: r.try_get("parent_id")?,
        children: vec![],
        cancel_requested: r.try_get("cancel_requested")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        next_run_at: r.try_get("next_run_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

async fn finish_in(conn: &mut PgConnection, cmds: &[FinishCmd]) -> StoreResult<Vec<Uuid>> {
    let ids: Vec<Uuid> = cmds.iter().map(|c| c.id).collect();
    let attempts: Vec<i32> = cmds.iter().map(|c| c.attempt).collect();
    let statuses: Vec<&str> = cmds.iter().map(|c| c.finish.status().as_str()).collect();
    let results: Vec<Option<&serde_json::Value>> = cmds
        .iter()
        .map(|c| match &c.finish {
            Finish::Succeeded { result, .. } => Some(result),
            _ => None,
        })
        .collect();
    let errors: Vec<Option<serde_json::Value>> = cmds
        .iter()
        .map(|c| c.finish.error().map(serde_json::to_value).transpose())
        .collect::<Result<_, _>>()
        .context("encoding attempt error")?;
    let next: Vec<Option<DateTime<Utc>>> = cmds
        .iter()
        .map(|c| match &c.finish {
            Finish::Retrying { next_run_at, .. } => Some(*next_run_at),
            _ => None,
        })
        .collect();
    let applied = sqlx::query_scalar(&format!(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::jsonb[], $5::jsonb[], $6::timestamptz[])
              AS t(id, attempt, status, result, error, next_run_at)
         ), upd AS (
            UPDATE jobs j SET
              status = i.status,
              result = CASE WHEN i.status = 'succeeded' THEN i.result ELSE j.result END,
              errors = CASE WHEN i.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(i.error) END,
              finished_at = CASE WHEN i.status IN ('succeeded', 'dead', 'cancelled') THEN now() END,
              next_run_at = i.next_run_at,
              -- a handed-back attempt was interrupted, not failed: it does not use up the budget
              attempt_limit = CASE WHEN i.status = 'queued' THEN j.attempt_limit + 1 ELSE j.attempt_limit END,
              lease_until = NULL,
              updated_at = now()
            FROM input i
            WHERE j.id = i.id AND j.attempt = i.attempt AND j.status = 'running'
            RETURNING j.id, j.kind, j.status, j.attempt, j.next_run_at, j.parent_id
         ), ob AS (
            INSERT INTO outbox (job_id, pool, available_at)
            SELECT id, kind, coalesce(next_run_at, now()) FROM upd WHERE status IN ('queued', 'retrying')
         ), ev AS (
            INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
            SELECT id, kind, {EVENT_TYPE}, status, attempt, parent_id FROM upd
         )
         SELECT id FROM upd"
    ))
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&results)
    .bind(&errors)
    .bind(&next)
    .fetch_all(&mut *conn)
    .await?;
    Ok(applied)
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .context("applying Postgres migrations")?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_jobs(&self, jobs: &[NewJob]) -> StoreResult<Vec<Inserted>> {
        let mut tx = self.pool.begin().await?;
        let out = insert_in(&mut tx, jobs).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
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

    async fn list_jobs(&self, f: &ListFilter) -> StoreResult<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
               AND ($3::uuid IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4",
        )
        .bind(f.status.map(JobStatus::as_str))
        .bind(f.kind.as_deref())
        .bind(f.before)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row_to_job).collect::<anyhow::Result<_>>()?)
    }

    async fn cancel(&self, id: Uuid) -> StoreResult<CancelOutcome> {
        let row: Option<String> = sqlx::query_scalar(&format!(
            "WITH upd AS (
                UPDATE jobs SET
                  status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
                  finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,
                  cancel_requested = true, updated_at = now()
                WHERE id = $1 AND status IN ('queued', 'retrying', 'running')
                RETURNING id, kind, status, attempt, parent_id
             ), ev AS (
                INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
                SELECT id, kind, {EVENT_TYPE}, status, attempt, parent_id FROM upd WHERE status = 'cancelled'
             )
             SELECT status FROM upd"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row.as_deref() {
            Some("cancelled") => CancelOutcome::Cancelled,
            Some(_) => CancelOutcome::Requested,
            None => match self.status_of(id).await? {
                Some(s) => CancelOutcome::AlreadyFinished(s),
                None => CancelOutcome::NotFound,
            },
        })
    }

    async fn replay(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        let n: Option<Uuid> = sqlx::query_scalar(&format!(
            "WITH upd AS (
                UPDATE jobs SET status = 'queued', attempt_limit = attempt + max_attempts,
                  finished_at = NULL, next_run_at = NULL, cancel_requested = false, updated_at = now()
                WHERE id = $1 AND status = 'dead'
                RETURNING id, kind, status, attempt, parent_id
             ), ob AS (
                INSERT INTO outbox (job_id, pool) SELECT id, kind FROM upd
             ), ev AS (
                INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
                SELECT id, kind, {EVENT_TYPE}, status, attempt, parent_id FROM upd
             )
             SELECT id FROM upd"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        self.dead_letter_outcome(id, n.is_some()).await
    }

    async fn purge(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        let n = sqlx::query("DELETE FROM jobs WHERE id = $1 AND status = 'dead'")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        self.dead_letter_outcome(id, n > 0).await
    }

    async fn claim(
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
                UPDATE jobs SET status = 'running', attempt = attempt + 1,
                  lease_until = now() + $3 * interval '1 millisecond', worker = $2,
                  started_at = now(), next_run_at = NULL, updated_at = now()
                WHERE id = ANY($1) AND status IN ('queued', 'retrying')
                  AND (next_run_at IS NULL OR next_run_at <= now()) AND NOT cancel_requested
                RETURNING id, kind, payload, status, attempt, attempt_limit, timeout_secs,
                          backoff_base_ms, backoff_max_ms, created_at, parent_id
             ), ev AS (
                INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
                SELECT id, kind, {EVENT_TYPE}, status, attempt, parent_id FROM c
             )
             SELECT * FROM c"
        ))
        .bind(&ids)
        .bind(worker)
        .bind(ms(lease) as f64)
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
                    timeout_secs: r.try_get("timeout_secs")?,
                    backoff: Backoff {
                        base_ms: r.try_get::<i64, _>("backoff_base_ms")? as u64,
                        max_ms: r.try_get::<i64, _>("backoff_max_ms")? as u64,
                    },
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn heartbeat(&self, held: &[(Uuid, i32)], lease: Duration) -> StoreResult<Vec<Held>> {
        if held.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
        let attempts: Vec<i32> = held.iter().map(|h| h.1).collect();
        let rows = sqlx::query(
            "UPDATE jobs j SET lease_until = now() + $3 * interval '1 millisecond'
             FROM unnest($1::uuid[], $2::int[]) AS h(id, attempt)
             WHERE j.id = h.id AND j.attempt = h.attempt AND j.status = 'running'
             RETURNING j.id, j.cancel_requested",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(ms(lease) as f64)
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

    async fn finish(&self, cmds: &[FinishCmd]) -> StoreResult<Vec<Uuid>> {
        if cmds.is_empty() {
            return Ok(vec![]);
        }
        let mut tx = self.pool.begin().await?;
        let applied = finish_in(&mut tx, cmds).await?;
        // Children are submitted in the same transaction as their parent's
        // success, and only if that success was not fenced.
        let children: Vec<NewJob> = cmds
            .iter()
            .filter(|c| applied.contains(&c.id))
            .flat_map(|c| match &c.finish {
                Finish::Succeeded { children, .. } => children.clone(),
                _ => vec![],
            })
            .collect();
        insert_in(&mut tx, &children).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn relay_outbox(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "DELETE FROM outbox WHERE id IN (
                SELECT id FROM outbox WHERE available_at <= now()
                ORDER BY available_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING job_id, pool",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_pool: HashMap<&str, Vec<Uuid>> = HashMap::new();
        for (id, pool) in &rows {
            by_pool.entry(pool.as_str()).or_default().push(*id);
        }
        // Publish before commit: if the commit fails the rows come back and
        // are sent twice, which the conditional claim makes harmless; the
        // other order could lose them.
        for (pool, ids) in by_pool {
            publisher.publish(pool, &ids).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn rescue_expired(&self, limit: i64) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar(&format!(
            "WITH x AS (
                SELECT id FROM jobs WHERE status = 'running' AND lease_until < now()
                ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED
             ), upd AS (
                UPDATE jobs j SET
                  status = CASE WHEN j.cancel_requested THEN 'cancelled'
                                WHEN j.attempt >= j.attempt_limit THEN 'dead' ELSE 'retrying' END,
                  errors = j.errors || jsonb_build_array(jsonb_build_object(
                     'attempt', j.attempt, 'class', 'retryable', 'at', now(),
                     'message', 'lease expired: the worker stopped heartbeating (killed, paused or cut off)')),
                  finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.attempt_limit THEN now() END,
                  next_run_at = NULL, lease_until = NULL, updated_at = now()
                FROM x WHERE j.id = x.id
                RETURNING j.id, j.kind, j.status, j.attempt, j.parent_id
             ), ob AS (
                INSERT INTO outbox (job_id, pool) SELECT id, kind FROM upd WHERE status = 'retrying'
             ), ev AS (
                INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
                SELECT id, kind, {EVENT_TYPE}, status, attempt, parent_id FROM upd
             )
             SELECT count(*) FROM upd"
        ))
        .bind(limit)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as usize)
    }

    async fn published_waiting(&self) -> StoreResult<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, sum(n)::bigint FROM (
                SELECT kind, count(*) AS n FROM jobs
                WHERE status IN ('queued', 'retrying') AND NOT cancel_requested GROUP BY kind
                UNION ALL
                SELECT pool, -count(*) FROM outbox GROUP BY pool
             ) t GROUP BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn repair_lost(
        &self,
        pool: &str,
        older_than: Duration,
        limit: i64,
    ) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar(
            "WITH x AS (
                SELECT id FROM jobs j
                WHERE status IN ('queued', 'retrying') AND kind = $3
                  AND greatest(updated_at, coalesce(next_run_at, updated_at))
                      < now() - $1 * interval '1 millisecond'
                  AND NOT cancel_requested
                  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
                ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), upd AS (
                UPDATE jobs j SET updated_at = now() FROM x WHERE j.id = x.id RETURNING j.id, j.kind
             ), ob AS (
                INSERT INTO outbox (job_id, pool) SELECT id, kind FROM upd
             )
             SELECT count(*) FROM upd",
        )
        .bind(ms(older_than) as f64)
        .bind(limit)
        .bind(pool)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as usize)
    }

    async fn depths(&self) -> StoreResult<Depths> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, status, count(*) FROM jobs
             WHERE status IN ('queued', 'retrying', 'running', 'dead') GROUP BY kind, status",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut d = Depths::default();
        for (kind, status, n) in rows {
            d.by_kind_status.insert((kind, parse_status(&status)?), n);
        }
        Ok(d)
    }

    async fn counts(
        &self,
        since: Option<Uuid>,
        kind: Option<&str>,
    ) -> StoreResult<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM jobs
             WHERE ($1::uuid IS NULL OR id >= $1) AND ($2::text IS NULL OR kind = $2) GROUP BY status",
        )
        .bind(since)
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn job_events(&self, id: Uuid) -> StoreResult<Vec<JobEvent>> {
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

impl PgStore {
    async fn status_of(&self, id: Uuid) -> StoreResult<Option<JobStatus>> {
        let s: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(s.as_deref().map(parse_status).transpose()?)
    }

    async fn dead_letter_outcome(&self, id: Uuid, done: bool) -> StoreResult<DeadLetterOutcome> {
        if done {
            return Ok(DeadLetterOutcome::Done);
        }
        Ok(match self.status_of(id).await? {
            Some(s) => DeadLetterOutcome::NotDead(s),
            None => DeadLetterOutcome::NotFound,
        })
    }
}
