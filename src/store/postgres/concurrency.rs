//! Concurrency limits and cool-downs on Postgres (tables
//! `concurrency_limits`, `concurrency_cooldowns`), and the safety net that
//! lets held jobs go when their key has room. The claim and the release an
//! ending job makes are in `claim.rs` and `apply.rs`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::claim::running_counts;
use super::PgStore;
use crate::model::concurrency::{self, KeyState};
use crate::model::JobStatus;
use crate::store::{LimitState, StoreResult, HELD_KEYS_PER_ROUND};

impl PgStore {
    pub(super) async fn set_limit(&self, prefix: &str, max: Option<i32>) -> StoreResult<bool> {
        let existed = match max {
            Some(max) => {
                sqlx::query_scalar(
                    "INSERT INTO concurrency_limits (prefix, max_running) VALUES ($1, $2)
                 ON CONFLICT (prefix) DO UPDATE SET max_running = $2, updated_at = now()
                 RETURNING xmax <> 0",
                )
                .bind(prefix)
                .bind(max)
                .fetch_one(&self.pool)
                .await?
            }
            None => {
                sqlx::query("DELETE FROM concurrency_limits WHERE prefix = $1")
                    .bind(prefix)
                    .execute(&self.pool)
                    .await?
                    .rows_affected()
                    > 0
            }
        };
        // A raised or removed limit lets held jobs go now rather than at
        // the dispatcher's next round.
        self.release_all_held().await?;
        Ok(existed)
    }

    pub(super) async fn limit_states(&self) -> StoreResult<Vec<LimitState>> {
        let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(&format!(
            "SELECT l.prefix, l.max_running,
                    (SELECT count(*) FROM jobs j WHERE j.status = '{}'
                       AND j.concurrency_key IS NOT NULL AND starts_with(j.concurrency_key, l.prefix)),
                    (SELECT count(*) FROM outbox o
                      WHERE o.held_key IS NOT NULL AND starts_with(o.held_key, l.prefix))
             FROM concurrency_limits l ORDER BY l.prefix",
            JobStatus::Running.as_str()
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(LimitState::from).collect())
    }

    pub(super) async fn cool(&self, key: &str, until: DateTime<Utc>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO concurrency_cooldowns (key, until) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET until = greatest(concurrency_cooldowns.until, $2)",
        )
        .bind(key)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn release_all_held(&self) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM concurrency_cooldowns WHERE until < now()")
            .execute(&mut *tx)
            .await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT held_key FROM outbox WHERE held_key IS NOT NULL LIMIT $1",
        )
        .bind(HELD_KEYS_PER_ROUND)
        .fetch_all(&mut *tx)
        .await?;
        if keys.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let states = key_states(&mut tx, &names).await?;
        let n = release(&mut tx, &concurrency::release_plan(states, Utc::now())).await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// Each key's limit, running jobs and cool-down, as the safety net's
/// release decides from them.
async fn key_states(
    conn: &mut PgConnection,
    keys: &[&str],
) -> StoreResult<HashMap<String, KeyState>> {
    let limits: Vec<(String, i32)> =
        sqlx::query_as("SELECT prefix, max_running FROM concurrency_limits")
            .fetch_all(&mut *conn)
            .await?;
    let cooling: HashMap<String, DateTime<Utc>> =
        sqlx::query_as("SELECT key, until FROM concurrency_cooldowns WHERE key = ANY($1)")
            .bind(keys)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    let running = running_counts(conn, keys).await?;
    Ok(keys
        .iter()
        .map(|key| {
            let state = KeyState {
                limit: concurrency::limit_for(key, &limits),
                running: running.get(*key).copied().unwrap_or(0),
                cool_until: cooling.get(*key).copied(),
            };
            ((*key).to_owned(), state)
        })
        .collect())
}

/// Lets go up to `n` of the most urgent jobs held on each key: they go to
/// the relay now. Answers how many went.
async fn release(conn: &mut PgConnection, keys: &[(String, i64)]) -> StoreResult<u64> {
    if keys.is_empty() {
        return Ok(0);
    }
    let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    let counts: Vec<i64> = keys.iter().map(|(_, n)| *n).collect();
    let n = sqlx::query(
        "UPDATE outbox o SET held_key = NULL, available_at = now()
         FROM (SELECT x.id FROM unnest($1::text[], $2::bigint[]) AS r(key, n),
               LATERAL (SELECT id FROM outbox WHERE held_key = r.key
                        ORDER BY priority DESC, id LIMIT r.n FOR UPDATE SKIP LOCKED) x) s
         WHERE o.id = s.id",
    )
    .bind(&names)
    .bind(&counts)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n)
}
