//! The `stevedore` binary: one subcommand per role of the fleet, plus the
//! operator CLI.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use stevedore::cli::notify::WebhooksCommand;
use stevedore::cli::{self, DlqCommand};
use stevedore::config;
use stevedore::config::{
    AccessArgs, BackendArgs, ClientArgs, DeprecatedArgs, KindsArgs, LogFormat, NotifyArgs,
    TimingArgs,
};
use stevedore::dispatcher::DispatcherConfig;
use stevedore::fleet::{self, ApiRole, Backend, Roles};
use stevedore::kinds::Kinds;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "stevedore",
    version,
    about = "Queue-driven job fleet: scrape quiz pages, analyze their questions."
)]
struct Cli {
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process on an SQLite file: API, dispatcher, every pool. No services needed.
    Dev {
        #[command(flatten)]
        kinds: KindsArgs,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = ".stevedore")]
        data_dir: PathBuf,
        /// Concurrency of each worker pool.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Submit a demo job once the fleet is up and print how it ends.
        #[arg(long)]
        demo: bool,
        #[command(flatten)]
        timing: TimingArgs,
        #[command(flatten)]
        notify: NotifyArgs,
        #[command(flatten)]
        deprecated: DeprecatedArgs,
    },
    /// The HTTP API (with an embedded dispatcher unless --no-dispatcher).
    Api {
        #[command(flatten)]
        kinds: KindsArgs,
        #[arg(long, env = "STEVEDORE_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        #[arg(long)]
        no_dispatcher: bool,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        notify: NotifyArgs,
        #[command(flatten)]
        access: Box<AccessArgs>,
        #[command(flatten)]
        deprecated: DeprecatedArgs,
    },
    /// Streams events to the API processes' clients and delivers webhooks.
    Notifier {
        /// Serve /metrics and /healthz on this address.
        #[arg(long, env = "STEVEDORE_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        notify: NotifyArgs,
        #[command(flatten)]
        deprecated: DeprecatedArgs,
    },
    /// One worker pool process.
    Worker {
        #[command(flatten)]
        kinds: KindsArgs,
        #[arg(long, value_parser = fleet::parse_pool)]
        pool: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Serve /metrics and /healthz on this address.
        #[arg(long, env = "STEVEDORE_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        deprecated: DeprecatedArgs,
    },
    /// Outbox relay, lease rescue and lost-message repair.
    Dispatcher {
        /// Serve /metrics and /healthz on this address.
        #[arg(long, env = "STEVEDORE_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Submit a job.
    #[command(after_help = "Examples:\n  \
        stevedore submit probe --payload '{\"sleep_ms\": 200}' --wait\n  \
        stevedore submit scrape --payload '{\"url\": \"https://quiz.example/1\", \"then\": {\"kind\": \"analyze\"}}' --wait --timeout 120\n  \
        STEVEDORE_URL=https://stevedore.example STEVEDORE_API_KEY=sk_... stevedore submit probe")]
    Submit {
        /// The job kind: probe, scrape or analyze.
        kind: String,
        /// The job's payload, as JSON.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// -100..=100; higher runs first (default 0).
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Wait until the job finishes, showing its state as it changes, and print it.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit 2) after this many seconds; the job goes on.
        #[arg(long, requires = "wait")]
        timeout: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a job.
    Status {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job, or every active job of a kind and/or status.
    Cancel {
        id: Option<String>,
        /// Every active job of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Every job in this state: queued, retrying or running.
        #[arg(long)]
        status: Option<String>,
        /// Every active job with this concurrency key.
        #[arg(long)]
        concurrency_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inspect and replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// See each pool's depth and workers; pause and resume pools.
    Pools {
        #[command(subcommand)]
        command: cli::pools::PoolsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Concurrency limits: how many jobs of one key run at once, fleet-wide.
    Limits {
        #[command(subcommand)]
        command: cli::limits::LimitsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cron schedules: jobs submitted on a timetable.
    Schedules {
        #[command(subcommand)]
        command: cli::schedules::SchedulesCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run api, dispatcher and N workers per pool as child processes (like compose --scale).
    Up {
        /// Worker processes per pool, e.g. probe=2,scrape=1,analyze=2.
        #[arg(long, default_value = "probe=1")]
        scale: String,
        #[arg(long, env = "STEVEDORE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Concurrency of each worker process.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// How long children get to drain after SIGTERM before they are killed.
        #[arg(long, default_value_t = 30)]
        grace_secs: u64,
        /// Checked here so a missing URL fails once instead of in every child.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Start the API without keys (see `stevedore api --help`).
        #[arg(long)]
        insecure_no_auth: bool,
    },
    /// Create, list and revoke API keys (in the database at DATABASE_URL).
    Keys {
        #[command(subcommand)]
        command: cli::keys::KeysCommand,
        #[command(flatten)]
        args: cli::keys::KeysArgs,
    },
    /// Follow job events as they happen (reconnects and resumes by itself).
    Watch {
        #[arg(long)]
        kind: Option<String>,
        /// A job id (repeatable); its children's events are included.
        #[arg(long = "job")]
        jobs: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Register and inspect webhooks and their deliveries.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Submit probe jobs through the API and measure throughput and latency.
    Bench(cli::bench::BenchArgs),
    /// Scrape the embedded Moodle page over HTTP, in the warm browser pool
    /// and in a fresh browser per page; report pages/s and load latency.
    BenchScrape(cli::bench_scrape::BenchScrapeArgs),
    /// Score the analyze provider in use on a labelled question set; report
    /// accuracy (overall, per language and subject) and seconds per question.
    BenchAnalyze(cli::bench_analyze::BenchAnalyzeArgs),
    /// Check configuration, Postgres, brokers, Chromium and the model; say how to fix what is wrong.
    Doctor(cli::doctor::DoctorArgs),
}

impl Command {
    /// The role this command runs, which names its service in traces; the
    /// CLI commands export none.
    fn role(&self) -> Option<&'static str> {
        match self {
            Command::Dev { .. } => Some("dev"),
            Command::Api { .. } => Some("api"),
            Command::Worker { .. } => Some("worker"),
            Command::Notifier { .. } => Some("notifier"),
            Command::Dispatcher { .. } => Some("dispatcher"),
            _ => None,
        }
    }
}

/// Cancels on SIGTERM or Ctrl-C.
fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot listen for SIGTERM.");
                        let _ = ctrl_c.await;
                        s.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("Stop signal received.");
        s.cancel();
    });
    stop
}

async fn run_roles(backend: Backend, kinds: Kinds, roles: Roles) -> anyhow::Result<()> {
    stevedore::metrics::init();
    let running = fleet::start(backend, kinds, roles).await?;
    if let Some(addr) = running.addr {
        tracing::info!(%addr, "API listening.");
    }
    let stop = stop_on_signal();
    let inner = running.stop.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        inner.cancel();
    });
    running.wait().await;
    Ok(())
}

