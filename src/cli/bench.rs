//! `stevedore bench`: submits no-op probe jobs through a running API and
//! reports the submit rate, end-to-end throughput (first submit to last
//! `succeeded`, from the jobs' own timestamps), latency percentiles and,
//! when it can reach the Postgres behind the API (`DATABASE_URL`), commits
//! per 1,000 jobs and WAL bytes per job.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{call, client};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, env = "STEVEDORE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The API key to send (`--url` deployments with keys).
    #[arg(long, env = "STEVEDORE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Start a fleet in this process on this broker and bench it instead of
    /// `--url`: `embedded` (SQLite), or `redis`/`amqp` with Postgres from
    /// `DATABASE_URL` (and `REDIS_URL`/`AMQP_URL`).
    #[arg(long, value_parser = ["embedded", "redis", "amqp"])]
    pub broker: Option<String>,
    /// Concurrency of the spawned fleet's probe worker.
    #[arg(long, default_value_t = 256)]
    pub worker_concurrency: usize,
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Jobs per request: 1 submits one by one, more uses /v1/jobs/batch.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Each probe sleeps this long (0 = no-op).
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
    /// Spread the jobs over this many priorities (0, 10, 20, ...), to
    /// measure what priorities cost against plain jobs (1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=10))]
    pub priorities: u16,
    /// Give the jobs this many concurrency keys (`bench:0`, `bench:1`, ...,
    /// by request), to measure what keyed claims cost against plain jobs
    /// (0: no keys). Set a limit on `bench:` to measure one that binds.
    #[arg(long, default_value_t = 0)]
    pub concurrency_keys: u16,
    /// Give up waiting for completion after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ts(v: &Value, k: &str) -> Option<DateTime<Utc>> {
    v.get(k)?.as_str()?.parse().ok()
}

/// Backend settings read like the production roles read them.
#[derive(clap::Parser)]
struct Env {
    #[command(flatten)]
    backend: crate::config::BackendArgs,
}

/// Starts api, dispatcher and a probe worker in this process.
async fn spawn_fleet(
    broker: &str,
    concurrency: usize,
) -> anyhow::Result<(crate::fleet::Running, Option<tempfile::TempDir>)> {
    use crate::fleet::{self, Backend, Roles};
    use clap::Parser as _;
    let timing = crate::config::TimingArgs::default();
    let (backend, dir) = if broker == "embedded" {
        let dir = tempfile::tempdir().context("temp dir")?;
        (Backend::embedded(dir.path(), &timing).await?, Some(dir))
    } else {
        let env = Env::try_parse_from(["bench", "--broker", broker])
            .context("DATABASE_URL is needed for redis/amqp")?;
        (Backend::production(&env.backend).await?, None)
    };
    let roles = Roles::new(timing)
        .with_api(fleet::ApiRole::open("127.0.0.1:0".parse()?))
        .with_dispatcher(crate::dispatcher::DispatcherConfig::default())
        .with_workers(vec![("probe".into(), concurrency)]);
    let kinds = crate::kinds::Kinds::default().register(crate::kinds::probe::Probe::default());
    Ok((fleet::start(backend, kinds, roles).await?, dir))
}

/// The database the fleet writes to, when `DATABASE_URL` names it.
async fn database() -> Option<crate::store::postgres::PgStore> {
    let url = crate::config::env_setting("DATABASE_URL")?;
    crate::store::postgres::PgStore::connect(&url, 1).await.ok()
}

pub async fn run(mut a: BenchArgs) -> anyhow::Result<()> {
    let spawned = match a.broker.clone() {
        Some(b) => {
            let (running, dir) = spawn_fleet(&b, a.worker_concurrency).await?;
            a.url = format!("http://{}", running.addr.context("spawned API address")?);
            println!(
                "spawned fleet: broker {b}, probe worker concurrency {}",
                a.worker_concurrency
            );
            Some((running, dir))
        }
        None => None,
    };
    let db = if a.broker.as_deref() == Some("embedded") {
        None
    } else {
        database().await
    };
    let before = match &db {
        Some(db) => db.db_stats().await.ok(),
        None => None,
    };
    let res = measure(a).await;
    if let (Ok(jobs), Some(db), Some(before)) = (&res, &db, before) {
        // pg_stat_database is flushed about once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        if let Ok(after) = db.db_stats().await {
            let n = *jobs as f64;
            println!(
                "database: {:.1} commits per 1,000 jobs (reads included), {:.0} WAL bytes per job (whole cluster)",
                (after.commits - before.commits) as f64 * 1000.0 / n,
                (after.wal_bytes - before.wal_bytes) as f64 / n
            );
        }
    }
    if let Some((running, _dir)) = spawned {
        running.shutdown().await;
    }
    res.map(drop)
}

