//! Shared test support: a fleet per test on its own Postgres database and
//! Redis key prefix (or its own SQLite file), driven through the real HTTP
//! API, plus helpers that wait for a condition with a deadline.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use stevedore::broker::redis::RedisBroker;
use stevedore::broker::Brokers;
use stevedore::config::{NotifyArgs, TimingArgs};
use stevedore::dispatcher::DispatcherConfig;
use stevedore::fleet::{self, ApiRole, Backend, Roles, Running};
use stevedore::store::postgres::PgStore;
use stevedore::store::Store;
use uuid::Uuid;

/// The services the tests use, from `DATABASE_URL`, `REDIS_URL` and
/// `AMQP_URL` as scripts/services.sh reads them (the local ones when unset):
/// the suite runs against services given by URL, not only on loopback.
fn service(var: &str, default: &'static str) -> &'static str {
    static URLS: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let mut urls = URLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, url)) = urls.iter().find(|(v, _)| v == var) {
        return url;
    }
    let url: &'static str = match std::env::var(var) {
        Ok(v) if !v.is_empty() => Box::leak(v.into_boxed_str()),
        _ => default,
    };
    urls.push((var.to_owned(), url));
    url
}

/// Where test databases are created (and dropped).
pub fn pg_admin() -> &'static str {
    service("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
}

pub fn redis_url() -> &'static str {
    service("REDIS_URL", "redis://127.0.0.1:6379")
}

pub fn amqp_url() -> &'static str {
    service("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// `url` naming database `name` instead, its parameters kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = match base.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest)),
        None => base.to_owned(),
    };
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Flavor {
    /// Postgres with Redis as the broker.
    Postgres,
    /// Postgres with RabbitMQ as the broker.
    Amqp,
    Sqlite,
}

/// Short leases and repair delays so recovery paths run within seconds.
pub fn fast_timing() -> TimingArgs {
    TimingArgs {
        lease_secs: 2.0,
        heartbeat_secs: 0.4,
        grace_secs: 2.0,
        lost_after_secs: 1.0,
        ..TimingArgs::default()
    }
}

pub fn fast_dispatcher() -> DispatcherConfig {
    DispatcherConfig {
        batch: 1000,
        poll: Duration::from_millis(50),
        rescue_every: Duration::from_millis(200),
        lost_after: Duration::from_secs(1),
        ..DispatcherConfig::default()
    }
}

/// A fresh database on the shared Postgres, named for this test run.
pub async fn fresh_pg_database() -> String {
    let name = format!("sdt_{}", Uuid::now_v7().simple());
    let admin = sqlx::PgPool::connect(pg_admin())
        .await
        .expect("Postgres at DATABASE_URL (default 127.0.0.1:5432)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    with_database(pg_admin(), &name)
}

pub struct TestFleet {
    pub flavor: Flavor,
    pub url: String,
    pub http: reqwest::Client,
    pub backend: Backend,
    pub redis_prefix: String,
    pub database_url: Option<String>,
    pub running: Option<Running>,
    _dir: tempfile::TempDir,
}

pub struct Opts {
    pub workers: Vec<(String, usize)>,
    pub timing: TimingArgs,
    /// Run the notifier in the fleet (tests of its restarts run their own).
    pub notifier: bool,
    pub notify: NotifyArgs,
    /// The API role: open (no keys) unless a test sets keys.
    pub api: ApiRole,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            workers: vec![("probe".into(), 8)],
            timing: fast_timing(),
            notifier: true,
            notify: fast_notify(""),
            api: ApiRole::open("127.0.0.1:0".parse().expect("addr")),
        }
    }
}

/// `STEVEDORE_WEBHOOK_KEY` of the test fleets: fixed, so a second notifier
/// or API on the same database opens what the first one sealed.
pub const TEST_WEBHOOK_KEY: &str = "c3RldmVkb3JlLXRlc3RzLXdlYmhvb2sta2V5LTMyYnk=";

/// Short polls and a seconds-long webhook schedule; `allow` is
/// `STEVEDORE_WEBHOOK_ALLOW_HOSTS`. Webhook secrets are sealed under
/// [`TEST_WEBHOOK_KEY`].
pub fn fast_notify(allow: &str) -> NotifyArgs {
    NotifyArgs {
        webhook_schedule: "1s,1s,2s".into(),
        webhook_timeout_secs: 2.0,
        webhook_allow_hosts: allow.into(),
        notifier_poll_ms: 50,
        keys: stevedore::config::WebhookKeyArgs {
            webhook_key: Some(TEST_WEBHOOK_KEY.into()),
            ..Default::default()
        },
        ..NotifyArgs::default()
    }
}

