//! Production roles as separate `stevedore` processes configured by
//! environment, as the README's "Production roles" section runs them:
//! `/readyz` turns 503 naming the broker while it is unreachable, a pool's
//! own `STEVEDORE_BROKER_<POOL>` wins over the default, and two dispatchers
//! beside `api --no-dispatcher` share the work with each job sent once.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::checker::{check, metric_sum};
use support::faultproxy::{FaultProxy, Mode};
use support::procs::{free_port, wait_port, Proc};
use uuid::Uuid;

struct Env {
    db: String,
    prefix: String,
    vars: Vec<(&'static str, String)>,
}

async fn env(redis_url: &str) -> Env {
    let db = support::fresh_pg_database().await;
    let prefix = format!("sdt:{}", Uuid::now_v7().simple());
    let vars = vec![
        ("DATABASE_URL", db.clone()),
        ("REDIS_URL", redis_url.to_owned()),
        ("STEVEDORE_REDIS_PREFIX", prefix.clone()),
        ("STEVEDORE_AMQP_PREFIX", prefix.replace(':', ".")),
        ("STEVEDORE_LEASE_SECS", "2".into()),
        ("STEVEDORE_HEARTBEAT_SECS", "0.5".into()),
        ("STEVEDORE_LOG", "warn".into()),
    ];
    Env { db, prefix, vars }
}

/// `stevedore <role> ...` with its HTTP port open (API or metrics).
async fn role(args: &[&str], env: &[(&str, String)], dir: &Path, name: &str) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = args.to_vec();
    if args[0] == "api" {
        all.extend(["--insecure-no-auth", "--listen", listen.as_str()]);
    } else {
        all.extend(["--metrics-listen", listen.as_str()]);
    }
    let p = Proc::stevedore(&all, env, dir, name);
    wait_port(port, 60).await;
    (p, port)
}

