//! Brokers carry job ids from the dispatcher to workers. They are the fast
//! path only: a lost or duplicated message is repaired by the dispatcher and
//! made harmless by the conditional claim, so nothing here needs to be
//! exactly-once. `redis` (Streams + consumer groups) is production;
//! `embedded` is the SQLite-backed queue of `stevedore dev`.

pub mod amqp;
pub mod embedded;
pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::store::Publisher;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker error: {0}")]
    Other(String),
}

/// Opaque handle that acknowledges one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(pub String);

#[derive(Debug, Clone)]
pub struct Delivery {
    pub job_id: Uuid,
    pub tag: Tag,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn ping(&self) -> Result<(), BrokerError>;
    /// `ids` all have `priority` (-100..=100). The embedded queue hands
    /// higher ones out first; Redis and RabbitMQ keep publish order, which
    /// the relay makes most urgent first.
    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> Result<(), BrokerError>;
    /// Messages the broker holds for `pool` and has not had acked (waiting
    /// or delivered-unacked). The dispatcher compares it with the jobs
    /// Postgres says are waiting, to tell a lost message from a long queue.
    async fn depth(&self, pool: &str) -> Result<u64, BrokerError>;
    /// A consumer for one worker process of `pool`; `consumer` names it so a
    /// restarted process can be told apart from a dead one. `prefetch` is the
    /// most the broker should hand it unacked (the pool's concurrency).
    async fn consumer(
        &self,
        pool: &str,
        consumer: &str,
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError>;
}

#[async_trait]
pub trait Consumer: Send {
    /// Up to `max` deliveries, waiting at most `wait` for the first one.
    /// Undecodable messages are dead-lettered by the broker, never returned.
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError>;
    /// A handle that acks from other tasks while `receive` blocks.
    fn acker(&self) -> Arc<dyn Acker>;
}

#[async_trait]
pub trait Acker: Send + Sync {
    /// Called only after the job's new state is committed.
    async fn ack(&self, tags: &[Tag]) -> Result<(), BrokerError>;
}

/// Routes each pool to its broker; the store publishes through it.
#[derive(Clone)]
pub struct Brokers {
    default: Arc<dyn Broker>,
    by_pool: HashMap<String, Arc<dyn Broker>>,
}

impl Brokers {
    pub fn new(default: Arc<dyn Broker>) -> Self {
        Self {
            default,
            by_pool: HashMap::new(),
        }
    }

    pub fn with_pool(mut self, pool: &str, broker: Arc<dyn Broker>) -> Self {
        self.by_pool.insert(pool.to_owned(), broker);
        self
    }

    pub fn for_pool(&self, pool: &str) -> &Arc<dyn Broker> {
        self.by_pool.get(pool).unwrap_or(&self.default)
    }

    /// Every distinct broker in use, for readiness checks.
    pub fn all(&self) -> Vec<Arc<dyn Broker>> {
        let mut out = vec![self.default.clone()];
        for b in self.by_pool.values() {
            if !out.iter().any(|o| Arc::ptr_eq(o, b)) {
                out.push(b.clone());
            }
        }
        out
    }
}

#[async_trait]
impl Publisher for Brokers {
    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> anyhow::Result<()> {
        let broker = self.for_pool(pool);
        let res = broker.publish(pool, priority, ids).await;
        crate::metrics::broker_publish(broker.name(), ids.len(), res.is_ok());
        Ok(res?)
    }
}
