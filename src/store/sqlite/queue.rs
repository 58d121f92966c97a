//! The embedded queue's table (`queue`, in the dev mode's SQLite file):
//! the SQL behind [`crate::broker::embedded`]. A received message is hidden
//! until `visible_at` instead of deleted, so one whose consumer dies before
//! acking comes back.

use sqlx::SqlitePool;

use super::{json_list, now_ms};

#[derive(Clone)]
pub struct QueueTable {
    pool: SqlitePool,
}

impl QueueTable {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Adds one message per body, visible at once, in one statement (in
    /// the bodies' order, so FIFO within a priority holds).
    pub async fn push(
        &self,
        pool: &str,
        priority: i16,
        bodies: &[String],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO queue (pool, body, visible_at, priority)
             SELECT ?1, value, ?2, ?3 FROM json_each(?4) ORDER BY key",
        )
        .bind(pool)
        .bind(now_ms())
        .bind(priority)
        .bind(json_list(bodies))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn depth(&self, pool: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM queue WHERE pool = ?")
            .bind(pool)
            .fetch_one(&self.pool)
            .await
    }

    /// Up to `max` visible messages of `pool`, highest priority first and
    /// oldest first within one, hidden for
    /// `hide_ms`: (row id, body).
    pub async fn take(
        &self,
        pool: &str,
        max: i64,
        hide_ms: i64,
    ) -> Result<Vec<(i64, String)>, sqlx::Error> {
        let now = now_ms();
        let rows = sqlx::query_as(
            "UPDATE queue SET visible_at = ?, deliveries = deliveries + 1
             WHERE id IN (SELECT id FROM queue WHERE pool = ? AND visible_at <= ?
                          ORDER BY priority DESC, id LIMIT ?)
             RETURNING id, body, priority",
        )
        .bind(now.saturating_add(hide_ms))
        .bind(pool)
        .bind(now)
        .bind(max)
        .fetch_all(&self.pool)
        .await?;
        // RETURNING comes in table order, not the subquery's.
        let mut rows: Vec<(i64, String, i64)> = rows;
        rows.sort_by_key(|(id, _, priority)| (-priority, *id));
        Ok(rows.into_iter().map(|(id, body, _)| (id, body)).collect())
    }

    /// Moves an undecodable message aside (its pool renamed `poison:<pool>`)
    /// instead of redelivering it forever.
    pub async fn quarantine(&self, row: i64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE queue SET pool = 'poison:' || pool WHERE id = ?")
            .bind(row)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete(&self, rows: &[i64]) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM queue WHERE id IN (SELECT value FROM json_each(?))")
            .bind(json_list(rows))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
