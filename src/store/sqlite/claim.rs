//! The hot path on SQLite: claiming delivered jobs for one attempt and
//! extending the leases of running ones (see `postgres/claim.rs` for why
//! these are not model transitions).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::Row;
use uuid::Uuid;

use super::apply::{backoff, events};
use super::{from_ms, json_list, now_ms, parse_id, SqliteStore};
use crate::model::concurrency::{self, KeyState};
use crate::model::{EventType, JobStatus};
use crate::store::{ms, sql_list, traceparent, Claimed, Held, StoreResult};

impl SqliteStore {
    pub(super) async fn claim_ids(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> StoreResult<Vec<Claimed>> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let sids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let list = json_list(&sids);
        // Read before the claim clears it: SQLite's RETURNING, and its
        // subqueries, see only the updated row.
        let due: HashMap<String, Option<i64>> = sqlx::query_as(
            "SELECT id, coalesce(next_run_at, updated_at) FROM jobs
             WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let sql = |which: &str| {
            format!(
                "UPDATE jobs SET status = ?5, attempt = attempt + 1, lease_until = ?2,
                   worker = ?3, started_at = ?4, next_run_at = NULL, updated_at = ?4
                 WHERE {which} AND status IN {}
                   AND (next_run_at IS NULL OR next_run_at <= ?4) AND cancel_requested = 0
                   AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = jobs.kind AND p.paused)
                 RETURNING id, kind, payload, attempt, attempt_limit, max_attempts, timeout_secs,
                           backoff_base_ms, backoff_max_ms, created_at, concurrency_key, traceparent",
                sql_list(&JobStatus::CLAIMABLE)
            )
        };
        // Built once per process: the statements are the same every call.
        static SQL: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        let (unkeyed, one) = SQL.get_or_init(|| {
            (
                sql("id IN (SELECT value FROM json_each(?1)) AND concurrency_key IS NULL"),
                sql("id = ?1"),
            )
        });
        let (unkeyed, one) = (unkeyed.as_str(), one.as_str());
        let claim = |sql: &'static str, ids: String| {
            sqlx::query(sql)
                .bind(ids)
                .bind(now + ms(lease))
                .bind(worker.to_owned())
                .bind(now)
                .bind(JobStatus::Running.as_str())
        };
        // Jobs without a key start in one statement; the rest one by one,
        // as their keys admit them.
        let mut rows = claim(unkeyed, list).fetch_all(&mut *tx).await?;
        let mut claimed: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        let mut seen: std::collections::HashSet<String> = claimed.iter().cloned().collect();
        for (id, sid) in ids.iter().zip(&sids) {
            if !seen.insert(sid.clone()) {
                continue;
            }
            // The one writer makes the count the next claim sees exact.
            match admit_keyed(&mut tx, *id, now).await? {
                Some(true) => {
                    if let Some(r) = claim(one, sid.clone()).fetch_optional(&mut *tx).await? {
                        rows.push(r);
                        claimed.push(sid.clone());
                    }
                }
                Some(false) => {}
                None => park_paused(&mut tx, sid, now).await?,
            }
        }
        events(&mut tx, &claimed, EventType::Started, &self.bell).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (r, sid) in rows.iter().zip(&claimed) {
            let payload: String = r.try_get("payload")?;
            out.push(Claimed {
                id: parse_id(sid)?,
                kind: r.try_get("kind")?,
                payload: serde_json::from_str(&payload).context("stored payload")?,
                attempt: r.try_get("attempt")?,
                attempt_limit: r.try_get("attempt_limit")?,
                max_attempts: r.try_get("max_attempts")?,
                timeout_secs: r.try_get("timeout_secs")?,
                backoff: backoff(r)?,
                created_at: from_ms(r.try_get("created_at")?).unwrap_or_default(),
                concurrency_key: r.try_get("concurrency_key")?,
                due_at: from_ms(due.get(sid).copied().flatten()).unwrap_or_default(),
                traceparent: traceparent(r.try_get("traceparent")?),
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn extend_leases(
        &self,
        held: &[(Uuid, i32)],
        lease: Duration,
    ) -> StoreResult<Vec<Held>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let until = now_ms() + ms(lease);
        for (id, attempt) in held {
            let cancel: Option<i64> = sqlx::query_scalar(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND attempt = ? AND status = ?
                 RETURNING cancel_requested",
            )
            .bind(until)
            .bind(id.to_string())
            .bind(attempt)
            .bind(JobStatus::Running.as_str())
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
}

/// A job of a paused pool that a worker received before it knew of the
/// pause goes back to the outbox until the resume (see the Postgres store).
async fn park_paused(tx: &mut sqlx::SqliteConnection, id: &str, now: i64) -> StoreResult<()> {
    sqlx::query(&format!(
        "INSERT INTO outbox (job_id, pool, available_at, priority)
         SELECT j.id, j.kind, min(?2, coalesce(j.next_run_at, j.run_at, j.created_at)), j.priority
         FROM jobs j JOIN pools p ON p.name = j.kind AND p.paused
         WHERE j.id = ?1 AND j.status IN {} AND j.cancel_requested = 0
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
        sql_list(&JobStatus::CLAIMABLE)
    ))
    .bind(id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A keyed job that may start now: `Some(true)` when its key has room,
/// `Some(false)` when it went back to the outbox (held on its key, or
/// delayed by a cool-down), `None` when it is not a keyed job that could
/// start at all.
async fn admit_keyed(
    tx: &mut sqlx::SqliteConnection,
    id: Uuid,
    now: i64,
) -> StoreResult<Option<bool>> {
    let key: Option<String> = sqlx::query_scalar(&format!(
        "SELECT concurrency_key FROM jobs
         WHERE id = ?1 AND concurrency_key IS NOT NULL AND status IN {}
           AND (next_run_at IS NULL OR next_run_at <= ?2) AND cancel_requested = 0
           AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = jobs.kind AND p.paused)",
        sql_list(&JobStatus::CLAIMABLE)
    ))
    .bind(id.to_string())
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(key) = key else {
        return Ok(None);
    };
    let states = key_states(tx, &[key.as_str()]).await?;
    let decided = concurrency::admit(&[(id, key)], &states, chrono::Utc::now());
    if !decided.start.is_empty() {
        return Ok(Some(true));
    }
    let (held, at) = match (decided.hold.first(), decided.delay.first()) {
        (Some((_, k)), _) => (Some(k.clone()), now),
        (None, Some((_, until))) => (None, until.timestamp_millis()),
        (None, None) => return Ok(Some(false)),
    };
    sqlx::query(
        "INSERT INTO outbox (job_id, pool, available_at, priority, held_key)
         SELECT j.id, j.kind, ?2, j.priority, ?3 FROM jobs j
         WHERE j.id = ?1 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
    )
    .bind(id.to_string())
    .bind(at)
    .bind(held)
    .execute(&mut *tx)
    .await?;
    Ok(Some(false))
}

/// Each key's limit, running jobs and cool-down (see the Postgres store).
pub(super) async fn key_states(
    tx: &mut sqlx::SqliteConnection,
    keys: &[&str],
) -> StoreResult<HashMap<String, KeyState>> {
    let limits: Vec<(String, i32)> =
        sqlx::query_as("SELECT prefix, max_running FROM concurrency_limits")
            .fetch_all(&mut *tx)
            .await?;
    let mut out = HashMap::new();
    for key in keys {
        let (running, until): (i64, Option<i64>) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM jobs WHERE concurrency_key = ?1 AND status = '{}'),
                    (SELECT until FROM concurrency_cooldowns WHERE key = ?1)",
            JobStatus::Running.as_str()
        ))
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        out.insert(
            (*key).to_owned(),
            KeyState {
                limit: concurrency::limit_for(key, &limits),
                running,
                cool_until: from_ms(until),
            },
        );
    }
    Ok(out)
}

/// Lets go up to `n` of the most urgent jobs held on each key.
pub(super) async fn release(
    tx: &mut sqlx::SqliteConnection,
    keys: &[(String, i64)],
) -> StoreResult<u64> {
    let mut total = 0;
    for (key, n) in keys {
        total += sqlx::query(
            "UPDATE outbox SET held_key = NULL, available_at = ?3 WHERE id IN (
                SELECT id FROM outbox WHERE held_key = ?1 ORDER BY priority DESC, id LIMIT ?2)",
        )
        .bind(key)
        .bind(n)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    Ok(total)
}
