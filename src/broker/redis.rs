//! Redis broker on Streams with one consumer group per stream: XADD to
//! publish, XREADGROUP to receive, XACK + XDEL after the state is committed,
//! XAUTOCLAIM to take over entries a dead consumer left pending. A Redis
//! that restarted empty has lost its groups: receiving recreates them, and
//! the dispatcher re-sends the lost ids from Postgres.
//!
//! Priorities: priority 0 goes to the pool's stream, any other to a stream
//! of its own (`<stream>:p<N>`), and a sorted set lists the priorities in
//! use. One script reads the streams most urgent first, so a backlog on the
//! broker is handed out in priority order too; only when every stream is
//! empty does a consumer block, on all of them at once.

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

/// Reads up to ARGV[3] new entries, most urgent stream first, creating a
/// group Redis lost. KEYS[1]: the pool's stream (priority 0); KEYS[2]: its
/// sorted set of other priorities. Answers the streams in priority order
/// and, flat, (stream, entry id, body) of each entry read.
const TAKE: &str = r#"
local base, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local want = tonumber(ARGV[3])
local streams, placed = {}, false
for _, p in ipairs(redis.call('ZREVRANGEBYSCORE', KEYS[2], '+inf', '-inf')) do
  if not placed and tonumber(p) < 0 then table.insert(streams, base); placed = true end
  table.insert(streams, base .. ':p' .. p)
end
if not placed then table.insert(streams, base) end
local out = {}
for _, s in ipairs(streams) do
  if want <= 0 then break end
  local res = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', s, '>')
  if type(res) == 'table' and res.err then
    if string.find(res.err, 'NOGROUP') then
      redis.call('XGROUP', 'CREATE', s, group, '0', 'MKSTREAM')
      res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', s, '>')
    else
      return redis.error_reply(res.err)
    end
  end
  if res then
    for _, e in ipairs(res[1][2]) do
      local body = ''
      for i = 1, #e[2], 2 do if e[2][i] == ARGV[4] then body = e[2][i + 1] end end
      table.insert(out, s); table.insert(out, e[1]); table.insert(out, body)
      want = want - 1
    end
  end
end
return {streams, out}
"#;

/// Entries waiting or delivered-unacked over every priority's stream.
const DEPTH: &str = r#"
local n = redis.call('XLEN', KEYS[1])
for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  n = n + redis.call('XLEN', KEYS[1] .. ':p' .. p)
end
return n
"#;

/// A tag names its entry, and its stream when that is not priority 0's:
/// `<stream>|<entry id>`.
fn tag(base: &str, stream: &str, id: String) -> Tag {
    if stream == base {
        Tag(id)
    } else {
        Tag(format!("{stream}|{id}"))
    }
}

fn untag<'a>(base: &'a str, t: &'a Tag) -> (&'a str, &'a str) {
    t.0.split_once('|').unwrap_or((base, t.0.as_str()))
}

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

    /// The stream of `pool`'s priority-0 messages.
    pub fn stream_key(&self, pool: &str) -> String {
        format!("{}:stream:{pool}", self.prefix)
    }

    fn stream_for(&self, pool: &str, priority: i16) -> String {
        let base = self.stream_key(pool);
        if priority == 0 {
            base
        } else {
            format!("{base}:p{priority}")
        }
    }

    /// The sorted set of the priorities other than 0 that `pool` has used.
    pub fn priorities_key(&self, pool: &str) -> String {
        format!("{}:priorities:{pool}", self.prefix)
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

    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> Result<(), BrokerError> {
        let key = self.stream_for(pool, priority);
        let mut pipe = redis::pipe();
        if priority != 0 {
            // Listed before the entries are added, so a reader never misses
            // a stream that has entries.
            pipe.zadd(self.priorities_key(pool), priority, priority)
                .ignore();
        }
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
        redis::Script::new(DEPTH)
            .key(self.stream_key(pool))
            .key(self.priorities_key(pool))
            .invoke_async(&mut c)
            .await
            .map_err(err)
    }

    async fn consumer(
        &self,
        pool: &str,
        consumer: &str,
        _prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let stream = self.stream_key(pool);
        Ok(Box::new(RedisConsumer {
            broker: self.clone(),
            reader: None,
            streams: vec![stream.clone()],
            stream,
            priorities: self.priorities_key(pool),
            poison: self.poison_key(pool),
            name: consumer.to_owned(),
            last_autoclaim: None,
            spill: std::collections::VecDeque::new(),
        }))
    }
}

struct RedisConsumer {
    broker: RedisBroker,
    /// A dedicated connection: a blocking XREADGROUP would hold up every
    /// other command multiplexed on a shared one.
    reader: Option<MultiplexedConnection>,
    /// The priority-0 stream; the others are named after it.
    stream: String,
    /// Every stream of the pool, most urgent first, as last read.
    streams: Vec<String>,
    priorities: String,
    poison: String,
    name: String,
    last_autoclaim: Option<tokio::time::Instant>,
    /// Deliveries a blocking read returned beyond what was asked for; they
    /// are this consumer's pending entries, handed out first next time.
    spill: std::collections::VecDeque<Delivery>,
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

