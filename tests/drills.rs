//! Fault drills with real processes and real servers: a worker killed with
//! SIGKILL, Redis restarted empty, Postgres restarted, a worker stopped with
//! SIGTERM, a worker frozen past its lease, and network faults between the
//! workers and each service. Drills that restart a service use a private
//! instance, so the shared services other tests use are never disturbed.
//! Each drill ends with the same accounting (`support::checker`).

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use support::checker::{check, fenced_from_metrics, metric_sum};
use support::faultproxy::{FaultProxy, Mode};
use support::procs::{free_port, wait_port, PrivatePostgres, PrivateRabbit, PrivateRedis, Proc};
use uuid::Uuid;

struct Drill {
    dir: tempfile::TempDir,
    db: sqlx::PgPool,
    db_url: String,
    redis_url: String,
    prefix: String,
    api_port: u16,
    api: Proc,
    workers: Vec<(Proc, u16)>,
    http: reqwest::Client,
}

fn env(db: &str, redis: &str, prefix: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", db.to_owned()),
        ("REDIS_URL", redis.to_owned()),
        ("STEVEDORE_REDIS_PREFIX", prefix.to_owned()),
        ("STEVEDORE_LEASE_SECS", "2".into()),
        ("STEVEDORE_HEARTBEAT_SECS", "0.5".into()),
        ("STEVEDORE_GRACE_SECS", "3".into()),
        ("STEVEDORE_LOST_AFTER_SECS", "3".into()),
        ("STEVEDORE_DB_POOL", "8".into()),
        ("STEVEDORE_LOG", "info,sqlx=warn".into()),
    ];
    // A drill on RabbitMQ passes its URL in place of Redis's.
    // (Redis still carries the analyze kind's shared limits and cache.)
    if redis.starts_with("amqp://") {
        env.retain(|(k, _)| *k != "REDIS_URL");
        env.push(("REDIS_URL", support::redis_url().into()));
        env.push(("STEVEDORE_BROKER", "amqp".into()));
        env.push(("AMQP_URL", redis.to_owned()));
        env.push(("STEVEDORE_AMQP_PREFIX", prefix.replace(':', ".")));
    }
    env
}

impl Drill {
    async fn start(dir: tempfile::TempDir, db_url: String, redis_url: String) -> Self {
        let prefix = format!("sdt:{}", Uuid::now_v7().simple());
        let db = sqlx::PgPool::connect(&db_url)
            .await
            .expect("drill database");
        let api_port = free_port();
        let listen = format!("127.0.0.1:{api_port}");
        let api = Proc::stevedore(
            &["api", "--insecure-no-auth", "--listen", &listen],
            &env(&db_url, &redis_url, &prefix),
            dir.path(),
            "api",
        );
        wait_port(api_port, 60).await;
        Self {
            dir,
            db,
            db_url,
            redis_url,
            prefix,
            api_port,
            api,
            workers: vec![],
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
        }
    }

