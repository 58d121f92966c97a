//! Writing the lifecycle on Postgres: inserting jobs, applying batches of
//! the model's transitions in one statement (`unnest` carries the batch,
//! and each row keeps its own `status` and `attempt` condition, so
//! batching never weakens fencing), and deciding under a row lock.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::parse_status;
use crate::model::job::{Backoff, Inserted, NewJob};
use crate::model::lifecycle::{Enqueue, JobState, Transition};
use crate::model::{EventType, JobStatus};
use crate::store::StoreResult;

pub(super) fn row_to_state(r: &PgRow) -> anyhow::Result<JobState> {
    Ok(JobState {
        id: r.try_get("id")?,
        status: parse_status(r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        attempt_limit: r.try_get("attempt_limit")?,
        max_attempts: r.try_get("max_attempts")?,
        backoff: backoff(r)?,
        cancel_requested: r.try_get("cancel_requested")?,
    })
}

pub(super) fn backoff(r: &PgRow) -> Result<Backoff, sqlx::Error> {
    Ok(Backoff {
        base_ms: r.try_get::<i64, _>("backoff_base_ms")? as u64,
        max_ms: r.try_get::<i64, _>("backoff_max_ms")? as u64,
    })
}

pub(super) async fn insert_in(
    conn: &mut PgConnection,
    jobs: &[NewJob],
) -> StoreResult<Vec<Inserted>> {
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
    let tenants: Vec<&str> = jobs.iter().map(|j| j.tenant.as_str()).collect();
    let priorities: Vec<i16> = jobs.iter().map(|j| j.priority).collect();
    let schedules: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| j.scheduled.as_ref().map(|(n, _)| n.as_str()))
        .collect();
    let keys_c: Vec<Option<&str>> = jobs.iter().map(|j| j.concurrency_key.as_deref()).collect();
    let fire_times: Vec<Option<DateTime<Utc>>> = jobs
        .iter()
        .map(|j| j.scheduled.as_ref().map(|(_, at)| *at))
        .collect();
    let hooks: Vec<Option<serde_json::Value>> = jobs
        .iter()
        .map(|j| j.webhook.as_ref().map(serde_json::to_value).transpose())
        .collect::<Result<_, _>>()
        .context("encoding the job's webhook")?;
    let created: Vec<Uuid> = sqlx::query_scalar(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int[], $5::int[],
                                 $6::bigint[], $7::bigint[], $8::timestamptz[], $9::text[], $10::uuid[],
                                 $11::jsonb[], $14::text[], $15::smallint[], $16::text[],
                                 $17::timestamptz[], $18::text[], $19::text[])
              AS t(id, kind, payload, max_attempts, timeout_secs, base_ms, max_ms, run_at, idem, parent_id,
                   webhook, tenant, priority, schedule, scheduled_for, concurrency_key,
                   traceparent)
         ), ins AS (
            INSERT INTO jobs (id, kind, payload, status, max_attempts, attempt_limit, backoff_base_ms,
                              backoff_max_ms, timeout_secs, run_at, next_run_at, idempotency_key, parent_id,
                              webhook, tenant, priority, schedule, scheduled_for, concurrency_key,
                              traceparent)
            SELECT i.id, i.kind, i.payload, $12, i.max_attempts, i.max_attempts, i.base_ms, i.max_ms,
                   i.timeout_secs, i.run_at, i.run_at, i.idem, i.parent_id, i.webhook,
                   coalesce(p.tenant, i.tenant), coalesce(p.priority, i.priority), i.schedule,
                   i.scheduled_for, i.concurrency_key, i.traceparent
            FROM input i LEFT JOIN jobs p ON p.id = i.parent_id
            ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id, kind, status, attempt, next_run_at, parent_id, priority
         ), ob AS (
            INSERT INTO outbox (job_id, pool, available_at, priority)
            SELECT id, kind, coalesce(next_run_at, now()), priority FROM ins
         ), ev AS (
            INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
            SELECT id, kind, $13, status, attempt, parent_id FROM ins
         )
         SELECT id FROM ins",
    )
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
    .bind(JobStatus::Queued.as_str())
    .bind(EventType::Queued.as_str())
    .bind(&tenants)
    .bind(&priorities)
    .bind(&schedules)
    .bind(&fire_times)
    .bind(&keys_c)
    .bind(jobs.iter().map(|j| j.traceparent.as_ref().map(|t| t.as_str())).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;

    let created: HashSet<Uuid> = created.into_iter().collect();
    let (missing_tenants, missing_keys): (Vec<&str>, Vec<&str>) = jobs
        .iter()
        .filter(|j| !created.contains(&j.id))
        .filter_map(|j| Some((j.tenant.as_str(), j.idempotency_key.as_deref()?)))
        .unzip();
    // Conflicting keys: ON CONFLICT waited for the other transaction, so the
    // first job is committed and visible to this next statement.
    let existing: HashMap<(String, String), (Uuid, String)> = if missing_keys.is_empty() {
        HashMap::new()
    } else {
        sqlx::query(
            "SELECT tenant, idempotency_key, id, status FROM jobs
             WHERE (tenant, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        )
        .bind(&missing_tenants)
        .bind(&missing_keys)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            Ok((
                (r.try_get(0)?, r.try_get(1)?),
                (r.try_get(2)?, r.try_get(3)?),
            ))
        })
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
            let key = (
                j.tenant.clone(),
                j.idempotency_key.clone().unwrap_or_default(),
            );
            let (id, status) = existing
                .get(&key)
                .context("job neither inserted nor found by idempotency key")?;
            Ok(Inserted {
                id: *id,
                status: parse_status(status)?,
                created: false,
            })
        })
        .collect()
}

