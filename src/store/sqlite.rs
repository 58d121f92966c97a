//! The SQLite store for `stevedore dev`: the same lifecycle on one file.
//! The pool holds a single connection, so writes are serialised inside the
//! process and SQLite never answers "database is locked" to our own
//! transactions; batches loop over rows inside one transaction, which on
//! SQLite costs little because the commit is the expensive part.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};
use uuid::Uuid;

use super::{
    ms, CancelOutcome, Claimed, DeadLetterOutcome, Depths, Held, JobEvent, ListFilter, Publisher,
    Store, StoreResult,
};
use crate::job::{AttemptError, Backoff, ChildRef, Inserted, Job, JobStatus, NewJob};
use crate::lifecycle::{Finish, FinishCmd};

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|v| Utc.timestamp_millis_opt(v).single())
}

fn parse_status(s: &str) -> anyhow::Result<JobStatus> {
    JobStatus::parse(s).with_context(|| format!("unknown status {s:?} in the database"))
}

fn parse_id(s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("bad job id {s:?} in the database"))
}

impl SqliteStore {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .context("SQLite path")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn status_of(&self, id: Uuid) -> StoreResult<Option<JobStatus>> {
        let s: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id.to_string())
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

async fn event(conn: &mut SqliteConnection, id: &str, status: JobStatus) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id, at)
         SELECT id, kind, ?, status, attempt, parent_id, ? FROM jobs WHERE id = ?",
    )
    .bind(status.event_type())
    .bind(now_ms())
    .bind(id)
    .execute(&mut *conn)
    .await?;
    crate::notifier::sqlite::events_bell().notify_one();
    Ok(())
}

async fn outbox(conn: &mut SqliteConnection, id: &str, pool: &str, at: i64) -> StoreResult<()> {
    sqlx::query("INSERT INTO outbox (job_id, pool, available_at) VALUES (?, ?, ?)")
        .bind(id)
        .bind(pool)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn insert_in(conn: &mut SqliteConnection, jobs: &[NewJob]) -> StoreResult<Vec<Inserted>> {
    let mut out = Vec::with_capacity(jobs.len());
    let now = now_ms();
    for j in jobs {
        if let Some(key) = &j.idempotency_key {
            let found: Option<(String, String)> =
                sqlx::query_as("SELECT id, status FROM jobs WHERE idempotency_key = ?")
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
            if let Some((id, status)) = found {
                out.push(Inserted {
                    id: parse_id(&id)?,
                    status: parse_status(&status)?,
                    created: false,
                });
                continue;
            }
        }
        let id = j.id.to_string();
        let run_at = j.run_at.map(to_ms);
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, status, max_attempts, attempt_limit, backoff_base_ms,
               backoff_max_ms, timeout_secs, run_at, next_run_at, idempotency_key, parent_id,
               created_at, updated_at, webhook)
             VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&j.kind)
        .bind(j.payload.to_string())
        .bind(j.max_attempts)
        .bind(j.max_attempts)
        .bind(j.backoff.base_ms as i64)
        .bind(j.backoff.max_ms as i64)
        .bind(j.timeout_secs)
        .bind(run_at)
        .bind(run_at)
        .bind(&j.idempotency_key)
        .bind(j.parent_id.map(|p| p.to_string()))
        .bind(now)
        .bind(now)
        .bind(
            j.webhook
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .context("encoding the job's webhook")?,
        )
        .execute(&mut *conn)
        .await?;
        outbox(conn, &id, &j.kind, run_at.unwrap_or(now)).await?;
        event(conn, &id, JobStatus::Queued).await?;
        out.push(Inserted {
            id: j.id,
            status: JobStatus::Queued,
            created: true,
        });
    }
    Ok(out)
}