fn dispatcher_cfg(t: &TimingArgs) -> DispatcherConfig {
    DispatcherConfig {
        lost_after: t.lost_after(),
        retain_succeeded: t.retain_succeeded,
        retain_dead: t.retain_dead,
        ..DispatcherConfig::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut matches = config::empty_env_is_unset(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches_mut(&mut matches)
        .unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let telemetry = stevedore::telemetry::init(cli.log_format, cli.command.role());
    let res = run(cli.command).await;
    telemetry.shutdown().await;
    res
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            mut kinds,
            listen,
            data_dir,
            concurrency,
            demo,
            timing,
            mut notify,
            deprecated,
        } => {
            anyhow::ensure!(
                listen.ip().is_loopback(),
                "stevedore dev serves without API keys, so it listens on loopback only \
                 (127.0.0.1 or [::1]); run `stevedore api` with keys to serve a network"
            );
            deprecated.apply(&mut [
                &mut kinds.scrape_allow_hosts,
                &mut notify.webhook_allow_hosts,
            ]);
            // No key set: one generated beside the SQLite file, so dev mode
            // seals webhook secrets with no setting at all.
            notify.keys.or_dev_file(&data_dir)?;
            let backend = Backend::embedded(&data_dir, &timing).await?;
            if demo {
                // The quiz pages get a loopback listener of their own and
                // only it is allowlisted: scraping never reaches the API.
                let pages = cli::demo_pages::serve(listen.ip()).await?;
                kinds.scrape_allow_hosts =
                    config::join_allowlists(&kinds.scrape_allow_hosts, &pages.to_string());
                tokio::spawn(cli::demo(
                    format!("http://{listen}"),
                    format!("http://{pages}"),
                ));
            }
            eprintln!(
                "stevedore dev: API and display on http://{listen}  (data in {})\n  try: stevedore submit probe --payload '{{\"sleep_ms\": 200}}' --wait",
                data_dir.display()
            );
            let workers = fleet::KIND_NAMES
                .into_iter()
                .map(|k| (k.to_owned(), concurrency))
                .collect();
            let roles = Roles::new(timing.clone())
                .with_api(ApiRole::open(listen))
                .with_dispatcher(dispatcher_cfg(&timing))
                .with_workers(workers)
                .with_notifier()
                .with_notify(notify);
            let kinds = fleet::kinds(&kinds, fleet::Shared::local(&backend))?;
            run_roles(backend, kinds, roles).await
        }
        Command::Api {
            mut kinds,
            listen,
            no_dispatcher,
            backend,
            mut notify,
            access,
            deprecated,
        } => {
            deprecated.apply(&mut [
                &mut kinds.scrape_allow_hosts,
                &mut notify.webhook_allow_hosts,
            ]);
            let b = Backend::production(&backend).await?;
            let api = fleet::api_role(listen, &access, &b, &backend).await?;
            let mut roles = Roles::new(backend.timing.clone())
                .with_api(api)
                .with_notify(notify);
            if !no_dispatcher {
                roles = roles.with_dispatcher(dispatcher_cfg(&backend.timing));
            }
            run_roles(b, fleet::production_kinds(&kinds, &backend).await?, roles).await
        }
        Command::Worker {
            mut kinds,
            pool,
            concurrency,
            metrics_listen,
            backend,
            deprecated,
        } => {
            deprecated.apply(&mut [&mut kinds.scrape_allow_hosts]);
            let roles = Roles::new(backend.timing.clone())
                .with_workers(vec![(pool, concurrency)])
                .with_metrics(metrics_listen);
            run_roles(
                Backend::production(&backend).await?,
                fleet::production_kinds(&kinds, &backend).await?,
                roles,
            )
            .await
        }
        Command::Notifier {
            metrics_listen,
            backend,
            mut notify,
            deprecated,
        } => {
            deprecated.apply(&mut [&mut notify.webhook_allow_hosts]);
            let roles = Roles::new(backend.timing.clone())
                .with_notifier()
                .with_notify(notify)
                .with_metrics(metrics_listen);
            run_roles(
                Backend::production(&backend).await?,
                Kinds::default(),
                roles,
            )
            .await
        }
        Command::Dispatcher {
            metrics_listen,
            backend,
        } => {
            let roles = Roles::new(backend.timing.clone())
                .with_dispatcher(dispatcher_cfg(&backend.timing))
                .with_metrics(metrics_listen);
            run_roles(
                Backend::production(&backend).await?,
                Kinds::default(),
                roles,
            )
            .await
        }
        Command::Migrate { backend } => {
            Backend::production(&backend).await.context("migrate")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Submit {
            kind,
            payload,
            priority,
            wait,
            timeout,
            client,
        } => {
            let wait = wait.then(|| timeout.map(std::time::Duration::from_secs));
            cli::submit(&client, &kind, &payload, priority, wait).await
        }
        Command::Status { id, client } => cli::status(&client, &id).await,
        Command::Dlq { command, client } => cli::dlq(&client, command).await,
        Command::Cancel {
            id,
            kind,
            status,
            concurrency_key,
            client,
        } => {
            let filter = [
                ("kind", kind.as_deref()),
                ("status", status.as_deref()),
                ("concurrency_key", concurrency_key.as_deref()),
            ];
            cli::cancel(&client, id.as_deref(), &filter).await
        }
        Command::Pools { command, client } => cli::pools::run(&client, command).await,
        Command::Schedules { command, client } => cli::schedules::run(&client, command).await,
        Command::Limits { command, client } => cli::limits::run(&client, command).await,
        Command::Up {
            scale,
            listen,
            concurrency,
            grace_secs,
            database_url,
            insecure_no_auth,
        } => {
            let scale = stevedore::supervisor::parse_scale(&scale)?;
            let specs = stevedore::supervisor::plan(
                &listen,
                &scale,
                concurrency,
                &database_url,
                insecure_no_auth,
            );
            let stop = stop_on_signal();
            stevedore::supervisor::run(specs, stop, std::time::Duration::from_secs(grace_secs))
                .await;
            Ok(())
        }
        Command::Watch { kind, jobs, client } => cli::notify::watch(&client, kind, jobs).await,
        Command::Webhooks { command, client } => cli::notify::webhooks(&client, command).await,
        Command::Keys { command, args } => cli::keys::run(&args, command).await,
        Command::Bench(args) => cli::bench::run(args).await,
        Command::BenchScrape(args) => cli::bench_scrape::run(args).await,
        Command::BenchAnalyze(args) => cli::bench_analyze::run(args).await,
        Command::Doctor(args) => cli::doctor::run(args).await,
    }
}
