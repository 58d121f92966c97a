//! Pools on SQLite: the paused flag and the worker processes' last sign of
//! life (see the Postgres store).

use std::time::Duration;

use super::{now_ms, SqliteStore};
use crate::store::{ms, PoolState, StoreResult};

impl SqliteStore {
    pub(super) async fn pause(&self, pool: &str, paused: bool) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO pools (name, paused, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET paused = ?2, updated_at = ?3",
        )
        .bind(pool)
        .bind(paused)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn pool_states(&self, alive: Duration) -> StoreResult<Vec<PoolState>> {
        // SQLite has no FULL JOIN before 3.39; a union of names does it.
        let rows: Vec<(String, bool, i64, i64)> = sqlx::query_as(
            "WITH w AS (
                SELECT pool, count(*) AS n, sum(concurrency) AS c FROM workers
                WHERE seen_at > ?1 GROUP BY pool
             ), names AS (SELECT name FROM pools UNION SELECT pool FROM w)
             SELECT n.name, coalesce(p.paused, 0), coalesce(w.n, 0), coalesce(w.c, 0)
             FROM names n LEFT JOIN pools p ON p.name = n.name LEFT JOIN w ON w.pool = n.name
             ORDER BY n.name",
        )
        .bind(now_ms() - ms(alive))
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workers (name, pool, concurrency, seen_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET seen_at = ?4, concurrency = ?3",
        )
        .bind(worker)
        .bind(pool)
        .bind(concurrency)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let paused: Option<bool> = sqlx::query_scalar("SELECT paused FROM pools WHERE name = ?")
            .bind(pool)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(paused.unwrap_or(false))
    }

    pub(super) async fn gone(&self, worker: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM workers WHERE name = ?")
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
