//! Redis broker on Streams with one consumer group per pool: XADD to publish,
//! XREADGROUP (blocking) to receive, XACK + XDEL after the state is
//! committed, XAUTOCLAIM to take over entries a dead consumer left pending.
//! A Redis that restarted empty has lost its groups: receiving recreates the
//! group, and the dispatcher re-sends the lost ids from Postgres.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Client, RedisError, Value};
use uuid::Uuid;

use super::{Acker, Broker, BrokerError, Consumer, Delivery, Tag};

const GROUP: &str = "stevedore";
const FIELD: &str = "job";

#[derive(Clone)]
pub struct RedisBroker {
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    /// Pending entries idle this long belong to a consumer presumed dead.
    claim_idle: Duration,
}

fn err(e: RedisError) -> BrokerError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Other(e.to_string())
    }
}

impl RedisBroker {
    /// Connects with `client`, built by [`crate::connect::redis_client`]
    /// (which holds the URL and its TLS settings).
    pub async fn connect(
        client: Client,
        prefix: &str,
        claim_idle: Duration,
    ) -> Result<Self, BrokerError> {
        // The manager reconnects by itself; its timeouts keep a stalled
        // network from hanging a publish forever (the outbox row stays and
        // is retried).
        let conn = crate::connect::redis_manager(client.clone())
            .await
            .map_err(err)?;
        Ok(Self {
            client,
            conn,
            prefix: prefix.to_owned(),
            claim_idle,
        })
    }

    pub fn stream_key(&self, pool: &str) -> String {
        format!("{}:stream:{pool}", self.prefix)
    }

    pub fn poison_key(&self, pool: &str) -> String {
        format!("{}:poison:{pool}", self.prefix)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await.map_err(err)?;
        Ok(())
    }

    async fn publish(&self, pool: &str, ids: &[Uuid]) -> Result<(), BrokerError> {
        let key = self.stream_key(pool);
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.xadd(&key, "*", &[(FIELD, id.to_string())]).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }

    async fn depth(&self, pool: &str) -> Result<u64, BrokerError> {
        // Acked entries are deleted, so the stream's length is exactly what
        // is waiting or delivered-unacked; a stream Redis forgot has length 0.
        let mut c = self.conn.clone();
        c.xlen(self.stream_key(pool)).await.map_err(err)
    }

    async fn consumer(
        &self,
        pool: &str,
        consumer: &str,
        _prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(RedisConsumer {
            broker: self.clone(),
            reader: None,
            stream: self.stream_key(pool),
            poison: self.poison_key(pool),
            name: consumer.to_owned(),
            last_autoclaim: None,
        }))
    }
}

struct RedisConsumer {
    broker: RedisBroker,
    /// A dedicated connection: a blocking XREADGROUP would hold up every
    /// other command multiplexed on a shared one.
    reader: Option<MultiplexedConnection>,
    stream: String,
    poison: String,
    name: String,
    last_autoclaim: Option<tokio::time::Instant>,
}

impl RedisConsumer {
    async fn reader(&mut self, wait: Duration) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(r) = &self.reader {
            return Ok(r.clone());
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(3))
            .set_response_timeout(wait + Duration::from_secs(5));
        let r = self
            .broker
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(err)?;
        self.reader = Some(r.clone());
        Ok(r)
    }

    async fn ensure_group(&self) -> Result<(), BrokerError> {
        let mut c = self.broker.conn.clone();
        let res: Result<(), RedisError> = c.xgroup_create_mkstream(&self.stream, GROUP, "0").await;
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Splits entries into deliveries and poison: an entry whose body is not
    /// a job id can never be processed, so it is copied to the poison stream
    /// and acked instead of being redelivered forever.
    async fn sort(
        &mut self,
        entries: Vec<(String, Option<String>)>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let mut out = Vec::with_capacity(entries.len());
        let mut poison = Vec::new();
        for (id, body) in entries {
            match body.as_deref().map(Uuid::parse_str) {
                Some(Ok(job_id)) => out.push(Delivery {
                    job_id,
                    tag: Tag(id),
                }),
                _ => poison.push((id, body.unwrap_or_default())),
            }
        }
        if !poison.is_empty() {
            let mut pipe = redis::pipe();
            for (id, body) in &poison {
                tracing::warn!(entry = %id, stream = %self.stream, "Undecodable message dead-lettered.");
                pipe.xadd(
                    &self.poison,
                    "*",
                    &[("entry", id.as_str()), ("body", body.as_str())],
                )
                .ignore();
                pipe.xack(&self.stream, GROUP, &[id]).ignore();
                pipe.xdel(&self.stream, &[id]).ignore();
            }
            let mut c = self.broker.conn.clone();
            pipe.query_async::<()>(&mut c).await.map_err(err)?;
            crate::metrics::POISON.inc_by(poison.len() as u64);
        }
        Ok(out)
    }

    async fn autoclaim(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let due = self
            .last_autoclaim
            .is_none_or(|t| t.elapsed() >= self.broker.claim_idle / 2);
        if !due {
            return Ok(vec![]);
        }
        self.last_autoclaim = Some(tokio::time::Instant::now());
        let mut c = self.broker.conn.clone();
        let idle = u64::try_from(self.broker.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(&self.name)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let entries = reply
            .claimed
            .into_iter()
            .map(|e| {
                let body = e.get::<String>(FIELD);
                (e.id, body)
            })
            .collect();
        self.sort(entries).await
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let max = max.max(1);
        match self.autoclaim(max).await {
            Ok(d) if !d.is_empty() => return Ok(d),
            Ok(_) => {}
            Err(BrokerError::Other(m)) if m.contains("NOGROUP") => self.ensure_group().await?,
            Err(e) => return Err(e),
        }
        let mut r = self.reader(wait).await?;
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(max)
            .block(
                usize::try_from(wait.as_millis())
                    .unwrap_or(usize::MAX)
                    .max(1),
            );
        let reply: Result<Option<StreamReadReply>, RedisError> =
            r.xread_options(&[&self.stream], &[">"], &opts).await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                // Redis lost the group (restarted empty, or first use).
                self.ensure_group().await?;
                return Ok(vec![]);
            }
            Err(e) => {
                self.reader = None;
                return Err(err(e));
            }
        };
        let entries: Vec<(String, Option<String>)> = reply
            .map(|r| r.keys)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|e| {
                let body = match e.map.get(FIELD) {
                    Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                    _ => None,
                };
                (e.id, body)
            })
            .collect();
        self.sort(entries).await
    }

    fn acker(&self) -> Arc<dyn Acker> {
        Arc::new(RedisAcker {
            conn: self.broker.conn.clone(),
            stream: self.stream.clone(),
        })
    }
}

struct RedisAcker {
    conn: ConnectionManager,
    stream: String,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self, tags: &[Tag]) -> Result<(), BrokerError> {
        if tags.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = tags.iter().map(|t| t.0.as_str()).collect();
        // XDEL as well: acked entries would otherwise stay in the stream
        // forever and the stream would grow with every job.
        let mut pipe = redis::pipe();
        pipe.xack(&self.stream, GROUP, &ids).ignore();
        pipe.xdel(&self.stream, &ids).ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }
}