/// Applies `batch` in one statement inside the caller's transaction, then
/// inserts the children of the successes that applied.
pub(super) async fn apply_in(
    conn: &mut PgConnection,
    batch: &[Transition],
) -> StoreResult<Vec<Uuid>> {
    if batch.is_empty() {
        return Ok(vec![]);
    }
    let col = |f: fn(&Transition) -> Option<i32>| batch.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<Uuid> = batch.iter().map(|t| t.id).collect();
    let from: Vec<&str> = batch.iter().map(|t| t.from.as_str()).collect();
    let attempts = col(|t| Some(t.attempt));
    let to: Vec<&str> = batch.iter().map(|t| t.to.as_str()).collect();
    let limits = col(|t| t.attempt_limit);
    let next: Vec<Option<DateTime<Utc>>> = batch.iter().map(|t| t.next_run_at).collect();
    let cancel: Vec<Option<bool>> = batch.iter().map(|t| t.cancel_requested).collect();
    let results: Vec<Option<&serde_json::Value>> =
        batch.iter().map(|t| t.result.as_ref()).collect();
    let errors: Vec<Option<serde_json::Value>> = batch
        .iter()
        .map(|t| t.error.as_ref().map(serde_json::to_value).transpose())
        .collect::<Result<_, _>>()
        .context("encoding attempt error")?;
    let enqueue: Vec<bool> = batch.iter().map(|t| t.enqueue.is_some()).collect();
    let enqueue_at: Vec<Option<DateTime<Utc>>> = batch
        .iter()
        .map(|t| match t.enqueue {
            Some(Enqueue::At(at)) => Some(at),
            _ => None,
        })
        .collect();
    let events: Vec<Option<&str>> = batch
        .iter()
        .map(|t| t.event.map(EventType::as_str))
        .collect();
    let terminal: Vec<bool> = batch.iter().map(|t| t.to.is_terminal()).collect();
    let running: Vec<bool> = batch.iter().map(|t| t.to == JobStatus::Running).collect();
    let applied: Vec<Uuid> = sqlx::query_scalar(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::int[],
                                 $6::timestamptz[], $7::bool[], $8::jsonb[], $9::jsonb[], $10::bool[],
                                 $11::timestamptz[], $12::text[], $13::bool[], $14::bool[])
              AS t(id, from_status, attempt, to_status, attempt_limit, next_run_at, cancel_requested,
                   result, error, enqueue, enqueue_at, event, terminal, running)
         ), upd AS (
            UPDATE jobs j SET
              status = i.to_status,
              attempt_limit = coalesce(i.attempt_limit, j.attempt_limit),
              next_run_at = i.next_run_at,
              cancel_requested = coalesce(i.cancel_requested, j.cancel_requested),
              result = coalesce(i.result, j.result),
              errors = CASE WHEN i.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(i.error) END,
              finished_at = CASE WHEN i.terminal THEN now() END,
              lease_until = CASE WHEN i.running THEN j.lease_until END,
              updated_at = now()
            FROM input i
            WHERE j.id = i.id AND j.status = i.from_status AND j.attempt = i.attempt
            RETURNING j.id, j.kind, j.status, j.attempt, j.parent_id, j.priority, i.enqueue,
                      i.enqueue_at, i.event, j.concurrency_key, i.from_status
         ), ob AS (
            INSERT INTO outbox (job_id, pool, available_at, priority)
            SELECT id, kind, coalesce(enqueue_at, now()), priority FROM upd WHERE enqueue
         ), ev AS (
            INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
            SELECT id, kind, event, status, attempt, parent_id FROM upd WHERE event IS NOT NULL
         ), freed AS (
            -- A keyed job that stopped running makes room on its key: as
            -- many of the most urgent jobs held there go to the relay.
            UPDATE outbox o SET held_key = NULL, available_at = now()
            FROM (SELECT x.id FROM (SELECT concurrency_key AS key, count(*) AS n FROM upd
                                    WHERE from_status = $15 AND status <> $15
                                      AND concurrency_key IS NOT NULL
                                    GROUP BY concurrency_key) r,
                  LATERAL (SELECT id FROM outbox WHERE held_key = r.key
                           ORDER BY priority DESC, id LIMIT r.n FOR UPDATE SKIP LOCKED) x) f
            WHERE o.id = f.id
         )
         SELECT id FROM upd",
    )
    .bind(&ids)
    .bind(&from)
    .bind(&attempts)
    .bind(&to)
    .bind(&limits)
    .bind(&next)
    .bind(&cancel)
    .bind(&results)
    .bind(&errors)
    .bind(&enqueue)
    .bind(&enqueue_at)
    .bind(&events)
    .bind(&terminal)
    .bind(&running)
    .bind(JobStatus::Running.as_str())
    .fetch_all(&mut *conn)
    .await?;
    // Children are submitted in the same transaction as their parent's
    // success, and only if that success was not fenced.
    let mut parents: HashSet<Uuid> = applied.iter().copied().collect();
    let children: Vec<NewJob> = batch
        .iter()
        .filter(|t| parents.remove(&t.id))
        .flat_map(|t| t.children.iter().cloned())
        .collect();
    insert_in(conn, &children).await?;
    Ok(applied)
}
