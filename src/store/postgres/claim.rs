//! The hot path on Postgres: claiming delivered jobs for one attempt and
//! extending the leases of running ones. Kept as SQL of their own (not
//! model transitions) because they run per delivered batch and need the
//! database's clock for leases; the statuses they use are the model's.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::apply::backoff;
use super::PgStore;
use crate::model::concurrency::{self, Admission, KeyState};
use crate::model::{EventType, JobStatus};
use crate::store::{ms, sql_list, traceparent, Claimed, Held, StoreResult};

/// The claim itself: one attempt for each of `$1` that may start, with its
/// `job.started` event. `extra` narrows it (the fast path leaves keyed
/// jobs to [`PgStore::claim_keyed`]).
fn claim_sql(extra: &str) -> String {
    format!(
        "WITH c AS (
            UPDATE jobs SET status = $4, attempt = attempt + 1,
              lease_until = now() + $3 * interval '1 millisecond', worker = $2,
              started_at = now(), next_run_at = NULL, updated_at = now()
            WHERE id = ANY($1) AND status IN {} {extra}
              AND (next_run_at IS NULL OR next_run_at <= now()) AND NOT cancel_requested
              AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = jobs.kind AND p.paused)
            RETURNING id, kind, payload, status, attempt, attempt_limit, max_attempts, timeout_secs,
                      backoff_base_ms, backoff_max_ms, created_at, parent_id, concurrency_key,
                      traceparent,
                      -- The row as it was: a statement's subqueries do not see its own update.
                      (SELECT coalesce(o.next_run_at, o.updated_at) FROM jobs o WHERE o.id = jobs.id) AS due_at
         ), ev AS (
            INSERT INTO job_events (job_id, kind, type, status, attempt, parent_id)
            SELECT id, kind, $5, status, attempt, parent_id FROM c
         )
         SELECT * FROM c",
        sql_list(&JobStatus::CLAIMABLE)
    )
}

