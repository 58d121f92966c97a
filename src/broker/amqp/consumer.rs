//! A RabbitMQ consumer: one channel per worker process with prefetch set
//! from the pool's concurrency. When the channel or connection drops, the
//! next receive opens a new one; RabbitMQ redelivers whatever was unacked,
//! and acks meant for the dead channel are dropped (they would be refused
//! on the new one, and the conditional claim makes the redelivery harmless).
//!
//! Acks go out in as few frames as the channel allows: the consumer keeps
//! the tags it handed out and not yet acked, so a batch of finishes that
//! covers the oldest of them is acked with one `multiple` frame (see
//! [`plan`]); the rest are sent together, not one round trip each.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use uuid::Uuid;

use super::{next_generation, unavailable, AmqpBroker};
use crate::broker::{Acker, BrokerError, Consumer, Delivery, Tag};

/// The live channel and what it delivered that is not acked yet.
struct Live {
    generation: u64,
    ch: Channel,
    /// Tags handed to the worker and not acked, ascending. A `multiple` ack
    /// of tag T acks every unacked delivery up to T on the channel, so it
    /// is only safe when all of these up to T are in the batch.
    unacked: BTreeSet<u64>,
}

/// A `std` mutex: it is never held across an await, and the receive path
/// takes it once per batch.
type Current = Arc<std::sync::Mutex<Option<Live>>>;

fn lock(c: &Current) -> std::sync::MutexGuard<'_, Option<Live>> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct AmqpConsumer {
    broker: AmqpBroker,
    pool: String,
    prefetch: u16,
    stream: Option<lapin::Consumer>,
    current: Current,
    /// Held by an acker from planning its frames until they are sent, so
    /// two ack batches never interleave: a `multiple` ack overtaking an
    /// earlier single ack of a tag it covers would make that single ack
    /// unknown to RabbitMQ, which closes the channel for it.
    sending: Arc<tokio::sync::Mutex<()>>,
}

impl AmqpConsumer {
    pub fn new(broker: AmqpBroker, pool: &str, prefetch: usize) -> Self {
        Self {
            broker,
            pool: pool.to_owned(),
            prefetch: u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX),
            stream: None,
            current: Arc::default(),
            sending: Arc::default(),
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
                self.broker.queue(&self.pool).into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        *lock(&self.current) = Some(Live {
            generation: next_generation(),
            ch,
            unacked: BTreeSet::new(),
        });
        self.stream = Some(stream);
        Ok(())
    }

    /// Forgets the channel and closes it: one still open after a failed
    /// reject would hold its unacked messages from every other worker.
    fn reset(&mut self) {
        self.stream = None;
        if let Some(live) = lock(&self.current).take() {
            tokio::spawn(async move {
                let _ = live.ch.close(200, "consumer reset".into()).await;
            });
        }
    }