impl TestFleet {
    pub async fn start(flavor: Flavor) -> Self {
        Self::start_with(flavor, Opts::default()).await
    }

    pub async fn backend(
        flavor: Flavor,
        dir: &std::path::Path,
        prefix: &str,
    ) -> (Backend, Option<String>) {
        match flavor {
            Flavor::Sqlite => (
                Backend::embedded(dir, &fast_timing())
                    .await
                    .expect("sqlite backend"),
                None,
            ),
            Flavor::Postgres => {
                let url = fresh_pg_database().await;
                let store = Arc::new(PgStore::connect(&url, 8).await.expect("pg store"));
                store.migrate().await.expect("migrate");
                let client = ::redis::Client::open(redis_url()).expect("Redis URL");
                let redis = RedisBroker::connect(client, prefix, Duration::from_secs(2))
                    .await
                    .expect("Redis at REDIS_URL (default 127.0.0.1:6379)");
                let backend = Backend::on_postgres(store, Brokers::new(Arc::new(redis)));
                (backend, Some(url))
            }
            Flavor::Amqp => {
                let url = fresh_pg_database().await;
                let store = Arc::new(PgStore::connect(&url, 8).await.expect("pg store"));
                store.migrate().await.expect("migrate");
                let amqp = stevedore::broker::amqp::AmqpBroker::connect(amqp_config(prefix))
                    .await
                    .expect("RabbitMQ at AMQP_URL (default 127.0.0.1:5672)");
                let backend = Backend::on_postgres(store, Brokers::new(Arc::new(amqp)));
                (backend, Some(url))
            }
        }
    }

    pub async fn start_with(flavor: Flavor, opts: Opts) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = format!("sdt:{}", Uuid::now_v7().simple());
        let (backend, database_url) = Self::backend(flavor, dir.path(), &prefix).await;
        let mut roles = Roles::new(opts.timing)
            .with_api(opts.api)
            .with_dispatcher(fast_dispatcher())
            .with_workers(opts.workers)
            .with_notify(opts.notify);
        if opts.notifier {
            roles = roles.with_notifier();
        }
        let kinds = kinds_for(flavor, &backend, &prefix).await;
        let running = fleet::start(backend.clone(), kinds, roles)
            .await
            .expect("fleet starts");
        let url = format!("http://{}", running.addr.expect("api address"));
        Self {
            flavor,
            url,
            http: reqwest::Client::new(),
            backend,
            redis_prefix: prefix,
            database_url,
            running: Some(running),
            _dir: dir,
        }
    }

    /// Starts extra worker pools on the same backend (a second process, in effect).
    pub async fn start_workers(&self, pool: &str, concurrency: usize) -> Running {
        self.start_workers_with(pool, concurrency, fast_timing())
            .await
    }

    pub async fn start_workers_with(
        &self,
        pool: &str,
        concurrency: usize,
        timing: TimingArgs,
    ) -> Running {
        let roles = Roles::new(timing).with_workers(vec![(pool.to_owned(), concurrency)]);
        let kinds = kinds_for(self.flavor, &self.backend, &self.redis_prefix).await;
        fleet::start(self.backend.clone(), kinds, roles)
            .await
            .expect("workers start")
    }

    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.backend.store
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> StatusCode {
        self.http
            .delete(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .send()
            .await
            .expect("request")
            .status()
    }

    /// Submits a probe job and returns its id.
    pub async fn probe(&self, payload: Value, extra: Value) -> Uuid {
        let mut body = json!({"kind": "probe", "payload": payload});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (status, v) = self.post("/v1/jobs", body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v["id"].as_str().expect("id").parse().expect("uuid")
    }

    pub async fn job(&self, id: Uuid) -> Value {
        let (status, v) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    /// Polls until the job has `status`, failing after `secs`.
    pub async fn wait_status(&self, id: Uuid, status: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let job = self.job(id).await;
            if job["status"] == status {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} did not become {status} within {secs}s: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn events(&self, id: Uuid) -> Vec<(String, i32)> {
        self.store()
            .job_events(id)
            .await
            .expect("events")
            .into_iter()
            .map(|e| (e.kind, e.attempt))
            .collect()
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        if let Some(url) = &self.database_url {
            drop_database(url).await;
        }
        if self.flavor == Flavor::Amqp {
            delete_amqp(&self.redis_prefix, &["probe", "scrape", "analyze"]).await;
        }
    }
}

/// The kinds as production shares them: on Postgres the analyze kind keeps
/// its rate limits and answer cache in Redis (under the fleet's prefix), in
/// dev mode in the SQLite file.
pub async fn kinds_for(flavor: Flavor, backend: &Backend, prefix: &str) -> stevedore::kinds::Kinds {
    if flavor == Flavor::Sqlite {
        return fleet::backend_kinds(backend);
    }
    let client = ::redis::Client::open(redis_url()).expect("Redis URL");
    let conn = ::redis::aio::ConnectionManager::new(client)
        .await
        .expect("Redis at REDIS_URL (default 127.0.0.1:6379)");
    let shared = fleet::Shared::Redis {
        conn,
        prefix: prefix.to_owned(),
    };
    fleet::kinds(&stevedore::config::KindsArgs::default(), shared).expect("kinds")
}

pub async fn drop_database(url: &str) {
    let Some(name) = url.rsplit('/').next() else {
        return;
    };
    if let Ok(admin) = sqlx::PgPool::connect(pg_admin()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}

/// Waits until `f` returns true, failing with `what` after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn amqp_config(prefix: &str) -> stevedore::broker::amqp::AmqpConfig {
    stevedore::broker::amqp::AmqpConfig {
        url: amqp_url().into(),
        prefix: prefix.replace(':', "."),
        quorum: false,
        tls: Default::default(),
    }
}

/// Deletes the test's queues and exchange from the shared RabbitMQ.
pub async fn delete_amqp(prefix: &str, pools: &[&str]) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let prefix = prefix.replace(':', ".");
    let props = lapin::ConnectionProperties::default();
    let Ok(conn) = lapin::Connection::connect(amqp_url(), props).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for pool in pools {
            for q in [
                format!("{prefix}.{pool}"),
                format!("{prefix}.{pool}.poison"),
            ] {
                let _ = ch
                    .queue_delete(q.into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = ch
            .exchange_delete(
                format!("{prefix}.dlx").into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "test done".into()).await;
}

/// Generates one test per broker (Redis, RabbitMQ, the embedded queue).
#[macro_export]
macro_rules! all_brokers {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Flavor::Postgres).await })*
        }
        mod amqp {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Flavor::Amqp).await })*
        }
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Flavor::Sqlite).await })*
        }
    };
}

