//! Concurrency limits and cool-downs on SQLite (see the Postgres store).

use chrono::{DateTime, Utc};

use super::claim::{key_states, release};
use super::{now_ms, SqliteStore};
use crate::model::concurrency;
use crate::model::JobStatus;
use crate::store::{LimitState, StoreResult, HELD_KEYS_PER_ROUND};

impl SqliteStore {
    pub(super) async fn set_limit(&self, prefix: &str, max: Option<i32>) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let existed: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM concurrency_limits WHERE prefix = ?1")
                .bind(prefix)
                .fetch_optional(&mut *tx)
                .await?;
        match max {
            Some(max) => {
                sqlx::query(
                    "INSERT INTO concurrency_limits (prefix, max_running, updated_at)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (prefix) DO UPDATE SET max_running = ?2, updated_at = ?3",
                )
                .bind(prefix)
                .bind(max)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM concurrency_limits WHERE prefix = ?1")
                    .bind(prefix)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        self.release_all_held().await?;
        Ok(existed.is_some())
    }

    pub(super) async fn limit_states(&self) -> StoreResult<Vec<LimitState>> {
        // substr() rather than LIKE: a prefix may hold `%` or `_`.
        let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(&format!(
            "SELECT l.prefix, l.max_running,
                    (SELECT count(*) FROM jobs j WHERE j.status = '{}'
                       AND substr(j.concurrency_key, 1, length(l.prefix)) = l.prefix),
                    (SELECT count(*) FROM outbox o
                      WHERE substr(o.held_key, 1, length(l.prefix)) = l.prefix)
             FROM concurrency_limits l ORDER BY l.prefix",
            JobStatus::Running.as_str()
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(LimitState::from).collect())
    }

    pub(super) async fn cool(&self, key: &str, until: DateTime<Utc>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO concurrency_cooldowns (key, until) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET until = max(until, ?2)",
        )
        .bind(key)
        .bind(until.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn release_all_held(&self) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM concurrency_cooldowns WHERE until < ?1")
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT held_key FROM outbox WHERE held_key IS NOT NULL LIMIT ?1",
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
