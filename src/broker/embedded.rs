//! The embedded broker of `stevedore dev`: a queue table in the same SQLite
//! file ([`QueueTable`] holds its SQL). Receiving hides a message for a
//! visibility timeout instead of deleting it, so a consumer that dies before
//! acking gets it redelivered, as with a real broker. A `Notify` wakes
//! consumers in the same process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Acker, Broker, BrokerError, Consumer, Delivery, Tag};
use crate::store::sqlite::queue::QueueTable;

#[derive(Clone)]
pub struct EmbeddedBroker {
    table: QueueTable,
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
            table: QueueTable::new(pool),
            notify: Arc::new(Notify::new()),
            visibility,
        }
    }

    /// Writes a raw body, bypassing id encoding (tests of poison handling).
    pub async fn publish_raw(&self, pool: &str, body: &str) -> Result<(), BrokerError> {
        self.table
            .push(pool, 0, &[body.to_owned()])
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
        self.table.ping().await.map_err(err)
    }

    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> Result<(), BrokerError> {
        let bodies: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        self.table
            .push(pool, priority, &bodies)
            .await
            .map_err(err)?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn depth(&self, pool: &str) -> Result<u64, BrokerError> {
        let n = self.table.depth(pool).await.map_err(err)?;
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
        let hide = i64::try_from(self.broker.visibility.as_millis()).unwrap_or(i64::MAX / 2);
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = self
            .broker
            .table
            .take(&self.pool, max, hide)
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
                    self.broker.table.quarantine(rowid).await.map_err(err)?;
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
        // Our own tags are row ids; anything else matches no row.
        let rows: Vec<i64> = tags.iter().map(|t| t.0.parse().unwrap_or(-1)).collect();
        self.table.delete(&rows).await.map_err(err)
    }
}
