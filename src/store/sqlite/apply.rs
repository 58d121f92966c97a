//! Writing the lifecycle on SQLite: inserting jobs and applying the
//! model's transitions inside the caller's transaction, a batch in one
//! statement where it can, each row fenced on the status and attempt it was
//! decided from.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use tokio::sync::Notify;
use uuid::Uuid;

use super::claim::release;
use super::{json_list, now_ms, parse_id, parse_status, to_ms};
use crate::model::job::{AttemptError, Backoff, Inserted, NewJob};
use crate::model::lifecycle::{Enqueue, JobState, Transition};
use crate::model::{EventType, JobStatus};
use crate::store::{StoreResult, STATE_COLUMNS};

pub(super) fn row_to_state(r: &SqliteRow) -> anyhow::Result<JobState> {
    Ok(JobState {
        id: parse_id(r.try_get("id")?)?,
        status: parse_status(r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        attempt_limit: r.try_get("attempt_limit")?,
        max_attempts: r.try_get("max_attempts")?,
        backoff: backoff(r)?,
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
    })
}

pub(super) fn backoff(r: &SqliteRow) -> Result<Backoff, sqlx::Error> {
    Ok(Backoff {
        base_ms: r.try_get::<i64, _>("backoff_base_ms")? as u64,
        max_ms: r.try_get::<i64, _>("backoff_max_ms")? as u64,
    })
}

pub(super) async fn state_in(
    conn: &mut SqliteConnection,
    id: Uuid,
) -> StoreResult<Option<JobState>> {
    let row = sqlx::query(&format!("SELECT {STATE_COLUMNS} FROM jobs WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.as_ref().map(row_to_state).transpose()?)
}

/// Appends one event per (job, type), in that order, in one statement.
pub(super) async fn events_of(
    conn: &mut SqliteConnection,
    each: &[(String, &'static str)],
    bell: &Notify,
) -> StoreResult<()> {
    if each.is_empty() {
        return Ok(());
    }
    // CROSS JOIN keeps the list as the outer loop (SQLite does not reorder
    // it), so each row is one primary-key lookup, in the list's order.
    sqlx::query(
        "INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id, at)
         SELECT j.id, j.kind, x.value ->> 1, j.status, j.attempt, j.parent_id, ?2
         FROM json_each(?1) x CROSS JOIN jobs j ON j.id = x.value ->> 0 ORDER BY x.key",
    )
    .bind(json_list(each))
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    bell.notify_one();
    Ok(())
}

/// Appends an event of the one type `event` to each job in `ids`.
pub(super) async fn events(
    conn: &mut SqliteConnection,
    ids: &[String],
    event: EventType,
    bell: &Notify,
) -> StoreResult<()> {
    let each: Vec<(String, &'static str)> =
        ids.iter().map(|id| (id.clone(), event.as_str())).collect();
    events_of(conn, &each, bell).await
}

pub(super) async fn outbox(
    conn: &mut SqliteConnection,
    id: &str,
    pool: &str,
    at: i64,
) -> StoreResult<()> {
    // The row carries the job's priority, so the relay need not read jobs.
    sqlx::query(
        "INSERT INTO outbox (job_id, pool, available_at, priority)
         SELECT ?1, ?2, ?3, priority FROM jobs WHERE id = ?1",
    )
    .bind(id)
    .bind(pool)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn insert_in(
    conn: &mut SqliteConnection,
    jobs: &[NewJob],
    bell: &Notify,
) -> StoreResult<Vec<Inserted>> {
    let mut out = Vec::with_capacity(jobs.len());
    let mut rows = Vec::with_capacity(jobs.len());
    let mut created = Vec::with_capacity(jobs.len());
    // A key named twice in one batch makes one job, as if the second
    // submit came after the first.
    let mut keys_here: HashMap<&str, Uuid> = HashMap::new();
    for j in jobs {
        if let Some(key) = &j.idempotency_key {
            if let Some(first) = keys_here.get(key.as_str()) {
                out.push(Inserted {
                    id: *first,
                    status: JobStatus::Queued,
                    created: false,
                });
                continue;
            }
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
            keys_here.insert(key, j.id);
        }
        let webhook = j
            .webhook
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .context("encoding the job's webhook")?;
        rows.push(serde_json::json!([
            j.id.to_string(),
            j.kind,
            j.payload.to_string(),
            j.max_attempts,
            j.backoff.base_ms,
            j.backoff.max_ms,
            j.timeout_secs,
            j.run_at.map(to_ms),
            j.idempotency_key,
            j.parent_id.map(|p| p.to_string()),
            webhook,
            j.tenant,
            j.priority,
            j.scheduled.as_ref().map(|(n, _)| n.as_str()),
            j.scheduled.as_ref().map(|(_, at)| to_ms(*at)),
            j.concurrency_key,
            j.traceparent.as_ref().map(|t| t.as_str()),
        ]));
        created.push(j.id.to_string());
        out.push(Inserted {
            id: j.id,
            status: JobStatus::Queued,
            created: true,
        });
    }
    if created.is_empty() {
        return Ok(out);
    }
    let now = now_ms();
    // One statement for the batch (see `json_list`). A child takes its
    // parent's tenant and priority, whatever it says.
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, max_attempts, attempt_limit, backoff_base_ms,
           backoff_max_ms, timeout_secs, run_at, next_run_at, idempotency_key, parent_id,
           created_at, updated_at, webhook, tenant, priority, schedule, scheduled_for,
           concurrency_key, traceparent)
         SELECT value ->> 0, value ->> 1, value ->> 2, ?3, value ->> 3, value ->> 3, value ->> 4,
                value ->> 5, value ->> 6, value ->> 7, value ->> 7, value ->> 8, value ->> 9,
                ?2, ?2, value ->> 10,
                coalesce((SELECT tenant FROM jobs p WHERE p.id = x.value ->> 9), value ->> 11),
                coalesce((SELECT priority FROM jobs p WHERE p.id = x.value ->> 9), value ->> 12),
                value ->> 13, value ->> 14, value ->> 15, value ->> 16
         FROM json_each(?1) x ORDER BY x.key",
    )
    .bind(json_list(&rows))
    .bind(now)
    .bind(JobStatus::Queued.as_str())
    .execute(&mut *conn)
    .await?;
    // The rows carry the jobs' priorities, so the relay need not read jobs.
    sqlx::query(
        "INSERT INTO outbox (job_id, pool, available_at, priority)
         SELECT j.id, j.kind, coalesce(j.run_at, ?2), j.priority
         FROM json_each(?1) x CROSS JOIN jobs j ON j.id = x.value ORDER BY x.key",
    )
    .bind(json_list(&created))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    events(conn, &created, EventType::Queued, bell).await?;
    Ok(out)
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

/// Applies `batch` in the caller's transaction, then the children of the
/// successes that applied. Each job moves at most once per batch, as in
/// Postgres' one-statement update: a batch naming a job twice goes row by
/// row and skips a job's later transitions once it has moved.
pub(super) async fn apply_in(
    conn: &mut SqliteConnection,
    batch: &[Transition],
    bell: &Notify,
) -> StoreResult<Vec<Uuid>> {
    let mut ids = HashSet::new();
    if !batch.iter().all(|t| ids.insert(t.id)) {
        return apply_each(conn, batch, bell).await;
    }
    if batch.is_empty() {
        return Ok(vec![]);
    }
    let now = now_ms();
    let input: Vec<serde_json::Value> = batch
        .iter()
        .map(|t| {
            serde_json::json!([
                t.id.to_string(),
                t.from.as_str(),
                t.attempt,
                t.to.as_str(),
                t.attempt_limit,
                t.next_run_at.map(to_ms),
                t.cancel_requested,
                t.result.as_ref().map(ToString::to_string),
                t.to.is_terminal(),
                t.to == JobStatus::Running,
            ])
        })
        .collect();
    // One statement for the whole batch (see `json_list`); RETURNING names
    // only the jobs table, so the transition is found again by id.
    let moved: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "UPDATE jobs SET status = x.to_status,
           attempt_limit = coalesce(x.attempt_limit, jobs.attempt_limit),
           next_run_at = x.next_run_at,
           cancel_requested = coalesce(x.cancel_requested, jobs.cancel_requested),
           result = coalesce(x.result, jobs.result),
           finished_at = CASE WHEN x.terminal THEN ?2 END,
           lease_until = CASE WHEN x.running THEN jobs.lease_until END,
           updated_at = ?2
         FROM (SELECT value ->> 0 AS xid, value ->> 1 AS from_status, value ->> 2 AS attempt,
                      value ->> 3 AS to_status, value ->> 4 AS attempt_limit,
                      value ->> 5 AS next_run_at, value ->> 6 AS cancel_requested,
                      value ->> 7 AS result, value ->> 8 AS terminal, value ->> 9 AS running
               FROM json_each(?1)) AS x
         WHERE jobs.id = x.xid AND jobs.status = x.from_status AND jobs.attempt = x.attempt
         RETURNING id, kind, concurrency_key",
    )
    .bind(json_list(&input))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let moved: HashMap<Uuid, (String, Option<String>)> = moved
        .into_iter()
        .map(|(id, kind, key)| Ok((parse_id(&id)?, (kind, key))))
        .collect::<anyhow::Result<_>>()?;
    let mut applied = Vec::with_capacity(moved.len());
    let mut each_event = Vec::new();
    for t in batch {
        let Some((kind, key)) = moved.get(&t.id) else {
            continue;
        };
        after_move(conn, t, kind, key.clone(), now).await?;
        if let Some(e) = t.event {
            each_event.push((t.id.to_string(), e.as_str()));
        }
        applied.push(t);
    }
    events_of(conn, &each_event, bell).await?;
    for t in &applied {
        insert_in(conn, &t.children, bell).await?;
    }
    Ok(applied.iter().map(|t| t.id).collect())
}

/// What follows a job's move besides its event and children: room on its
/// concurrency key, its error, its outbox row.
async fn after_move(
    conn: &mut SqliteConnection,
    t: &Transition,
    kind: &str,
    key: Option<String>,
    now: i64,
) -> StoreResult<()> {
    let sid = t.id.to_string();
    if let Some(key) = key.filter(|_| t.from == JobStatus::Running && t.to != JobStatus::Running) {
        // Room on its key: the most urgent job held there goes on.
        release(conn, &[(key, 1)]).await?;
    }
    if let Some(e) = &t.error {
        push_error(conn, &sid, e).await?;
    }
    match t.enqueue {
        Some(Enqueue::Now) => outbox(conn, &sid, kind, now).await?,
        Some(Enqueue::At(at)) => outbox(conn, &sid, kind, to_ms(at)).await?,
        None => {}
    }
    Ok(())
}

/// [`apply_in`] row by row, for a batch that names a job more than once.
async fn apply_each(
    conn: &mut SqliteConnection,
    batch: &[Transition],
    bell: &Notify,
) -> StoreResult<Vec<Uuid>> {
    let mut applied = Vec::new();
    let mut moved = HashSet::new();
    let now = now_ms();
    for t in batch {
        if moved.contains(&t.id) {
            continue;
        }
        let sid = t.id.to_string();
        let kind: Option<(String, Option<String>)> = sqlx::query_as(
            "UPDATE jobs SET status = ?4,
               attempt_limit = coalesce(?5, attempt_limit),
               next_run_at = ?6,
               cancel_requested = coalesce(?7, cancel_requested),
               result = coalesce(?8, result),
               finished_at = CASE WHEN ?9 THEN ?11 END,
               lease_until = CASE WHEN ?10 THEN lease_until END,
               updated_at = ?11
             WHERE id = ?1 AND status = ?2 AND attempt = ?3 RETURNING kind, concurrency_key",
        )
        .bind(&sid)
        .bind(t.from.as_str())
        .bind(t.attempt)
        .bind(t.to.as_str())
        .bind(t.attempt_limit)
        .bind(t.next_run_at.map(to_ms))
        .bind(t.cancel_requested)
        .bind(t.result.as_ref().map(|r| r.to_string()))
        .bind(t.to.is_terminal())
        .bind(t.to == JobStatus::Running)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((kind, key)) = kind else { continue };
        after_move(conn, t, &kind, key, now).await?;
        if let Some(e) = t.event {
            events_of(conn, &[(sid, e.as_str())], bell).await?;
        }
        insert_in(conn, &t.children, bell).await?;
        moved.insert(t.id);
        applied.push(t.id);
    }
    Ok(applied)
}
