//! Pools on Postgres: the paused flag (table `pools`) and the worker
//! processes' last sign of life (table `workers`).

use std::time::Duration;

use super::PgStore;
use crate::store::{ms, PoolState, StoreResult};

impl PgStore {
    pub(super) async fn pause(&self, pool: &str, paused: bool) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO pools (name, paused) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET paused = $2, updated_at = now()",
        )
        .bind(pool)
        .bind(paused)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn pool_states(&self, alive: Duration) -> StoreResult<Vec<PoolState>> {
        let rows: Vec<(String, bool, i64, i64)> = sqlx::query_as(
            "WITH w AS (
                SELECT pool, count(*)::bigint AS n, sum(concurrency)::bigint AS c FROM workers
                WHERE seen_at > now() - $1 * interval '1 millisecond' GROUP BY pool
             )
             SELECT coalesce(p.name, w.pool), coalesce(p.paused, false),
                    coalesce(w.n, 0), coalesce(w.c, 0)
             FROM pools p FULL JOIN w ON w.pool = p.name ORDER BY 1",
        )
        .bind(ms(alive) as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(PoolState::from).collect())
    }

    pub(super) async fn seen(
        &self,
        pool: &str,
        worker: &str,
        concurrency: i32,
    ) -> StoreResult<bool> {
        let paused: Option<bool> = sqlx::query_scalar(
            "WITH w AS (
                INSERT INTO workers (name, pool, concurrency) VALUES ($1, $2, $3)
                ON CONFLICT (name) DO UPDATE SET seen_at = now(), concurrency = $3
             )
             SELECT paused FROM pools WHERE name = $2",
        )
        .bind(worker)
        .bind(pool)
        .bind(concurrency)
        .fetch_optional(&self.pool)
        .await?;
        Ok(paused.unwrap_or(false))
    }

    pub(super) async fn gone(&self, worker: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM workers WHERE name = $1")
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
