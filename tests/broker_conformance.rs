//! One conformance suite for every broker: Redis Streams, RabbitMQ and the
//! embedded SQLite queue pass the same tests, first at the broker trait
//! (delivery, acks, redelivery, poison), then through a whole fleet
//! (delayed retry, dead letters, cancel, concurrency, 1000 jobs).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use stevedore::broker::{Broker, Delivery};
use support::{eventually, Flavor, Opts, TestFleet};
use uuid::Uuid;

const WAIT: Duration = Duration::from_millis(500);

async fn bare(flavor: Flavor) -> TestFleet {
    TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![],
            ..Opts::default()
        },
    )
    .await
}

fn broker(f: &TestFleet) -> Arc<dyn Broker> {
    f.backend.brokers.for_pool("probe").clone()
}

/// Receives until `n` deliveries arrived or `secs` pass.
async fn receive_n(
    c: &mut Box<dyn stevedore::broker::Consumer>,
    n: usize,
    secs: u64,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(c.receive(n - got.len(), WAIT).await.expect("receive"));
    }
    got
}

/// Writes a body that is not a job id straight into the broker.
async fn publish_poison(f: &TestFleet) {
    match f.flavor {
        Flavor::Postgres => {
            let mut r = ::redis::Client::open(support::redis_url())
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("redis");
            let key = format!("{}:stream:probe", f.redis_prefix);
            let _: String = ::redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("job")
                .arg("not-a-uuid")
                .query_async(&mut r)
                .await
                .expect("xadd");
        }
        Flavor::Amqp => {
            let b =
                stevedore::broker::amqp::AmqpBroker::connect(support::amqp_config(&f.redis_prefix))
                    .await
                    .expect("amqp");
            b.publish_raw("probe", "not-a-uuid")
                .await
                .expect("publish raw");
        }
        Flavor::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&format!(
                "sqlite://{}",
                f.data_dir().join("stevedore.db").display()
            ))
            .await
            .expect("sqlite");
            sqlx::query(
                "INSERT INTO queue (pool, body, visible_at) VALUES ('probe', 'not-a-uuid', 0)",
            )
            .execute(&pool)
            .await
            .expect("insert poison");
        }
    }
}

async fn poison_count(f: &TestFleet) -> u64 {
    match f.flavor {
        Flavor::Postgres => {
            let mut r = ::redis::Client::open(support::redis_url())
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("redis");
            let key = format!("{}:poison:probe", f.redis_prefix);
            ::redis::cmd("XLEN")
                .arg(&key)
                .query_async(&mut r)
                .await
                .expect("xlen")
        }
        Flavor::Amqp => {
            let b =
                stevedore::broker::amqp::AmqpBroker::connect(support::amqp_config(&f.redis_prefix))
                    .await
                    .expect("amqp");
            b.poison_depth("probe").await.expect("poison depth")
        }
        Flavor::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&format!(
                "sqlite://{}",
                f.data_dir().join("stevedore.db").display()
            ))
            .await
            .expect("sqlite");
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM queue WHERE pool = 'poison:probe'")
                    .fetch_one(&pool)
                    .await
                    .expect("count");
            n as u64
        }
    }
}

async fn published_ids_are_delivered_and_acked_ones_are_gone(flavor: Flavor) {
    let f = bare(flavor).await;
    let b = broker(&f);
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    b.publish("probe", 0, &ids).await.expect("publish");
    let mut c = b.consumer("probe", "c1", 16).await.expect("consumer");
    let got = receive_n(&mut c, 10, 10).await;
    let got_ids: HashSet<Uuid> = got.iter().map(|d| d.job_id).collect();
    assert_eq!(got_ids, ids.iter().copied().collect::<HashSet<_>>());
    c.acker()
        .ack(&got.iter().map(|d| d.tag.clone()).collect::<Vec<_>>())
        .await
        .expect("ack");
    eventually(10, "acked messages leave the broker", || async {
        b.depth("probe").await.unwrap_or(1) == 0
    })
    .await;
    drop(c);
    let mut again = b.consumer("probe", "c2", 16).await.expect("consumer");
    // Longer than the redelivery timeouts used here (2 s).
    let late = receive_n(&mut again, 1, 4).await;
    assert!(
        late.is_empty(),
        "an acked message is not delivered again: {late:?}"
    );
    f.shutdown().await;
}