    /// Turns a message into a delivery, or dead-letters it when its body is
    /// not a job id (it could never be processed; redelivering it forever
    /// would only burn the worker). The reject is sent before this batch
    /// is returned, so no later `multiple` ack can reach RabbitMQ first.
    async fn accept(
        &self,
        d: lapin::message::Delivery,
        out: &mut Vec<(Uuid, u64)>,
    ) -> Result<(), BrokerError> {
        match std::str::from_utf8(&d.data)
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
        {
            Some(job_id) => out.push((job_id, d.delivery_tag)),
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

    /// Records the batch as unacked on its channel and tags it with the
    /// channel's generation.
    fn hand_out(&self, got: Vec<(Uuid, u64)>) -> Vec<Delivery> {
        let mut current = lock(&self.current);
        let Some(live) = current.as_mut() else {
            return Vec::new();
        };
        live.unacked.extend(got.iter().map(|(_, tag)| *tag));
        let generation = live.generation;
        got.into_iter()
            .map(|(job_id, tag)| Delivery {
                job_id,
                tag: Tag(format!("{generation}:{tag}")),
            })
            .collect()
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if self.stream.is_none() {
            if let Err(e) = self.open().await {
                self.reset();
                return Err(e);
            }
        }
        let mut got = Vec::new();
        let first = match self.stream.as_mut() {
            Some(s) => tokio::time::timeout(wait, s.next()).await,
            None => return Ok(Vec::new()),
        };
        let mut next = match first {
            Err(_) => return Ok(Vec::new()),
            Ok(n) => n,
        };
        loop {
            let failed = match next {
                Some(Ok(d)) => self.accept(d, &mut got).await.err(),
                Some(Err(e)) => Some(unavailable(e)),
                // The channel was closed (broker restart, connection drop).
                None => {
                    let out = self.hand_out(got);
                    self.reset();
                    return Ok(out);
                }
            };
            if let Some(e) = failed {
                // What was taken before the failure is still handed out
                // (never dropped: it would stay unacked on a channel that
                // may live on). Its acks are dropped with the channel and
                // RabbitMQ redelivers it, which the claim makes a no-op.
                let out = self.hand_out(got);
                self.reset();
                if out.is_empty() {
                    return Err(e);
                }
                return Ok(out);
            }
            if got.len() >= max {
                break;
            }
            // Take what is already buffered without waiting for more.
            next = match self.stream.as_mut().and_then(|s| s.next().now_or_never()) {
                Some(n) => n,
                None => break,
            };
        }
        Ok(self.hand_out(got))
    }

    fn acker(&self) -> Arc<dyn Acker> {
        Arc::new(AmqpAcker {
            current: self.current.clone(),
            sending: self.sending.clone(),
        })
    }
}

/// One ack frame: the tag, and whether it acks every unacked tag up to it.
type Frame = (u64, bool);

/// The frames that ack `batch` on a channel whose unacked tags are
/// `unacked`, and removes them from it. The run of the oldest unacked tags
/// that the batch covers whole goes as one `multiple` frame; every other
/// tag in the batch goes on its own (a `multiple` frame for it would also
/// ack an older delivery still running). Tags not unacked are skipped: an
/// ack of an unknown tag closes the channel.
fn plan(unacked: &mut BTreeSet<u64>, batch: &BTreeSet<u64>) -> Vec<Frame> {
    let run: Vec<u64> = unacked
        .iter()
        .take_while(|t| batch.contains(t))
        .copied()
        .collect();
    let mut frames = Vec::new();
    if let Some(&end) = run.last() {
        frames.push((end, run.len() > 1));
    }
    for t in &run {
        unacked.remove(t);
    }
    for t in batch {
        if unacked.remove(t) {
            frames.push((*t, false));
        }
    }
    frames
}

struct AmqpAcker {
    current: Current,
    sending: Arc<tokio::sync::Mutex<()>>,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self, tags: &[Tag]) -> Result<(), BrokerError> {
        let _order = self.sending.lock().await;
        let (ch, frames) = {
            let mut current = lock(&self.current);
            let Some(live) = current.as_mut() else {
                return Ok(());
            };
            let batch: BTreeSet<u64> = tags
                .iter()
                .filter_map(|t| {
                    let (g, tag) = t.0.split_once(':')?;
                    // A tag from an earlier channel: that channel is gone
                    // and RabbitMQ has requeued the message already.
                    (g.parse::<u64>().ok() == Some(live.generation))
                        .then(|| tag.parse::<u64>().ok())
                        .flatten()
                })
                .collect();
            (live.ch.clone(), plan(&mut live.unacked, &batch))
        };
        // All frames are queued before any is awaited, so the batch costs
        // one trip through lapin's I/O loop, not one per tag.
        let sends = frames
            .iter()
            .map(|&(tag, multiple)| ch.basic_ack(tag, BasicAckOptions { multiple }));
        futures::future::try_join_all(sends)
            .await
            .map_err(unavailable)?;
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
        if let Some(live) = lock(&self.current).take() {
            handle.spawn(async move {
                let _ = live.ch.close(200, "consumer dropped".into()).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_batch_covering_the_oldest_tags_is_one_multiple_ack() {
        let mut unacked = set(&[1, 2, 3, 4, 5]);
        assert_eq!(plan(&mut unacked, &set(&[1, 2, 3])), vec![(3, true)]);
        assert_eq!(unacked, set(&[4, 5]));
    }

    #[test]
    fn tags_behind_an_older_running_delivery_are_acked_one_by_one() {
        let mut unacked = set(&[1, 2, 3, 4]);
        assert_eq!(
            plan(&mut unacked, &set(&[2, 4])),
            vec![(2, false), (4, false)]
        );
        assert_eq!(unacked, set(&[1, 3]));
    }

    #[test]
    fn a_prefix_then_stragglers_past_a_hole() {
        let mut unacked = set(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            plan(&mut unacked, &set(&[1, 2, 4, 6])),
            vec![(2, true), (4, false), (6, false)]
        );
        assert_eq!(unacked, set(&[3, 5]));
    }

    #[test]
    fn tags_already_acked_or_unknown_are_never_sent_again() {
        let mut unacked = set(&[7, 9]);
        assert_eq!(plan(&mut unacked, &set(&[3, 7, 8])), vec![(7, false)]);
        assert_eq!(plan(&mut unacked, &set(&[7])), vec![]);
        assert_eq!(unacked, set(&[9]));
    }

    #[test]
    fn gaps_left_by_rejected_tags_do_not_break_the_run() {
        // 2 was dead-lettered and never handed out.
        let mut unacked = set(&[1, 3, 4]);
        assert_eq!(plan(&mut unacked, &set(&[1, 3, 4])), vec![(4, true)]);
        assert!(unacked.is_empty());
    }
}
