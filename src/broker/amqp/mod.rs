//! RabbitMQ broker on lapin: durable queues (quorum queues as an option),
//! persistent messages published with confirms, manual acks after the
//! state is committed, prefetch from the pool's concurrency, and a
//! dead-letter exchange for messages that cannot be decoded. The connection
//! is re-opened with backoff by whoever next needs it after it drops.
//!
//! lapin 4 is used directly (not apalis-amqp, which publishes without
//! confirms and nacks failed jobs away), on its tokio runtime feature and
//! without its automatic recovery: we reopen channels ourselves, so a
//! dropped channel always gets a new generation that acks are checked
//! against.
//!
//! Priorities: classic queues are declared with `x-max-priority` and each
//! message carries one of five bands (see [`band`]), so a backlog on the
//! broker is handed out most urgent first. A queue declared by an older
//! version without the argument is used as it is (with a warning): its
//! order is then the relay's. Quorum queues on RabbitMQ 3 have no
//! priorities.
//!
//! Throughput comes from never waiting on RabbitMQ once per message: a
//! relay batch is handed to lapin whole and its confirms awaited after
//! (see `publish_bodies`), and acks are coalesced (see `consumer`).

mod consumer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{Broker, BrokerError, Consumer};

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub url: String,
    /// Prefix of every queue and exchange name, so deployments and tests
    /// can share a server.
    pub prefix: String,
    /// Quorum queues replicate across a cluster; classic durable otherwise.
    pub quorum: bool,
    /// The CA to trust for an `amqps://` URL ([`crate::connect::amqp_tls`]);
    /// the default trusts the system's CAs.
    pub tls: OwnedTLSConfig,
}