async fn a_backlog_is_handed_out_most_urgent_first(flavor: Flavor) {
    let f = bare(flavor).await;
    let b = broker(&f);
    // Published oldest first, least urgent first: only priority reorders.
    let mut by_priority: Vec<(i16, Vec<Uuid>)> = Vec::new();
    for p in [0, -5, 3, 100] {
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
        b.publish("probe", p, &ids).await.expect("publish");
        by_priority.push((p, ids));
    }
    let mut c = b.consumer("probe", "c1", 32).await.expect("consumer");
    let mut got = Vec::new();
    while got.len() < 24 {
        let batch = receive_n(&mut c, 5.min(24 - got.len()), 10).await;
        assert!(!batch.is_empty(), "the backlog was handed out: {got:?}");
        c.acker()
            .ack(&batch.iter().map(|d| d.tag.clone()).collect::<Vec<_>>())
            .await
            .expect("ack");
        got.extend(batch.into_iter().map(|d| d.job_id));
    }
    by_priority.sort_by_key(|(p, _)| -p);
    let want: Vec<Uuid> = by_priority.into_iter().flat_map(|(_, ids)| ids).collect();
    assert_eq!(
        got, want,
        "priority 100, 3, 0, -5 in turn, FIFO within each"
    );
    eventually(
        10,
        "acked messages leave every priority's queue",
        || async { b.depth("probe").await.unwrap_or(1) == 0 },
    )
    .await;
    f.shutdown().await;
}

async fn an_unacked_message_is_redelivered_when_its_consumer_dies(flavor: Flavor) {
    let f = bare(flavor).await;
    let b = broker(&f);
    let id = Uuid::now_v7();
    b.publish("probe", 0, &[id]).await.expect("publish");
    let mut dying = b.consumer("probe", "dying", 4).await.expect("consumer");
    let first = receive_n(&mut dying, 1, 10).await;
    assert_eq!(first.len(), 1);
    drop(dying);
    let mut next = b.consumer("probe", "survivor", 4).await.expect("consumer");
    let again = receive_n(&mut next, 1, 15).await;
    assert_eq!(again.iter().map(|d| d.job_id).collect::<Vec<_>>(), vec![id]);
    f.shutdown().await;
}

async fn an_undecodable_message_is_set_aside_and_consuming_goes_on(flavor: Flavor) {
    let f = bare(flavor).await;
    let b = broker(&f);
    publish_poison(&f).await;
    let id = Uuid::now_v7();
    b.publish("probe", 0, &[id]).await.expect("publish");
    let mut c = b.consumer("probe", "c", 8).await.expect("consumer");
    let got = receive_n(&mut c, 1, 10).await;
    assert_eq!(got.iter().map(|d| d.job_id).collect::<Vec<_>>(), vec![id]);
    eventually(10, "the poison message is dead-lettered", || async {
        poison_count(&f).await == 1
    })
    .await;
    f.shutdown().await;
}

fn ts(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str().expect("timestamp").parse().expect("RFC 3339")
}

async fn a_retry_is_delayed_until_its_time(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"fail_attempts": 1}),
            json!({"backoff": {"base_ms": 800, "max_ms": 800}}),
        )
        .await;
    let job = f.wait_status(id, "succeeded", 30).await;
    let retry_at = ts(&job["errors"][0]["retry_at"]);
    assert!(ts(&job["started_at"]) + chrono::Duration::milliseconds(1) >= retry_at);
    f.shutdown().await;
}

async fn failures_end_in_the_dead_letters(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"fail_attempts": 9, "failure": "permanent"}),
            json!({}),
        )
        .await;
    f.wait_status(id, "dead", 30).await;
    let (_, page) = f.get("/v1/dead-letters").await;
    assert_eq!(page["jobs"][0]["id"], id.to_string());
    f.shutdown().await;
}

async fn a_job_cancelled_before_delivery_never_runs(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let at = Utc::now() + chrono::Duration::milliseconds(1500);
    let id = f.probe(json!({}), json!({"run_at": at.to_rfc3339()})).await;
    let (status, _) = f.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    // A sentinel due just after it: once the sentinel has run and the broker
    // holds nothing unacked, anything sent for the cancelled job was
    // delivered and dropped.
    let later = at + chrono::Duration::milliseconds(100);
    let sentinel = f
        .probe(json!({}), json!({"run_at": later.to_rfc3339()}))
        .await;
    f.wait_status(sentinel, "succeeded", 20).await;
    let b = broker(&f);
    eventually(20, "the broker holds nothing unacked", || {
        let b = b.clone();
        async move { b.depth("probe").await.is_ok_and(|d| d == 0) }
    })
    .await;
    assert_eq!(f.job(id).await["status"], "cancelled");
    assert!(f.events(id).await.iter().all(|e| e.0 != "job.started"));
    f.shutdown().await;
}

