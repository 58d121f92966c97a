//! The embedded broker of `stevedore dev`: a `queue` table in the same SQLite
//! file. Receiving hides a message for a visibility timeout instead of
//! deleting it, so a consumer that dies before acking gets it redelivered,
//! as with a real broker. A `Notify` wakes consumers in the same process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Acker, Broker, BrokerError, Consumer, Delivery, Tag};
use crate::store::sqlite::now_ms;

#[derive(Clone)]
pub struct EmbeddedBroker {
    pool: SqlitePool,
    notify: Arc<Notify>,
    visibility: Duration,
}

fn err(e: sqlx::Error) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl EmbeddedBroker {
    /// `visibility`: how long a received, unacked message stays hidden before
    /// it is delivered again.
    pub fn new(pool: SqlitePool, visibility: Duration) -> Self {
        Self {
            pool,
            notify: Arc::new(Notify::new()),
            visibility,
        }
    }

    /// Writes a raw body, bypassing id encoding (tests of poison handling).
    pub async fn publish_raw(&self, pool: &str, body: &str) -> Result<(), BrokerError> {
        sqlx::query("INSERT INTO queue (pool, body, visible_at) VALUES (?, ?, ?)")
            .bind(pool)
            .bind(body)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(err)?;
        self.notify.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn publish(&self, pool: &str, ids: &[Uuid]) -> Result<(), BrokerError> {
        let mut tx = self.pool.begin().await.map_err(err)?;
        let now = now_ms();
        for id in ids {
            sqlx::query("INSERT INTO queue (pool, body, visible_at) VALUES (?, ?, ?)")
                .bind(pool)
                .bind(id.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn depth(&self, pool: &str) -> Result<u64, BrokerError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM queue WHERE pool = ?")
            .bind(pool)
            .fetch_one(&self.pool)
            .await
            .map_err(err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn consumer(
        &self,
        pool: &str,
        _consumer: &str,
        _prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(EmbeddedConsumer {
            broker: self.clone(),
            pool: pool.to_owned(),
        }))
    }
}

struct EmbeddedConsumer {
    broker: EmbeddedBroker,
    pool: String,
}

impl EmbeddedConsumer {
    async fn take(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let now = now_ms();
        let hide = now + i64::try_from(self.broker.visibility.as_millis()).unwrap_or(i64::MAX / 2);
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "UPDATE queue SET visible_at = ?, deliveries = deliveries + 1
             WHERE id IN (SELECT id FROM queue WHERE pool = ? AND visible_at <= ? ORDER BY id LIMIT ?)
             RETURNING id, body",
        )
        .bind(hide)
        .bind(&self.pool)
        .bind(now)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.broker.pool)
        .await
        .map_err(err)?;
        let mut out = Vec::with_capacity(rows.len());
        for (rowid, body) in rows {
            match Uuid::parse_str(&body) {
                Ok(job_id) => out.push(Delivery {
                    job_id,
                    tag: Tag(rowid.to_string()),
                }),
                Err(_) => {
                    // Poison: kept aside (pool renamed) instead of being
                    // redelivered forever.
                    tracing::warn!(rowid, pool = %self.pool, "Undecodable message dead-lettered.");
                    sqlx::query("UPDATE queue SET pool = 'poison:' || pool WHERE id = ?")
                        .bind(rowid)
                        .execute(&self.broker.pool)
                        .await
                        .map_err(err)?;
                    crate::metrics::POISON.inc();
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register before looking, so a publish between the look and the
            // wait is not missed.
            let notified = self.broker.notify.notified();
            let got = self.take(max.max(1)).await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(vec![]);
            }
            // Poll at least every 200 ms: hidden messages become visible again
            // without anyone publishing.
            let nap = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    fn acker(&self) -> Arc<dyn Acker> {
        Arc::new(self.broker.clone())
    }
}

#[async_trait]
impl Acker for EmbeddedBroker {
    async fn ack(&self, tags: &[Tag]) -> Result<(), BrokerError> {
        let mut tx = self.pool.begin().await.map_err(err)?;
        for t in tags {
            sqlx::query("DELETE FROM queue WHERE id = ?")
                .bind(t.0.parse::<i64>().unwrap_or(-1))
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }
}