    async fn ensure_group(&self, stream: &str) -> Result<(), BrokerError> {
        let mut c = self.broker.conn.clone();
        let res: Result<(), RedisError> = c.xgroup_create_mkstream(stream, GROUP, "0").await;
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
        entries: Vec<(String, String, Option<String>)>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let mut out = Vec::with_capacity(entries.len());
        let mut poison = Vec::new();
        for (stream, id, body) in entries {
            match body.as_deref().map(Uuid::parse_str) {
                Some(Ok(job_id)) => out.push(Delivery {
                    job_id,
                    tag: tag(&self.stream, &stream, id),
                }),
                _ => poison.push((stream, id, body.unwrap_or_default())),
            }
        }
        if !poison.is_empty() {
            let mut pipe = redis::pipe();
            for (stream, id, body) in &poison {
                tracing::warn!(entry = %id, stream = %stream, "Undecodable message dead-lettered.");
                pipe.xadd(
                    &self.poison,
                    "*",
                    &[("entry", id.as_str()), ("body", body.as_str())],
                )
                .ignore();
                pipe.xack(stream, GROUP, &[id]).ignore();
                pipe.xdel(stream, &[id]).ignore();
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
        let mut entries = Vec::new();
        for stream in &self.streams {
            let reply: Result<StreamAutoClaimReply, RedisError> = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(GROUP)
                .arg(&self.name)
                .arg(idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(max - entries.len())
                .query_async(&mut c)
                .await;
            let reply = match reply {
                Ok(r) => r,
                // The take script recreates lost groups.
                Err(e) if e.code() == Some("NOGROUP") => continue,
                Err(e) => return Err(err(e)),
            };
            entries.extend(reply.claimed.into_iter().map(|e| {
                let body = e.get::<String>(FIELD);
                (stream.clone(), e.id, body)
            }));
            if entries.len() >= max {
                break;
            }
        }
        self.sort(entries).await
    }

    /// New entries, most urgent stream first, without blocking.
    async fn take(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let mut c = self.broker.conn.clone();
        let (streams, flat): (Vec<String>, Vec<String>) = redis::Script::new(TAKE)
            .key(&self.stream)
            .key(&self.priorities)
            .arg(GROUP)
            .arg(&self.name)
            .arg(max)
            .arg(FIELD)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        self.streams = streams;
        let entries = flat
            .chunks_exact(3)
            .map(|e| {
                let body = Some(e[2].clone()).filter(|b| !b.is_empty());
                (e[0].clone(), e[1].clone(), body)
            })
            .collect();
        self.sort(entries).await
    }

    /// Waits up to `wait` for an entry on any of the pool's streams. With
    /// one stream it reads up to `max`; with several, one per stream (a
    /// higher one may be empty now and fill before the next read), most
    /// urgent first, keeping any beyond `max` for the next call.
    async fn wait_for_any(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let mut r = self.reader(wait).await?;
        let count = if self.streams.len() == 1 { max } else { 1 };
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(count)
            .block(
                usize::try_from(wait.as_millis())
                    .unwrap_or(usize::MAX)
                    .max(1),
            );
        let ids: Vec<&str> = self.streams.iter().map(|_| ">").collect();
        let reply: Result<Option<StreamReadReply>, RedisError> =
            r.xread_options(&self.streams, &ids, &opts).await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                // Redis lost a group (restarted empty, or first use).
                for s in self.streams.clone() {
                    self.ensure_group(&s).await?;
                }
                return Ok(vec![]);
            }
            Err(e) => {
                self.reader = None;
                return Err(err(e));
            }
        };
        let mut keys = reply.map(|r| r.keys).unwrap_or_default();
        let rank = |k: &str| self.streams.iter().position(|s| s == k);
        keys.sort_by_key(|k| rank(&k.key));
        let entries: Vec<(String, String, Option<String>)> = keys
            .into_iter()
            .flat_map(|k| {
                let stream = k.key;
                k.ids.into_iter().map(move |e| {
                    let body = match e.map.get(FIELD) {
                        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                        _ => None,
                    };
                    (stream.clone(), e.id, body)
                })
            })
            .collect();
        let mut got = self.sort(entries).await?;
        if got.len() > max {
            self.spill.extend(got.split_off(max));
        }
        Ok(got)
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let max = max.max(1);
        if !self.spill.is_empty() {
            let n = max.min(self.spill.len());
            return Ok(self.spill.drain(..n).collect());
        }
        let claimed = self.autoclaim(max).await?;
        if !claimed.is_empty() {
            return Ok(claimed);
        }
        // The script runs on the shared connection; the blocking reader is
        // only wait_for_any's, which drops it when it fails.
        let taken = self.take(max).await?;
        if !taken.is_empty() {
            return Ok(taken);
        }
        self.wait_for_any(max, wait).await
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
    /// The priority-0 stream, which untagged entries belong to.
    stream: String,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self, tags: &[Tag]) -> Result<(), BrokerError> {
        if tags.is_empty() {
            return Ok(());
        }
        let mut by_stream: std::collections::HashMap<&str, Vec<&str>> = Default::default();
        for t in tags {
            let (stream, id) = untag(&self.stream, t);
            by_stream.entry(stream).or_default().push(id);
        }
        // XDEL as well: acked entries would otherwise stay in the stream
        // forever and the stream would grow with every job.
        let mut pipe = redis::pipe();
        for (stream, ids) in &by_stream {
            pipe.xack(*stream, GROUP, ids).ignore();
            pipe.xdel(*stream, ids).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }
}
