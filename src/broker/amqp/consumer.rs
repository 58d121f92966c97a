//! A RabbitMQ consumer: one channel per worker process with prefetch set
//! from the pool's concurrency. When the channel or connection drops, the
//! next receive opens a new one; RabbitMQ redelivers whatever was unacked,
//! and acks meant for the dead channel are dropped (they would be refused
//! on the new one, and the conditional claim makes the redelivery harmless).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{next_generation, unavailable, AmqpBroker};
use crate::broker::{Acker, BrokerError, Consumer, Delivery, Tag};

type Current = Arc<Mutex<Option<(u64, Channel)>>>;

pub struct AmqpConsumer {
    broker: AmqpBroker,
    pool: String,
    prefetch: u16,
    stream: Option<lapin::Consumer>,
    current: Current,
}

impl AmqpConsumer {
    pub fn new(broker: AmqpBroker, pool: &str, prefetch: usize) -> Self {
        Self {
            broker,
            pool: pool.to_owned(),
            prefetch: u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX),
            stream: None,
            current: Arc::default(),
        }
    }

    async fn open(&mut self) -> Result<(), BrokerError> {
        let ch = self.broker.channel().await?;
        // The broker sends at most `prefetch` unacked messages, so a
        // worker never holds more than it can run.
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
        self.broker.declare(&ch, &self.pool).await?;
        let stream = ch
            .basic_consume(
                &self.broker.queue(&self.pool),
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        *self.current.lock().await = Some((next_generation(), ch));
        self.stream = Some(stream);
        Ok(())
    }

    async fn reset(&mut self) {
        self.stream = None;
        *self.current.lock().await = None;
    }

    /// Turns a message into a delivery, or dead-letters it when its body is
    /// not a job id (it could never be processed; redelivering it forever
    /// would only burn the worker).
    async fn accept(
        &self,
        d: lapin::message::Delivery,
        out: &mut Vec<Delivery>,
    ) -> Result<(), BrokerError> {
        let generation = self
            .current
            .lock()
            .await
            .as_ref()
            .map(|c| c.0)
            .unwrap_or_default();
        match std::str::from_utf8(&d.data)
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
        {
            Some(job_id) => out.push(Delivery {
                job_id,
                tag: Tag(format!("{generation}:{}", d.delivery_tag)),
            }),
            None => {
                tracing::warn!(pool = %self.pool, "Undecodable message dead-lettered.");
                d.reject(BasicRejectOptions { requeue: false })
                    .await
                    .map_err(unavailable)?;
                crate::metrics::POISON.inc();
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if self.stream.is_none() {
            if let Err(e) = self.open().await {
                self.reset().await;
                return Err(e);
            }
        }
        let mut out = Vec::new();
        let first = match self.stream.as_mut() {
            Some(s) => tokio::time::timeout(wait, s.next()).await,
            None => return Ok(out),
        };
        let mut next = match first {
            Err(_) => return Ok(out),
            Ok(n) => n,
        };
        loop {
            match next {
                Some(Ok(d)) => self.accept(d, &mut out).await?,
                Some(Err(e)) => {
                    self.reset().await;
                    if out.is_empty() {
                        return Err(unavailable(e));
                    }
                    return Ok(out);
                }
                // The channel was closed (broker restart, connection drop).
                None => {
                    self.reset().await;
                    return Ok(out);
                }
            }
            if out.len() >= max {
                return Ok(out);
            }
            // Take what is already buffered without waiting for more.
            next = match self.stream.as_mut().and_then(|s| s.next().now_or_never()) {
                Some(n) => n,
                None => return Ok(out),
            };
        }
    }

    fn acker(&self) -> Arc<dyn Acker> {
        Arc::new(AmqpAcker {
            current: self.current.clone(),
        })
    }
}

struct AmqpAcker {
    current: Current,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self, tags: &[Tag]) -> Result<(), BrokerError> {
        let guard = self.current.lock().await;
        let Some((generation, ch)) = guard.as_ref() else {
            return Ok(());
        };
        for t in tags {
            let Some((g, tag)) = t.0.split_once(':') else {
                continue;
            };
            // A tag from an earlier channel: that channel is gone and
            // RabbitMQ has requeued the message already.
            if g.parse::<u64>().ok() != Some(*generation) {
                continue;
            }
            let Ok(tag) = tag.parse::<u64>() else {
                continue;
            };
            ch.basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

impl Drop for AmqpConsumer {
    /// A consumer that goes away closes its channel, so RabbitMQ requeues
    /// what it held unacked at once instead of when the connection dies.
    fn drop(&mut self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Ok(mut current) = self.current.try_lock() {
            if let Some((_, ch)) = current.take() {
                handle.spawn(async move {
                    let _ = ch.close(200, "consumer dropped").await;
                });
            }
        }
    }
}