/// Generates one test per flavor from `async fn name(flavor: Flavor)`.
#[macro_export]
macro_rules! both_flavors {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Flavor::Postgres).await })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Flavor::Sqlite).await })*
        }
    };
}

pub mod checker;
pub mod faultproxy;
pub mod procs;
/// One Server-Sent Event: id, type and the JSON data.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: i64,
    pub event: String,
    pub data: Value,
}

/// A minimal SSE client over reqwest that reads frames as they come.
pub struct SseClient {
    resp: reqwest::Response,
    buf: String,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<i64>) -> Self {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await.expect("stream");
        assert_eq!(resp.status(), StatusCode::OK);
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event, or None when the server ends the stream or `secs` pass.
    pub async fn next(&mut self, secs: u64) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(Sse {
                    id: id.unwrap_or(-1),
                    event,
                    data: serde_json::from_str(&data).expect("JSON data"),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?;
            self.buf
                .push_str(&String::from_utf8_lossy(&chunk.ok().flatten()?));
        }
    }
}

impl SseClient {
    /// Reads events until one matches `until` (each within 30 s); answers
    /// all it read, that one last.
    pub async fn read_until(&mut self, until: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut got = Vec::new();
        loop {
            let e = self.next(30).await.expect("the awaited event arrives");
            let done = until(&e);
            got.push(e);
            if done {
                return got;
            }
        }
    }
}

/// Serves `app` on 127.0.0.1 (a free port) in the background.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// Submits `n` no-op probe jobs in batches; returns their ids.
pub async fn submit_probes(f: &TestFleet, n: usize) -> Vec<Uuid> {
    submit_probes_at(f, n, 0).await
}

/// Submits `n` no-op probe jobs at `priority` in batches; returns their ids.
pub async fn submit_probes_at(f: &TestFleet, n: usize, priority: i32) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let jobs: Vec<Value> = chunk
            .iter()
            .map(|_| json!({"kind": "probe", "payload": {}, "priority": priority}))
            .collect();
        let (status, v) = f.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        for j in v["jobs"].as_array().expect("jobs") {
            ids.push(j["id"].as_str().expect("id").parse().expect("uuid"));
        }
    }
    ids
}
