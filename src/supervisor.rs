//! `stevedore up`: a local supervisor, like `docker compose up --scale`. It
//! starts the API, a dispatcher and N worker processes per pool as children
//! of this binary, prefixes their output with their name, restarts a child
//! that dies with exponential backoff, and on Ctrl-C/SIGTERM asks every child
//! to stop (SIGTERM, so workers drain) before killing what is left.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use backon::{BackoffBuilder, ExponentialBuilder};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One supervised process: its display name and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Parses `probe=2,scrape=1` into pool → process count.
pub fn parse_scale(s: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((pool, n)) = part.split_once('=') else {
            bail!("--scale entries look like pool=N, got {part:?}");
        };
        let n: usize = n
            .parse()
            .with_context(|| format!("--scale {pool}: {n:?} is not a number"))?;
        let pool =
            crate::fleet::parse_pool(pool.trim()).map_err(|e| anyhow::anyhow!("--scale: {e}"))?;
        out.insert(pool, n);
    }
    Ok(out)
}

/// The processes `up` runs: the API (without its embedded dispatcher), one
/// dispatcher, the notifier, and the workers of each pool.
pub fn plan(
    listen: &str,
    scale: &BTreeMap<String, usize>,
    concurrency: usize,
    database_url: &str,
    insecure_no_auth: bool,
) -> Vec<ChildSpec> {
    let env = vec![("DATABASE_URL".to_owned(), database_url.to_owned())];
    let mut api = vec![
        "api".into(),
        "--no-dispatcher".into(),
        "--listen".into(),
        listen.into(),
    ];
    if insecure_no_auth {
        api.push("--insecure-no-auth".into());
    }
    let mut specs = vec![
        ChildSpec {
            name: "api".into(),
            args: api,
            env: env.clone(),
        },
        ChildSpec {
            name: "dispatcher".into(),
            args: vec!["dispatcher".into()],
            env: env.clone(),
        },
        ChildSpec {
            name: "notifier".into(),
            args: vec!["notifier".into()],
            env: env.clone(),
        },
    ];
    for (pool, n) in scale {
        for i in 1..=*n {
            specs.push(ChildSpec {
                name: format!("{pool}-{i}"),
                args: vec![
                    "worker".into(),
                    "--pool".into(),
                    pool.clone(),
                    "--concurrency".into(),
                    concurrency.to_string(),
                ],
                env: env.clone(),
            });
        }
    }
    specs
}

fn forward<R: AsyncRead + Unpin + Send + 'static>(name: String, out: R) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            println!("[{name}] {line}");
        }
    });
}

fn spawn(spec: &ChildSpec) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the stevedore binary")?;
    let mut child = Command::new(exe)
        .args(&spec.args)
        .envs(spec.env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", spec.name))?;
    if let Some(o) = child.stdout.take() {
        forward(spec.name.clone(), o);
    }
    if let Some(e) = child.stderr.take() {
        forward(spec.name.clone(), e);
    }
    Ok(child)
}

/// SIGTERM first so a worker drains; SIGKILL after `grace`.
async fn stop_child(name: &str, child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => println!(
            "[up] {name} stopped ({})",
            status.map(|s| s.to_string()).unwrap_or_default()
        ),
        Err(_) => {
            println!("[up] {name} did not stop within {grace:?}; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Keeps one child alive until `stop`.
async fn keep(spec: ChildSpec, stop: CancellationToken, grace: Duration) {
    // Backoff grows while the child keeps dying young and starts over once
    // it has stayed up a minute, so a crash loop cannot spin the machine.
    let policy = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(30))
            .without_max_times()
            .build()
    };
    let mut backoff = policy();
    while !stop.is_cancelled() {
        let started = Instant::now();
        let mut child = match spawn(&spec) {
            Ok(c) => c,
            Err(e) => {
                println!("[up] {}: {e:#}", spec.name);
                break;
            }
        };
        println!(
            "[up] started {} pid {}",
            spec.name,
            child.id().unwrap_or_default()
        );
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = policy();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                println!("[up] {} exited ({status}); restarting in {delay:?}", spec.name);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {},
                    () = stop.cancelled() => {},
                }
            }
            () = stop.cancelled() => stop_child(&spec.name, &mut child, grace).await,
        }
    }
}

/// Runs `specs` until `stop`, then stops them all and returns.
pub async fn run(specs: Vec<ChildSpec>, stop: CancellationToken, grace: Duration) {
    let tracker = TaskTracker::new();
    for spec in specs {
        tracker.spawn(keep(spec, stop.clone(), grace));
    }
    tracker.close();
    tracker.wait().await;
    println!("[up] all stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_parses_and_plans_one_process_per_worker() {
        let scale = parse_scale("probe=2, scrape=1,analyze=0").expect("valid");
        let names: Vec<String> = plan("127.0.0.1:1", &scale, 8, "postgres://x", false)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "api",
                "dispatcher",
                "notifier",
                "probe-1",
                "probe-2",
                "scrape-1"
            ]
        );
        assert!(parse_scale("probe").is_err());
        assert!(parse_scale("probe=x").is_err());
        let unknown = parse_scale("probe=1,mail=2").expect_err("no such pool");
        assert!(
            unknown.to_string().contains("unknown pool \"mail\""),
            "{unknown}"
        );
    }
}