fn row_to_job(r: &SqliteRow) -> anyhow::Result<Job> {
    let id: String = r.try_get("id")?;
    let payload: String = r.try_get("payload")?;
    let result: Option<String> = r.try_get("result")?;
    let errors: String = r.try_get("errors")?;
    let parent: Option<String> = r.try_get("parent_id")?;
    Ok(Job {
        id: parse_id(&id)?,
        kind: r.try_get("kind")?,
        payload: serde_json::from_str(&payload)?,
        status: parse_status(r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        attempt_limit: r.try_get("attempt_limit")?,
        backoff: Backoff {
            base_ms: r.try_get::<i64, _>("backoff_base_ms")? as u64,
            max_ms: r.try_get::<i64, _>("backoff_max_ms")? as u64,
        },
        timeout_secs: r.try_get("timeout_secs")?,
        run_at: from_ms(r.try_get("run_at")?),
        idempotency_key: r.try_get("idempotency_key")?,
        result: result.as_deref().map(serde_json::from_str).transpose()?,
        errors: serde_json::from_str(&errors)?,
        parent_id: parent.as_deref().map(parse_id).transpose()?,
        children: vec![],
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        created_at: from_ms(r.try_get("created_at")?).unwrap_or_default(),
        started_at: from_ms(r.try_get("started_at")?),
        finished_at: from_ms(r.try_get("finished_at")?),
        next_run_at: from_ms(r.try_get("next_run_at")?),
        updated_at: from_ms(r.try_get("updated_at")?).unwrap_or_default(),
    })
}

/// Appends one attempt error to the JSON array in `errors`.
async fn push_error(conn: &mut SqliteConnection, id: &str, e: &AttemptError) -> StoreResult<()> {
    let e = serde_json::to_string(e).context("encoding attempt error")?;
    sqlx::query("UPDATE jobs SET errors = json_insert(errors, '$[#]', json(?)) WHERE id = ?")
        .bind(e)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .context("applying SQLite migrations")?;
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

    async fn list_jobs(&self, f: &ListFilter) -> StoreResult<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR kind = ?2)
               AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4",
        )
        .bind(f.status.map(JobStatus::as_str))
        .bind(f.kind.as_deref())
        .bind(f.before.map(|b| b.to_string()))
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row_to_job).collect::<anyhow::Result<_>>()?)
    }

    async fn cancel(&self, id: Uuid) -> StoreResult<CancelOutcome> {
        let sid = id.to_string();
        let mut tx = self.pool.begin().await?;
        let status: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET
               status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
               finished_at = CASE WHEN status = 'running' THEN NULL ELSE ?2 END,
               cancel_requested = 1, updated_at = ?2
             WHERE id = ?1 AND status IN ('queued', 'retrying', 'running') RETURNING status",
        )
        .bind(&sid)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        if status.as_deref() == Some("cancelled") {
            event(&mut tx, &sid, JobStatus::Cancelled).await?;
        }
        tx.commit().await?;
        Ok(match status.as_deref() {
            Some("cancelled") => CancelOutcome::Cancelled,
            Some(_) => CancelOutcome::Requested,
            None => match self.status_of(id).await? {
                Some(s) => CancelOutcome::AlreadyFinished(s),
                None => CancelOutcome::NotFound,
            },
        })
    }

    async fn replay(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        let sid = id.to_string();
        let mut tx = self.pool.begin().await?;
        let kind: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'queued', attempt_limit = attempt + max_attempts,
               finished_at = NULL, next_run_at = NULL, cancel_requested = 0, updated_at = ?2
             WHERE id = ?1 AND status = 'dead' RETURNING kind",
        )
        .bind(&sid)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(kind) = &kind {
            outbox(&mut tx, &sid, kind, now_ms()).await?;
            event(&mut tx, &sid, JobStatus::Queued).await?;
        }
        tx.commit().await?;
        self.dead_letter_outcome(id, kind.is_some()).await
    }

    async fn purge(&self, id: Uuid) -> StoreResult<DeadLetterOutcome> {
        let n = sqlx::query("DELETE FROM jobs WHERE id = ? AND status = 'dead'")
            .bind(id.to_string())
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
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let now = now_ms();
        for id in ids {
            let sid = id.to_string();
            let row = sqlx::query(
                "UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_until = ?2,
                   worker = ?3, started_at = ?4, next_run_at = NULL, updated_at = ?4
                 WHERE id = ?1 AND status IN ('queued', 'retrying')
                   AND (next_run_at IS NULL OR next_run_at <= ?4) AND cancel_requested = 0
                 RETURNING kind, payload, attempt, attempt_limit, timeout_secs, backoff_base_ms,
                           backoff_max_ms, created_at",
            )
            .bind(&sid)
            .bind(now + ms(lease))
            .bind(worker)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(r) = row else { continue };
            event(&mut tx, &sid, JobStatus::Running).await?;
            let payload: String = r.try_get("payload")?;
            out.push(Claimed {
                id: *id,
                kind: r.try_get("kind")?,
                payload: serde_json::from_str(&payload).context("stored payload")?,
                attempt: r.try_get("attempt")?,
                attempt_limit: r.try_get("attempt_limit")?,
                timeout_secs: r.try_get("timeout_secs")?,
                backoff: Backoff {
                    base_ms: r.try_get::<i64, _>("backoff_base_ms")? as u64,
                    max_ms: r.try_get::<i64, _>("backoff_max_ms")? as u64,
                },
                created_at: from_ms(r.try_get("created_at")?).unwrap_or_default(),
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn heartbeat(&self, held: &[(Uuid, i32)], lease: Duration) -> StoreResult<Vec<Held>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let until = now_ms() + ms(lease);
        for (id, attempt) in held {
            let cancel: Option<i64> = sqlx::query_scalar(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND attempt = ? AND status = 'running'
                 RETURNING cancel_requested",
            )
            .bind(until)
            .bind(id.to_string())
            .bind(attempt)
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

    async fn finish(&self, cmds: &[FinishCmd]) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Vec::new();
        let now = now_ms();
        for c in cmds {
            let sid = c.id.to_string();
            let status = c.finish.status();
            let result = match &c.finish {
                Finish::Succeeded { result, .. } => Some(result.to_string()),
                _ => None,
            };
            let next = match &c.finish {
                Finish::Retrying { next_run_at, .. } => Some(to_ms(*next_run_at)),
                _ => None,
            };
            let kind: Option<String> = sqlx::query_scalar(
                "UPDATE jobs SET status = ?3,
                   result = CASE WHEN ?3 = 'succeeded' THEN ?4 ELSE result END,
                   finished_at = CASE WHEN ?3 IN ('succeeded', 'dead', 'cancelled') THEN ?6 END,
                   next_run_at = ?5,
                   attempt_limit = CASE WHEN ?3 = 'queued' THEN attempt_limit + 1 ELSE attempt_limit END,
                   lease_until = NULL, updated_at = ?6
                 WHERE id = ?1 AND attempt = ?2 AND status = 'running' RETURNING kind",
            )
            .bind(&sid)
            .bind(c.attempt)
            .bind(status.as_str())
            .bind(result)
            .bind(next)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(kind) = kind else { continue };
            if let Some(e) = c.finish.error() {
                push_error(&mut tx, &sid, e).await?;
            }
            if matches!(status, JobStatus::Queued | JobStatus::Retrying) {
                outbox(&mut tx, &sid, &kind, next.unwrap_or(now)).await?;
            }
            event(&mut tx, &sid, status).await?;
            if let Finish::Succeeded { children, .. } = &c.finish {
                insert_in(&mut tx, children).await?;
            }
            applied.push(c.id);
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn relay_outbox(&self, limit: i64, publisher: &dyn Publisher) -> StoreResult<usize> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, job_id, pool FROM outbox WHERE available_at <= ? ORDER BY available_at, id LIMIT ?",
        )
        .bind(now_ms())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_pool: HashMap<&str, Vec<Uuid>> = HashMap::new();
        for (_, id, pool) in &rows {
            by_pool
                .entry(pool.as_str())
                .or_default()
                .push(parse_id(id)?);
        }
        // Dev mode runs one relay, so no row lock is needed; rows are deleted
        // only after the publish, so a crash in between re-sends, never loses.
        for (pool, ids) in by_pool {
            publisher.publish(pool, &ids).await?;
        }
        let mut tx = self.pool.begin().await?;
        for (rowid, _, _) in &rows {
            sqlx::query("DELETE FROM outbox WHERE id = ?")
                .bind(rowid)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn rescue_expired(&self, limit: i64) -> StoreResult<usize> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, kind, attempt, attempt_limit, cancel_requested FROM jobs
             WHERE status = 'running' AND lease_until < ? ORDER BY lease_until LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (id, kind, attempt, limit, cancel) in &rows {
            let status = if *cancel != 0 {
                JobStatus::Cancelled
            } else if attempt >= limit {
                JobStatus::Dead
            } else {
                JobStatus::Retrying
            };
            sqlx::query(
                "UPDATE jobs SET status = ?, finished_at = ?, next_run_at = NULL, lease_until = NULL,
                   updated_at = ? WHERE id = ? AND status = 'running' AND attempt = ?",
            )
            .bind(status.as_str())
            .bind(status.is_terminal().then_some(now))
            .bind(now)
            .bind(id)
            .bind(attempt)
            .execute(&mut *tx)
            .await?;
            let error = AttemptError {
                attempt: *attempt as i32,
                class: "retryable".into(),
                message:
                    "lease expired: the worker stopped heartbeating (killed, paused or cut off)"
                        .into(),
                at: Utc::now(),
                retry_at: None,
            };
            push_error(&mut tx, id, &error).await?;
            if status == JobStatus::Retrying {
                outbox(&mut tx, id, kind, now).await?;
            }
            event(&mut tx, id, status).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn published_waiting(&self) -> StoreResult<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, sum(n) FROM (
                SELECT kind, count(*) AS n FROM jobs
                WHERE status IN ('queued', 'retrying') AND cancel_requested = 0 GROUP BY kind
                UNION ALL
                SELECT pool, -count(*) FROM outbox GROUP BY pool
             ) GROUP BY kind",
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
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, kind FROM jobs j WHERE status IN ('queued', 'retrying') AND kind = ?
               AND max(updated_at, coalesce(next_run_at, updated_at)) < ? AND cancel_requested = 0
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id) ORDER BY updated_at LIMIT ?",
        )
        .bind(pool)
        .bind(now - ms(older_than))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (id, kind) in &rows {
            sqlx::query("UPDATE jobs SET updated_at = ? WHERE id = ?")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            outbox(&mut tx, id, kind, now).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
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
            "SELECT status, count(*) FROM jobs WHERE (?1 IS NULL OR id >= ?1) AND (?2 IS NULL OR kind = ?2)
             GROUP BY status",
        )
        .bind(since.map(|s| s.to_string()))
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn job_events(&self, id: Uuid) -> StoreResult<Vec<JobEvent>> {
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