    async fn on_shared() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start(
            dir,
            support::fresh_pg_database().await,
            support::redis_url().into(),
        )
        .await
    }

    /// Starts a worker process connecting to the given database and Redis.
    async fn worker_via(&mut self, db_url: &str, redis_url: &str, concurrency: usize) -> usize {
        let metrics = free_port();
        let listen = format!("127.0.0.1:{metrics}");
        let c = concurrency.to_string();
        let name = format!("worker-{}", self.workers.len());
        let args = [
            "worker",
            "--pool",
            "probe",
            "--concurrency",
            &c,
            "--metrics-listen",
            &listen,
        ];
        let p = Proc::stevedore(
            &args,
            &env(db_url, redis_url, &self.prefix),
            self.dir.path(),
            &name,
        );
        wait_port(metrics, 60).await;
        self.workers.push((p, metrics));
        self.workers.len() - 1
    }

    async fn worker(&mut self, concurrency: usize) -> usize {
        let (db, redis) = (self.db_url.clone(), self.redis_url.clone());
        self.worker_via(&db, &redis, concurrency).await
    }

    /// Submits `n` probe jobs in batches; returns the ids the API accepted.
    async fn submit(&self, n: usize, payload: serde_json::Value) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let jobs: Vec<_> = chunk
                .iter()
                .map(|_| json!({"kind": "probe", "payload": payload}))
                .collect();
            let url = format!("http://127.0.0.1:{}/v1/jobs/batch", self.api_port);
            let resp = self
                .http
                .post(url)
                .json(&json!({"jobs": jobs}))
                .send()
                .await
                .expect("submit");
            assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
            let v: serde_json::Value = resp.json().await.expect("json");
            ids.extend(
                v["jobs"]
                    .as_array()
                    .expect("jobs")
                    .iter()
                    .map(|j| j["id"].as_str().expect("id").parse::<Uuid>().expect("uuid")),
            );
        }
        ids
    }

    async fn succeeded(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(&self.db)
            .await
            .unwrap_or(0)
    }

    async fn wait_succeeded(&self, n: i64, secs: u64) {
        support::eventually(secs, &format!("{n} jobs succeeded"), || async {
            self.succeeded().await >= n
        })
        .await;
    }

    async fn fenced(&self) -> u64 {
        let mut total = 0;
        for (_, port) in &self.workers {
            total += fenced_from_metrics(*port).await;
        }
        total
    }

    async fn finish(self, drill: &str, accepted: &[Uuid]) -> support::checker::Report {
        let mut report = check(&self.db, accepted, 180, 0).await;
        // Read after the jobs settle: late writes are refused only once the
        // fault is over and the stale worker gets to try them.
        report.fenced_writes = self.fenced().await;
        for (w, _) in &self.workers {
            if report.lost > 0 {
                println!("{}", w.log());
            }
        }
        if std::env::var_os("STEVEDORE_KEEP_DRILL_LOGS").is_some() {
            println!("drill logs kept in {}", self.dir.keep().display());
        }
        report.assert_clean(drill);
        self.db.close().await;
        if self.db_url.contains(":5432/") {
            support::drop_database(&self.db_url).await;
        }
        report
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_worker_killed_with_sigkill_loses_nothing() {
    let mut d = Drill::on_shared().await;
    d.worker(32).await;
    d.worker(32).await;
    let accepted = d.submit(2000, json!({"sleep_ms": 100})).await;
    d.wait_succeeded(300, 120).await;
    let victim = d.workers[0].1;
    let in_flight = metric_sum(victim, "stevedore_jobs_started_total").await
        - metric_sum(victim, "stevedore_jobs_finished_total").await;
    d.workers[0].0.signal(Signal::SIGKILL);
    d.workers[0].0.wait_exit(10).await;
    assert!(in_flight >= 1.0, "the worker had jobs running when killed");
    d.worker(32).await;
    let report = d.finish("kill -9 worker", &accepted).await;
    assert!(
        report.lease_expiries >= 1,
        "attempts the kill cut off were rescued after their lease: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_redis_restarted_empty_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = PrivateRedis::start(dir.path()).await;
    let redis_url = redis.url();
    let mut d = Drill::start(dir, support::fresh_pg_database().await, redis_url.clone()).await;
    d.worker(32).await;
    d.worker(32).await;
    let accepted = d.submit(1500, json!({"sleep_ms": 50})).await;
    d.wait_succeeded(200, 120).await;
    let mut conn = redis::Client::open(redis_url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("private redis");
    let waiting: i64 = redis::cmd("XLEN")
        .arg(format!("{}:stream:probe", d.prefix))
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    redis.restart_empty().await;
    assert!(
        waiting > 0,
        "messages were waiting in Redis when it was wiped"
    );
    d.wait_succeeded(accepted.len() as i64, 180).await;
    assert!(
        metric_sum(d.api_port, "stevedore_dispatcher_repairs_total").await >= 1.0,
        "the dispatcher re-sent what Redis lost"
    );
    d.finish("redis restarted empty", &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_rabbitmq_restarted_workers_reconnect_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rabbit = PrivateRabbit::start(dir.path()).await;
    let mut d = Drill::start(dir, support::fresh_pg_database().await, rabbit.url()).await;
    d.worker(32).await;
    d.worker(32).await;
    // About 5 s of work at 64 in flight, so the restart lands mid-run.
    let accepted = d.submit(1500, json!({"sleep_ms": 200})).await;
    d.wait_succeeded(200, 120).await;
    rabbit.stop_app();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbit.start_app().await;
    for (w, _) in &mut d.workers {
        assert!(w.running(), "{} survived the restart", w.name);
    }
    d.finish("rabbitmq restarted", &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_postgres_restarted_answers_503_then_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PrivatePostgres::start(dir.path()).await;
    let mut d = Drill::start(dir, pg.url("postgres"), support::redis_url().into()).await;
    d.worker(32).await;
    let mut accepted = d.submit(800, json!({"sleep_ms": 50})).await;
    d.wait_succeeded(100, 120).await;
    pg.stop().await;
    let started = std::time::Instant::now();
    let url = format!("http://127.0.0.1:{}/v1/jobs", d.api_port);
    let resp = d
        .http
        .post(&url)
        .json(&json!({"kind": "probe", "payload": {}}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(resp.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = resp.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "503 comes fast, not after a hang"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again().await;
    accepted.extend(d.submit(200, json!({"sleep_ms": 10})).await);
    assert!(d.workers[0].0.running(), "the worker rode out the outage");
    assert!(d.api.running(), "the API rode out the outage");
    d.finish("postgres restarted", &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_sigterm_drains_or_hands_back_in_flight_jobs() {
    let mut d = Drill::on_shared().await;
    d.worker(16).await;
    let mut accepted = d.submit(8, json!({"sleep_ms": 20000})).await;
    accepted.extend(d.submit(300, json!({"sleep_ms": 200})).await);
    d.wait_succeeded(20, 60).await;
    d.workers[0].0.signal(Signal::SIGTERM);
    let status = d.workers[0].0.wait_exit(30).await;
    assert!(status.success(), "a drained worker exits cleanly: {status}");
    let handed_back: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE status = 'queued' AND attempt_limit > max_attempts",
    )
    .fetch_one(&d.db)
    .await
    .expect("count");
    assert!(handed_back > 0, "the long jobs were handed back, not lost");
    d.worker(32).await;
    d.finish("SIGTERM worker", &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_worker_frozen_past_its_lease_cannot_overwrite_newer_results() {
    let mut d = Drill::on_shared().await;
    let frozen = d.worker(8).await;
    let accepted = d.submit(8, json!({"sleep_ms": 3000})).await;
    let pid = d.workers[frozen].0.pid().to_string();
    support::eventually(30, "the first worker runs jobs", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE status = 'running' AND worker LIKE $1",
        )
        .bind(format!("probe-{pid}-%"))
        .fetch_one(&d.db)
        .await
        .unwrap_or(0);
        n > 0
    })
    .await;
    d.workers[frozen].0.signal(Signal::SIGSTOP);
    d.worker(8).await;
    d.wait_succeeded(accepted.len() as i64, 60).await;
    let before: Vec<(Uuid, serde_json::Value)> =
        sqlx::query_as("SELECT id, result FROM jobs ORDER BY id")
            .fetch_all(&d.db)
            .await
            .expect("results");
    d.workers[frozen].0.signal(Signal::SIGCONT);
    let port = d.workers[frozen].1;
    support::eventually(30, "the woken worker's late writes are refused", || async {
        fenced_from_metrics(port).await > 0
    })
    .await;
    let after: Vec<(Uuid, serde_json::Value)> =
        sqlx::query_as("SELECT id, result FROM jobs ORDER BY id")
            .fetch_all(&d.db)
            .await
            .expect("results");
    assert_eq!(before, after, "every job keeps the newer result");
    d.finish("SIGSTOP past the lease", &accepted).await;
}

/// Latency, then a 10 s cut, then resets, between the workers and `service`.
async fn network_drill(service: &str) {
    let mut d = if service == "rabbitmq" {
        let dir = tempfile::tempdir().expect("tempdir");
        Drill::start(
            dir,
            support::fresh_pg_database().await,
            support::amqp_url().into(),
        )
        .await
    } else {
        Drill::on_shared().await
    };
    let upstream = match service {
        "postgres" => 5432,
        "redis" => 6379,
        _ => 5672,
    };
    let proxy = FaultProxy::start(upstream).await;
    let (db_url, redis_url) = match service {
        "postgres" => (
            d.db_url.replace(":5432/", &format!(":{}/", proxy.port)),
            d.redis_url.clone(),
        ),
        "redis" => (
            d.db_url.clone(),
            format!("redis://127.0.0.1:{}", proxy.port),
        ),
        _ => (
            d.db_url.clone(),
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
        ),
    };
    d.worker_via(&db_url, &redis_url, 32).await;
    d.worker_via(&db_url, &redis_url, 32).await;
    // About 20 s of work at 64 in flight, so the faults land mid-run.
    let accepted = d.submit(1000, json!({"sleep_ms": 1200})).await;
    d.wait_succeeded(64, 120).await;
    proxy.set(Mode::Latency(Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.set(Mode::Cut);
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.set(Mode::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Mode::Pass);
    for (w, _) in &mut d.workers {
        assert!(w.running(), "{} rode out the fault", w.name);
    }
    let prefix = d.prefix.clone();
    d.finish(&format!("network faults to {service}"), &accepted)
        .await;
    if service == "rabbitmq" {
        support::delete_amqp(&prefix, &["probe"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_network_faults_to_rabbitmq() {
    network_drill("rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_network_faults_to_postgres() {
    network_drill("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_network_faults_to_redis() {
    network_drill("redis").await;
}