async fn claim_in(
    conn: &mut PgConnection,
    sql: &str,
    ids: &[Uuid],
    worker: &str,
    lease: Duration,
) -> StoreResult<Vec<Claimed>> {
    let rows = sqlx::query(sql)
        .bind(ids)
        .bind(worker)
        .bind(ms(lease) as f64)
        .bind(JobStatus::Running.as_str())
        .bind(EventType::Started.as_str())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Claimed {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                payload: r.try_get("payload")?,
                attempt: r.try_get("attempt")?,
                attempt_limit: r.try_get("attempt_limit")?,
                max_attempts: r.try_get("max_attempts")?,
                timeout_secs: r.try_get("timeout_secs")?,
                backoff: backoff(r)?,
                created_at: r.try_get("created_at")?,
                concurrency_key: r.try_get("concurrency_key")?,
                due_at: r.try_get("due_at")?,
                traceparent: traceparent(r.try_get("traceparent")?),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

impl PgStore {
    pub(super) async fn claim_ids(
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
        // Keys no limit names and no cool-down holds start like unkeyed
        // jobs; the rest go through `claim_keyed`.
        let sql = claim_sql(
            "AND (concurrency_key IS NULL
                  OR (NOT EXISTS (SELECT 1 FROM concurrency_limits l
                                  WHERE starts_with(jobs.concurrency_key, l.prefix))
                      AND NOT EXISTS (SELECT 1 FROM concurrency_cooldowns c
                                      WHERE c.key = jobs.concurrency_key AND c.until > now())))",
        );
        let mut claimed =
            claim_in(&mut *self.pool.acquire().await?, &sql, &ids, worker, lease).await?;
        if claimed.len() < ids.len() {
            let rest: Vec<Uuid> = ids
                .iter()
                .filter(|id| !claimed.iter().any(|c| c.id == **id))
                .copied()
                .collect();
            claimed.extend(self.claim_keyed(&rest, worker, lease).await?);
            if claimed.len() < ids.len() {
                self.park_paused(&ids).await?;
            }
        }
        Ok(claimed)
    }

    /// Keyed jobs: under a lock per key (so claims on every worker count
    /// the same running jobs), start what each key's limit has room for and
    /// park the rest in the outbox, held on the key or delayed to the end
    /// of its cool-down ([`concurrency::admit`] decides).
    async fn claim_keyed(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> StoreResult<Vec<Claimed>> {
        let mut tx = self.pool.begin().await?;
        // Each job's key with its cool-down, if one holds: the common case
        // (keys without a limit) needs nothing more than this and the
        // limits before its claim.
        let rows: Vec<(Uuid, String, Option<DateTime<Utc>>)> = sqlx::query_as(&format!(
            "SELECT j.id, j.concurrency_key, c.until FROM jobs j
             LEFT JOIN concurrency_cooldowns c ON c.key = j.concurrency_key
             WHERE j.id = ANY($1) AND j.concurrency_key IS NOT NULL AND j.status IN {}
               AND (j.next_run_at IS NULL OR j.next_run_at <= now()) AND NOT j.cancel_requested
               AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = j.kind AND p.paused)
             ORDER BY j.priority DESC, j.id",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(vec![]);
        }
        let limits: Vec<(String, i32)> =
            sqlx::query_as("SELECT prefix, max_running FROM concurrency_limits")
                .fetch_all(&mut *tx)
                .await?;
        let mut states: HashMap<String, KeyState> = HashMap::new();
        for (_, key, until) in &rows {
            states.entry(key.clone()).or_insert_with(|| KeyState {
                limit: concurrency::limit_for(key, &limits),
                running: 0,
                cool_until: *until,
            });
        }
        // Only keys with a limit are counted, under a lock each, taken in
        // key order (unnest keeps the array's) so two claims cannot
        // deadlock: claims on every worker then count the same running jobs.
        let mut limited: Vec<&str> = states
            .iter()
            .filter(|(_, s)| s.limit.is_some())
            .map(|(k, _)| k.as_str())
            .collect();
        limited.sort_unstable();
        if !limited.is_empty() {
            sqlx::query(
                "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 1706)))
                 FROM unnest($1::text[]) AS k",
            )
            .bind(&limited)
            .execute(&mut *tx)
            .await?;
            let counts = running_counts(&mut tx, &limited).await?;
            for (key, n) in counts {
                if let Some(s) = states.get_mut(&key) {
                    s.running = n;
                }
            }
        }
        let cands: Vec<(Uuid, String)> = rows.into_iter().map(|(id, k, _)| (id, k)).collect();
        let now = chrono::Utc::now();
        let decided = concurrency::admit(&cands, &states, now);
        let claimed = claim_in(&mut tx, &claim_sql(""), &decided.start, worker, lease).await?;
        park(&mut tx, &decided).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Jobs of a paused pool that a worker received before it knew of the
    /// pause go back to the outbox, where they wait for the resume behind
    /// nothing of lower priority and in their first place among their own
    /// (due when they were first due); the worker then acks their messages.
    async fn park_paused(&self, ids: &[Uuid]) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO outbox (job_id, pool, priority, available_at)
             SELECT j.id, j.kind, j.priority, coalesce(j.next_run_at, j.run_at, j.created_at) FROM jobs j JOIN pools p ON p.name = j.kind AND p.paused
             WHERE j.id = ANY($1) AND j.status IN {} AND NOT j.cancel_requested
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
            sql_list(&JobStatus::CLAIMABLE)
        ))
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn extend_leases(
        &self,
        held: &[(Uuid, i32)],
        lease: Duration,
    ) -> StoreResult<Vec<Held>> {
        if held.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
        let attempts: Vec<i32> = held.iter().map(|h| h.1).collect();
        let rows = sqlx::query(
            "UPDATE jobs j SET lease_until = now() + $3 * interval '1 millisecond'
             FROM unnest($1::uuid[], $2::int[]) AS h(id, attempt)
             WHERE j.id = h.id AND j.attempt = h.attempt AND j.status = $4
             RETURNING j.id, j.cancel_requested",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(ms(lease) as f64)
        .bind(JobStatus::Running.as_str())
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
}

/// Jobs of each key running now (over the partial index of keyed running
/// jobs, so at most each key's limit is read).
pub(super) async fn running_counts(
    conn: &mut PgConnection,
    keys: &[&str],
) -> StoreResult<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT concurrency_key, count(*) FROM jobs
         WHERE concurrency_key = ANY($1) AND status = '{}' GROUP BY concurrency_key",
        JobStatus::Running.as_str()
    ))
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Puts what [`concurrency::admit`] did not start back in the outbox: held
/// on its key, or due when its key's cool-down ends. The worker then acks
/// their messages.
async fn park(conn: &mut PgConnection, a: &Admission) -> StoreResult<()> {
    if a.hold.is_empty() && a.delay.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = a
        .hold
        .iter()
        .map(|(id, _)| *id)
        .chain(a.delay.iter().map(|(id, _)| *id))
        .collect();
    let held: Vec<Option<&str>> = a
        .hold
        .iter()
        .map(|(_, k)| Some(k.as_str()))
        .chain(a.delay.iter().map(|_| None))
        .collect();
    let at: Vec<Option<DateTime<Utc>>> = a
        .hold
        .iter()
        .map(|_| None)
        .chain(a.delay.iter().map(|(_, u)| Some(*u)))
        .collect();
    sqlx::query(
        "INSERT INTO outbox (job_id, pool, priority, available_at, held_key)
         SELECT j.id, j.kind, j.priority, coalesce(p.at, now()), p.held
         FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS p(id, held, at)
         JOIN jobs j ON j.id = p.id
         WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
    )
    .bind(&ids)
    .bind(&held)
    .bind(&at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