/// RabbitMQ refused to redeclare a queue because it has no priorities.
fn lacks_priorities(e: &lapin::Error) -> bool {
    let m = e.to_string();
    m.contains("PRECONDITION_FAILED") && m.contains("x-max-priority")
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Channel generations: a delivery tag is only meaningful on the channel
/// that delivered it, so tags carry the generation of their channel.
static GENERATION: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

struct Link {
    conn: Connection,
    publish: Channel,
    /// Queues declared on this connection.
    declared: HashSet<String>,
}

#[derive(Clone)]
pub struct AmqpBroker {
    cfg: AmqpConfig,
    link: Arc<Mutex<Option<Link>>>,
    /// Pools whose queue exists without `x-max-priority`: redeclaring it
    /// with the argument would be refused, so it is declared without.
    unranked: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// The bands RabbitMQ orders messages in (it keeps one internal queue per
/// level, so few): below 0, 0, 1 to 10, 11 to 50, above 50.
pub const MAX_BAND: u8 = 4;

/// A job priority's band.
pub fn band(priority: i16) -> u8 {
    match priority {
        ..=-1 => 0,
        0 => 1,
        1..=10 => 2,
        11..=50 => 3,
        _ => MAX_BAND,
    }
}

impl AmqpBroker {
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, BrokerError> {
        let b = Self {
            cfg,
            link: Arc::default(),
            unranked: Arc::default(),
        };
        // Fail fast on a wrong URL; later drops reconnect lazily.
        b.with_link(|_| Ok(())).await?;
        Ok(b)
    }

    pub fn queue(&self, pool: &str) -> String {
        format!("{}.{pool}", self.cfg.prefix)
    }

    pub fn poison_queue(&self, pool: &str) -> String {
        format!("{}.{pool}.poison", self.cfg.prefix)
    }

    fn dlx(&self) -> String {
        format!("{}.dlx", self.cfg.prefix)
    }

    async fn open(&self) -> Result<Link, BrokerError> {
        let props = ConnectionProperties::default();
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            crate::connect::amqp_connect(&self.cfg.url, &self.cfg.tls, props),
        )
        .await
        .map_err(|_| unavailable("connecting to RabbitMQ timed out"))?
        .map_err(unavailable)?;
        let publish = conn.create_channel().await.map_err(unavailable)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        tracing::info!(prefix = %self.cfg.prefix, "Connected to RabbitMQ.");
        Ok(Link {
            conn,
            publish,
            declared: HashSet::new(),
        })
    }

    /// Runs `f` on a live link, opening one if there is none or the last
    /// one dropped. A failure inside `f` drops the link so the next call
    /// starts clean.
    async fn with_link<T>(
        &self,
        f: impl FnOnce(&mut Link) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let mut guard = self.link.lock().await;
        let alive = guard
            .as_ref()
            .is_some_and(|l| l.conn.status().connected() && l.publish.status().connected());
        if !alive {
            *guard = Some(self.open().await?);
        }
        let link = guard.as_mut().ok_or_else(|| unavailable("no link"))?;
        f(link)
    }

    /// A fresh channel on the shared connection, for a consumer.
    pub(crate) async fn channel(&self) -> Result<Channel, BrokerError> {
        let conn_ch = {
            let mut guard = self.link.lock().await;
            let alive = guard.as_ref().is_some_and(|l| l.conn.status().connected());
            if !alive {
                *guard = Some(self.open().await?);
            }
            match guard.as_ref() {
                Some(l) => l.conn.create_channel().await,
                None => return Err(unavailable("no link")),
            }
        };
        conn_ch.map_err(unavailable)
    }

    /// Declares the pool's queue with its dead-letter route (idempotent).
    pub(crate) async fn declare(&self, ch: &Channel, pool: &str) -> Result<(), BrokerError> {
        let dlx = self.dlx();
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
        let poison = self.poison_queue(pool);
        ch.queue_declare(poison.as_str().into(), durable, FieldTable::default())
            .await
            .map_err(unavailable)?;
        ch.queue_bind(
            poison.into(),
            dlx.as_str().into(),
            pool.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(pool.into()),
        );
        let unranked = self
            .unranked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(pool);
        if self.cfg.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        } else if !unranked {
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(MAX_BAND));
        }
        match ch
            .queue_declare(self.queue(pool).into(), durable, args)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if !unranked && !self.cfg.quorum && lacks_priorities(&e) => {
                tracing::warn!(
                    queue = %self.queue(pool),
                    "The queue exists without priorities; using it as it is. Delete it while \
                     the pool is paused (Postgres re-sends its jobs) to get them."
                );
                self.unranked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pool.to_owned());
                // The refusal closed the channel; the caller opens another.
                Err(unavailable(e))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn publish_bodies(
        &self,
        pool: &str,
        priority: i16,
        bodies: Vec<Vec<u8>>,
    ) -> Result<(), BrokerError> {
        let (ch, declared) = self
            .with_link(|l| Ok((l.publish.clone(), l.declared.contains(pool))))
            .await?;
        let res = async {
            if !declared {
                self.declare(&ch, pool).await?;
                self.with_link(|l| {
                    l.declared.insert(pool.to_owned());
                    Ok(())
                })
                .await?;
            }
            let queue = ShortString::from(self.queue(pool));
            // Every message is queued in lapin before any send is awaited:
            // awaiting each send in turn cost one trip through lapin's I/O
            // thread per message, and capped the relay at a few thousand
            // messages a second.
            let sends = bodies.iter().map(|body| {
                // delivery_mode 2: persistent, so a broker restart keeps it.
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_priority(band(priority));
                ch.basic_publish(
                    "".into(),
                    queue.clone(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
            });
            let confirms = futures::future::try_join_all(sends)
                .await
                .map_err(unavailable)?;
            // The outbox row is deleted only after this returns, so wait
            // for the broker to confirm every message, not just the send.
            // They are all in flight already; RabbitMQ confirms them in
            // `multiple` frames, so these waits mostly find them done.
            for c in confirms {
                match c.await.map_err(unavailable)? {
                    Confirmation::Ack(_) => {}
                    other => {
                        return Err(BrokerError::Other(format!(
                            "publish not confirmed: {other:?}"
                        )))
                    }
                }
            }
            Ok(())
        }
        .await;
        if res.is_err() {
            *self.link.lock().await = None;
        }
        res
    }

    /// Publishes a raw body (tests of poison handling).
    pub async fn publish_raw(&self, pool: &str, body: &str) -> Result<(), BrokerError> {
        self.publish_bodies(pool, 0, vec![body.as_bytes().to_vec()])
            .await
    }

    /// Messages dead-lettered as undecodable for `pool`.
    pub async fn poison_depth(&self, pool: &str) -> Result<u64, BrokerError> {
        self.count(&self.poison_queue(pool)).await
    }

    async fn count(&self, queue: &str) -> Result<u64, BrokerError> {
        let ch = self.channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "done".into()).await;
        match q {
            Ok(q) => Ok(u64::from(q.message_count())),
            // A queue that does not exist yet holds nothing.
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(_)) => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn name(&self) -> &'static str {
        "amqp"
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.with_link(|_| Ok(())).await
    }

    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> Result<(), BrokerError> {
        let bodies = ids.iter().map(|id| id.to_string().into_bytes()).collect();
        self.publish_bodies(pool, priority, bodies).await
    }

    async fn depth(&self, pool: &str) -> Result<u64, BrokerError> {
        // Ready messages only: unacked ones belong to running jobs, which
        // the dispatcher does not count as waiting either.
        self.count(&self.queue(pool)).await
    }

    async fn consumer(
        &self,
        pool: &str,
        _consumer: &str,
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(consumer::AmqpConsumer::new(
            self.clone(),
            pool,
            prefetch,
        )))
    }
}
