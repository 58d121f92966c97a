//! Concurrency limits and cool-downs on Postgres (tables
//! `concurrency_limits`, `concurrency_cooldowns`), and the safety net that
//! lets held jobs go when their key has room. The claim and the release an
//! ending job makes are in `claim.rs` and `apply.rs`.

use chrono::{DateTime, Utc};

use super::claim::{key_states, release};
use super::PgStore;
use crate::model::concurrency;
use crate::model::JobStatus;
use crate::store::{LimitState, StoreResult};

/// Keys one safety-net round looks at.
const KEYS_PER_ROUND: i64 = 1000;

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
        .bind(KEYS_PER_ROUND)
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