/// Runs the benchmark; returns how many jobs were submitted.
async fn measure(a: BenchArgs) -> anyhow::Result<usize> {
    anyhow::ensure!(
        a.jobs > 0 && a.batch > 0 && a.concurrency > 0,
        "jobs, batch and concurrency must be positive"
    );
    let http = client(a.api_key.as_deref())?;
    let url = a.url.trim_end_matches('/').to_owned();
    let chunks: Vec<usize> = (0..a.jobs)
        .step_by(a.batch)
        .map(|s| a.batch.min(a.jobs - s))
        .collect();
    let started = Instant::now();
    let ids: Vec<Vec<Uuid>> = stream::iter(chunks.into_iter().enumerate())
        .map(|(i, n)| {
            // Whole requests take turns, so every priority has a backlog.
            let priority = (i % usize::from(a.priorities)) * 10;
            let mut job =
                json!({"kind": "probe", "payload": {"sleep_ms": a.sleep_ms}, "priority": priority});
            if a.concurrency_keys > 0 {
                job["concurrency_key"] =
                    format!("bench:{}", i % usize::from(a.concurrency_keys)).into();
            }
            let (http, url) = (http.clone(), url.clone());
            async move {
                let v = if n == 1 {
                    let one = call(http.post(format!("{url}/v1/jobs")).json(&job)).await?;
                    json!({"jobs": [one]})
                } else {
                    let body = json!({"jobs": vec![job; n]});
                    call(http.post(format!("{url}/v1/jobs/batch")).json(&body)).await?
                };
                v["jobs"]
                    .as_array()
                    .context("batch answer without jobs")?
                    .iter()
                    .map(|j| {
                        j["id"]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .context("job without id")
                    })
                    .collect::<anyhow::Result<Vec<Uuid>>>()
            }
        })
        .buffer_unordered(a.concurrency)
        .try_collect()
        .await?;
    let submit_secs = started.elapsed().as_secs_f64();
    let ids: Vec<Uuid> = ids.into_iter().flatten().collect();
    let since = ids.iter().min().copied().context("no jobs submitted")?;
    println!(
        "submitted {} jobs in {submit_secs:.2}s: {:.0} jobs/s ({} per request, {} clients)",
        ids.len(),
        ids.len() as f64 / submit_secs,
        a.batch,
        a.concurrency
    );

    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    loop {
        let stats = call(
            http.get(format!("{url}/v1/stats"))
                .query(&[("since", since.to_string()), ("kind", "probe".into())]),
        )
        .await?;
        let counts: HashMap<String, i64> =
            serde_json::from_value(stats["counts"].clone()).unwrap_or_default();
        let done: i64 = ["succeeded", "dead", "cancelled"]
            .iter()
            .filter_map(|k| counts.get(*k))
            .sum();
        if done as usize >= ids.len() {
            eprintln!();
            break;
        }
        eprint!("\rfinished {done} of {}", ids.len());
        if Instant::now() > deadline {
            bail!(
                "timed out with {done} of {} jobs finished: {counts:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed().as_secs_f64();

    let (mut to_start, mut to_done) = (Vec::new(), Vec::new());
    let (mut first, mut last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("kind", "probe".to_owned()), ("limit", "500".to_owned())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page = call(http.get(format!("{url}/v1/jobs")).query(&q)).await?;
        let jobs = page["jobs"].as_array().cloned().unwrap_or_default();
        for j in &jobs {
            let id: Option<Uuid> = j["id"].as_str().and_then(|s| s.parse().ok());
            if id.is_none_or(|id| id < since) {
                continue;
            }
            let (Some(c), Some(s), Some(f)) = (
                ts(j, "created_at"),
                ts(j, "started_at"),
                ts(j, "finished_at"),
            ) else {
                continue;
            };
            to_start.push((s - c).as_seconds_f64() * 1000.0);
            to_done.push((f - c).as_seconds_f64() * 1000.0);
            first = Some(first.map_or(c, |x| x.min(c)));
            last = Some(last.map_or(f, |x| x.max(f)));
        }
        let older = jobs
            .last()
            .and_then(|j| j["id"].as_str())
            .and_then(|s| s.parse::<Uuid>().ok());
        match (page["next_cursor"].as_str(), older) {
            (Some(c), Some(o)) if o >= since => cursor = Some(c.to_owned()),
            _ => break,
        }
    }
    to_start.sort_by(f64::total_cmp);
    to_done.sort_by(f64::total_cmp);
    let span = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_seconds_f64(),
        _ => f64::NAN,
    };
    println!(
        "end to end: {} jobs in {span:.2}s (first accepted to last finished): {:.0} jobs/s; wall clock incl. polling {wall:.2}s",
        to_done.len(),
        to_done.len() as f64 / span
    );
    println!(
        "submit->start ms: p50 {:.1}  p99 {:.1}   submit->done ms: p50 {:.1}  p99 {:.1}",
        pct(&to_start, 0.5),
        pct(&to_start, 0.99),
        pct(&to_done, 0.5),
        pct(&to_done, 0.99)
    );
    Ok(ids.len())
}