async fn a_worker_never_runs_more_than_its_concurrency(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![("probe".into(), 3)],
            ..Opts::default()
        },
    )
    .await;
    let jobs: Vec<_> = (0..12)
        .map(|_| json!({"kind": "probe", "payload": {"sleep_ms": 300}}))
        .collect();
    let (_, v) = f.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    let ids: Vec<Uuid> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").parse().expect("uuid"))
        .collect();
    // Concurrency is how many handlers run at once (an attempt waiting for
    // its finish to commit holds no slot), so it is read from the handlers:
    // each probe says how many were running when it started.
    let mut max = 0;
    for id in ids {
        let job = f.wait_status(id, "succeeded", 30).await;
        let n = job["result"]["running_at_start"]
            .as_u64()
            .expect("running_at_start");
        max = max.max(n);
    }
    assert!(max <= 3, "at most 3 handlers at once, saw {max}");
    assert!(max >= 2, "the pool does run jobs side by side");
    f.shutdown().await;
}

async fn a_thousand_jobs_run_once_each(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![("probe".into(), 32)],
            ..Opts::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let jobs: Vec<_> = (0..500)
            .map(|_| json!({"kind": "probe", "payload": {}}))
            .collect();
        let (_, v) = f.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
        ids.extend(
            v["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .map(|j| j["id"].as_str().expect("id").parse::<Uuid>().expect("uuid")),
        );
    }
    let since = ids.iter().min().copied().expect("ids");
    eventually(120, "1000 jobs succeeded", || async {
        let (_, v) = f.get(&format!("/v1/stats?since={since}")).await;
        v["counts"]["succeeded"] == 1000
    })
    .await;
    // Every job, from the event log a user replays: one start and one
    // success each, nothing else.
    let mut c = support::SseClient::connect(
        &format!("{}/v1/events?types=job.started,job.succeeded", f.url),
        Some(0),
    )
    .await;
    let mut seen: HashMap<Uuid, (usize, usize)> = ids.iter().map(|id| (*id, (0, 0))).collect();
    for _ in 0..2 * ids.len() {
        let e = c.next(60).await.expect("the event log replays");
        let job: Uuid = e.data["job_id"]
            .as_str()
            .expect("job_id")
            .parse()
            .expect("uuid");
        let n = seen.get_mut(&job).expect("an event of a submitted job");
        match e.event.as_str() {
            "job.started" => n.0 += 1,
            _ => n.1 += 1,
        }
    }
    let wrong: Vec<_> = seen.iter().filter(|(_, n)| **n != (1, 1)).collect();
    assert!(
        wrong.is_empty(),
        "(starts, successes) not (1, 1): {wrong:?}"
    );
    let (_, v) = f.get(&format!("/v1/stats?since={since}")).await;
    assert_eq!(
        v["counts"].as_object().map(|m| m.len()),
        Some(1),
        "nothing but succeeded: {v}"
    );
    f.shutdown().await;
}

all_brokers!(
    published_ids_are_delivered_and_acked_ones_are_gone,
    a_backlog_is_handed_out_most_urgent_first,
    an_unacked_message_is_redelivered_when_its_consumer_dies,
    an_undecodable_message_is_set_aside_and_consuming_goes_on,
    a_retry_is_delayed_until_its_time,
    failures_end_in_the_dead_letters,
    a_job_cancelled_before_delivery_never_runs,
    a_worker_never_runs_more_than_its_concurrency,
    a_thousand_jobs_run_once_each,
);

/// A queue an older version declared without priorities is used as it is:
/// publishing and consuming go on (in publish order) instead of failing on
/// RabbitMQ's refusal to redeclare it with other arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_queue_without_priorities_keeps_working() {
    use lapin::options::QueueDeclareOptions;
    use stevedore::broker::amqp::AmqpBroker;
    let prefix = format!("sdt:{}", Uuid::now_v7().simple());
    let cfg = support::amqp_config(&prefix);
    let conn = lapin::Connection::connect(&cfg.url, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    let ch = conn.create_channel().await.expect("channel");
    let legacy = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // As versions before priorities declared it: with its dead-letter route.
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString(format!("{}.dlx", cfg.prefix).into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString("probe".into()),
    );
    ch.queue_declare(format!("{}.probe", cfg.prefix).into(), legacy, args)
        .await
        .expect("declare the old way");
    let _ = conn.close(200, "done".into()).await;

    let b = AmqpBroker::connect(cfg).await.expect("connect");
    let id = Uuid::now_v7();
    let mut sent = false;
    for _ in 0..3 {
        match b.publish("probe", 10, &[id]).await {
            Ok(()) => {
                sent = true;
                break;
            }
            Err(e) => eprintln!("publish refused: {e}"),
        }
    }
    assert!(
        sent,
        "publishing to the old queue succeeds after one refusal"
    );
    let mut c = b.consumer("probe", "c", 4).await.expect("consumer");
    let got = receive_n(&mut c, 1, 10).await;
    assert_eq!(got.iter().map(|d| d.job_id).collect::<Vec<_>>(), vec![id]);
    support::delete_amqp(&prefix, &["probe"]).await;
}