async fn get(port: u16, path: &str) -> (reqwest::StatusCode, Value) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("request");
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn submit(port: u16, n: usize) -> Vec<Uuid> {
    let jobs: Vec<Value> = (0..n)
        .map(|_| json!({"kind": "probe", "payload": {}}))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/jobs/batch"))
        .json(&json!({"jobs": jobs}))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let v: Value = r.json().await.expect("json");
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").parse().expect("uuid"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_an_unreachable_broker_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = FaultProxy::start(6379).await;
    let e = env(&format!("redis://127.0.0.1:{}", proxy.port)).await;
    let (_api, port) = role(&["api"], &e.vars, dir.path(), "api").await;
    let (s, v) = get(port, "/readyz").await;
    assert_eq!(
        (s.as_u16(), &v["brokers"]["redis"]),
        (200, &json!("ok")),
        "{v}"
    );

    proxy.set(Mode::Reset);
    support::eventually(20, "/readyz says the broker is down", || async {
        let (s, v) = get(port, "/readyz").await;
        s == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && v["ready"] == false
            && v["database"] == "ok"
            && v["brokers"]["redis"].as_str().is_some_and(|b| b != "ok")
    })
    .await;
    let (s, _) = get(port, "/healthz").await;
    assert_eq!(s, reqwest::StatusCode::OK, "the process itself is up");

    proxy.set(Mode::Pass);
    support::eventually(30, "/readyz is ready again", || async {
        get(port, "/readyz").await.0 == reqwest::StatusCode::OK
    })
    .await;
    support::drop_database(&e.db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_runs_on_its_own_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut e = env(support::redis_url()).await;
    e.vars.push(("STEVEDORE_BROKER", "redis".into()));
    e.vars.push(("STEVEDORE_BROKER_PROBE", "amqp".into()));
    e.vars.push(("AMQP_URL", support::amqp_url().into()));
    let (_api, port) = role(&["api"], &e.vars, dir.path(), "api").await;
    let worker = ["worker", "--pool", "probe", "--concurrency", "4"];
    let (_w, _) = role(&worker, &e.vars, dir.path(), "worker").await;
    let ids = submit(port, 20).await;
    for id in &ids {
        support::eventually(30, "the probe job succeeds", || async {
            get(port, &format!("/v1/jobs/{id}")).await.1["status"] == "succeeded"
        })
        .await;
    }
    let (_, ready) = get(port, "/readyz").await;
    assert_eq!(ready["brokers"]["amqp"], "ok", "{ready}");

    // The probe queue is on RabbitMQ; Redis never got a probe stream.
    let props = lapin::ConnectionProperties::default();
    let conn = lapin::Connection::connect(support::amqp_url(), props)
        .await
        .expect("RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    let queue = format!("{}.probe", e.prefix.replace(':', "."));
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), passive, Default::default())
        .await
        .unwrap_or_else(|err| panic!("queue {queue} exists on RabbitMQ: {err}"));
    let _ = conn.close(200, "checked".into()).await;
    let mut r = redis::Client::open(support::redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{}:stream:probe", e.prefix))
        .query_async(&mut r)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "no probe stream on Redis");
    support::delete_amqp(&e.prefix, &["probe"]).await;
    support::drop_database(&e.db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_share_the_work_and_send_each_job_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = env(support::redis_url()).await;
    let (_api, port) = role(&["api", "--no-dispatcher"], &e.vars, dir.path(), "api").await;
    let (_d1, m1) = role(&["dispatcher"], &e.vars, dir.path(), "dispatcher-1").await;
    let (_d2, m2) = role(&["dispatcher"], &e.vars, dir.path(), "dispatcher-2").await;
    let worker = ["worker", "--pool", "probe", "--concurrency", "16"];
    let (_w, _) = role(&worker, &e.vars, dir.path(), "worker").await;
    let published = |m: u16| async move {
        let text = reqwest::get(format!("http://127.0.0.1:{m}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| {
                l.starts_with("stevedore_broker_publish_total") && l.contains("outcome=\"ok\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    // Small batches until both dispatchers have relayed some.
    let mut accepted = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while published(m1).await == 0.0 || published(m2).await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both dispatchers relay work ({} and {} sent)",
            published(m1).await,
            published(m2).await
        );
        accepted.extend(submit(port, 10).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = sqlx::PgPool::connect(&e.db).await.expect("db");
    let report = check(&db, &accepted, 60, 0).await;
    report.assert_clean("two dispatchers");
    let (a, b) = (published(m1).await, published(m2).await);
    assert_eq!(
        (a + b) as usize,
        accepted.len(),
        "each job sent once between them ({a} + {b})"
    );
    assert_eq!(
        metric_sum(m1, "stevedore_dispatcher_repairs_total").await,
        0.0
    );
    db.close().await;
    support::drop_database(&e.db).await;
}

/// A schedule that fires every second, with two dispatchers and one of
/// them killed (SIGKILL) midway: each second from the first fire to the
/// last made exactly one job, the killed one's share included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_fire_a_schedule_once_per_second_when_one_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = env(support::redis_url()).await;
    let (_api, port) = role(&["api", "--no-dispatcher"], &e.vars, dir.path(), "api").await;
    let (d1, _) = role(&["dispatcher"], &e.vars, dir.path(), "dispatcher-1").await;
    let (d2, _) = role(&["dispatcher"], &e.vars, dir.path(), "dispatcher-2").await;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/schedules");
    let body = json!({"name": "tick", "cron": "* * * * * *",
                      "job": {"kind": "probe", "payload": {}}});
    let r = http.post(&url).json(&body).send().await.expect("create");
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);

    tokio::time::sleep(Duration::from_secs(5)).await;
    d1.signal(nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = http
        .post(format!("{url}/tick/pause"))
        .json(&json!({}))
        .send()
        .await
        .expect("pause");
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    // A fire that took the row just before the pause commits after it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let db = sqlx::PgPool::connect(&e.db).await.expect("db");
    let fired: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT scheduled_for FROM jobs WHERE schedule = 'tick' ORDER BY scheduled_for",
    )
    .fetch_all(&db)
    .await
    .expect("jobs");
    assert!(
        fired.len() >= 8,
        "about ten fires in ten seconds: {fired:?}"
    );
    for pair in fired.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "one job per second, none missed or doubled: {fired:?}"
        );
    }
    assert!(
        !d2.log().contains("Dispatcher service failed"),
        "the survivor never failed a round:\n{}",
        d2.log()
    );
    db.close().await;
    support::drop_database(&e.db).await;
}
