//! Assembles the roles of the fleet from a store, brokers and kinds: the
//! API server, the dispatcher, worker pools and the notifier, alone
//! (production roles) or all in one process (`stevedore dev`, tests).
//! Which roles a process runs is `roles.rs`. The process's own listeners
//! are kept out of its scrape jobs' reach ([`own_listeners`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod roles;

use anyhow::Context as _;
use stevedore_netguard::OwnListeners;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::broker::amqp::AmqpBroker;
use crate::broker::embedded::EmbeddedBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, Brokers};
use crate::config::{BackendArgs, BrokerKind, KindsArgs, TimingArgs};
use crate::dispatcher::Dispatcher;
use crate::kinds::Kinds;
use crate::notifier::hub::Hub;
use crate::notifier::Notifier;
use crate::store::events::EventStore;
use crate::store::keys::KeyStore;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::worker::{Worker, WorkerConfig};

/// A store and the brokers that go with it.
#[derive(Clone)]
pub struct Backend {
    pub store: Arc<dyn Store>,
    /// The same database, seen through the notifier's queries.
    pub events: Arc<dyn EventStore>,
    /// The same database's API keys.
    pub keys: Arc<dyn KeyStore>,
    pub brokers: Brokers,
    /// The embedded store's pool, where the analyze kind keeps its shared
    /// rate limits and answer cache when no Redis runs (`None` on Postgres).
    pub sqlite: Option<sqlx::SqlitePool>,
}

impl Backend {
    /// Postgres + Redis, migrated.
    pub async fn production(args: &BackendArgs) -> anyhow::Result<Self> {
        let pg = Arc::new(PgStore::connect(&args.database_url, args.db_pool).await?);
        migrate_with_retry(pg.as_ref()).await?;
        Ok(Self::on_postgres(pg, connect_brokers(args).await?))
    }

    /// A migrated Postgres store and the brokers to use with it.
    pub fn on_postgres(pg: Arc<PgStore>, brokers: Brokers) -> Self {
        Self {
            store: pg.clone(),
            events: pg.clone(),
            keys: pg,
            brokers,
            sqlite: None,
        }
    }

    /// One SQLite file holding jobs and the embedded queue.
    pub async fn embedded(data_dir: &Path, timing: &TimingArgs) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let store = SqliteStore::open(&data_dir.join("stevedore.db")).await?;
        store.migrate().await?;
        let broker = EmbeddedBroker::new(store.pool().clone(), timing.lease());
        let pool = store.pool().clone();
        let store = Arc::new(store);
        Ok(Self {
            store: store.clone(),
            events: store.clone(),
            keys: store,
            brokers: Brokers::new(Arc::new(broker)),
            sqlite: Some(pool),
        })
    }
}

/// Connects the brokers in use (and only those) and routes each pool.
async fn connect_brokers(args: &BackendArgs) -> anyhow::Result<Brokers> {
    let per_pool = args.pool_brokers();
    let used = |k: BrokerKind| args.broker == k || per_pool.iter().any(|(_, b)| *b == k);
    let mut redis: Option<Arc<dyn Broker>> = None;
    let mut amqp: Option<Arc<dyn Broker>> = None;
    if used(BrokerKind::Redis) {
        let r = RedisBroker::connect(
            args.redis_client()?,
            &args.redis_prefix,
            args.timing.lease(),
        )
        .await
        .context("connecting to Redis (REDIS_URL)")?;
        redis = Some(Arc::new(r));
    }
    if used(BrokerKind::Amqp) {
        let a = AmqpBroker::connect(args.amqp_config()?)
            .await
            .context("connecting to RabbitMQ (AMQP_URL)")?;
        amqp = Some(Arc::new(a));
    }
    let pick = |k: BrokerKind| match k {
        BrokerKind::Redis => redis.clone(),
        BrokerKind::Amqp => amqp.clone(),
    };
    let default = pick(args.broker).context("default broker not connected")?;
    let mut brokers = Brokers::new(default);
    for (pool, kind) in per_pool {
        brokers = brokers.with_pool(pool, pick(kind).context("pool broker not connected")?);
    }
    Ok(brokers)
}

/// Applies migrations, waiting for a database that is still starting.
async fn migrate_with_retry(store: &dyn Store) -> anyhow::Result<()> {
    use backon::Retryable;
    (|| store.migrate())
        .retry(
            backon::ExponentialBuilder::default()
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(10),
        )
        .when(|e| matches!(e, crate::store::StoreError::Unavailable(_)))
        .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "Database not ready."))
        .await
        .context("migrating the database")
}

/// Names of every kind (and so of every worker pool).
pub const KIND_NAMES: [&str; 3] = ["analyze", "probe", "scrape"];

/// A worker pool's name, checked when arguments are parsed.
pub fn parse_pool(s: &str) -> Result<String, String> {
    if KIND_NAMES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "unknown pool {s:?}; known: {}",
            KIND_NAMES.join(", ")
        ))
    }
}

/// Where the analyze kind keeps its shared rate limits and answer cache:
/// Redis in production, the SQLite file in dev mode (shared by every process
/// on that file), or this process alone (tests, tools).
pub enum Shared {
    InProcess,
    Sqlite(sqlx::SqlitePool),
    Redis {
        conn: redis::aio::ConnectionManager,
        prefix: String,
    },
}

impl Shared {
    /// The embedded store's file when the backend has one, else in process.
    pub fn local(backend: &Backend) -> Self {
        match &backend.sqlite {
            Some(pool) => Self::Sqlite(pool.clone()),
            None => Self::InProcess,
        }
    }
}

/// One analyze handler per process: its metrics register once, and the
/// local model is loaded once however many fleets a process starts.
static ANALYZE: std::sync::OnceLock<stevedore_analyze::AnalyzeHandler> = std::sync::OnceLock::new();

fn analyze(args: &KindsArgs, shared: Shared) -> anyhow::Result<stevedore_analyze::AnalyzeHandler> {
    use stevedore_analyze::{AnalyzeConfig, AnalyzeHandler, OpenAiConfig, RateLimits};
    if let Some(h) = ANALYZE.get() {
        return Ok(h.clone());
    }
    let openai =
        (args.openai_api_key.is_some() || args.openai_base_url.is_some()).then(|| OpenAiConfig {
            base_url: args
                .openai_base_url
                .clone()
                .unwrap_or_else(|| "https://api.openai.com/v1".into()),
            api_key: args.openai_api_key.clone(),
            model: args.analyze_model.clone(),
            timeout: Duration::from_secs(120),
        });
    let mut cfg = AnalyzeConfig::in_process(openai, &args.local_model);
    cfg.models = args
        .analyze_models
        .iter()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    let limits = RateLimits::per_minute(args.analyze_rpm, args.analyze_tpm);
    let ttl = Duration::from_secs(args.answer_cache_ttl_secs);
    match shared {
        Shared::InProcess => {
            cfg.rate_limiter = Arc::new(stevedore_analyze::MemoryRateLimiter::new(limits));
            cfg.cache = Arc::new(stevedore_analyze::MemoryAnswerCache::new(ttl, 100_000));
        }
        Shared::Sqlite(pool) => {
            use crate::store::sqlite::analyze::{SqliteAnswerCache, SqliteRateLimiter};
            cfg.rate_limiter = Arc::new(SqliteRateLimiter::new(pool.clone(), limits));
            cfg.cache = Arc::new(SqliteAnswerCache::new(pool, ttl));
        }
        Shared::Redis { conn, prefix } => {
            let prefix = format!("{prefix}:analyze:");
            cfg.rate_limiter = Arc::new(stevedore_analyze::RedisRateLimiter::new(
                conn.clone(),
                prefix.clone(),
                limits,
            ));
            cfg.cache = Arc::new(stevedore_analyze::RedisAnswerCache::new(conn, prefix, ttl));
        }
    }
    let h =
        AnalyzeHandler::new(cfg, &crate::metrics::REGISTRY).context("building the analyze kind")?;
    Ok(ANALYZE.get_or_init(|| h).clone())
}

static SCRAPE: std::sync::OnceLock<stevedore_scrape::ScrapeHandler> = std::sync::OnceLock::new();

/// The addresses this process listens on (API, metrics), which its scrape
/// jobs are refused however the allowlist reads: one set per process, like
/// the scrape handler that consults it.
pub fn own_listeners() -> &'static OwnListeners {
    static OWN: std::sync::LazyLock<OwnListeners> = std::sync::LazyLock::new(Default::default);
    &OWN
}

fn scrape(args: &KindsArgs) -> anyhow::Result<stevedore_scrape::ScrapeHandler> {
    if let Some(h) = SCRAPE.get() {
        return Ok(h.clone());
    }
    let mut cfg = stevedore_scrape::ScrapeConfig {
        allow_hosts: args.scrape_allow_hosts.clone(),
        own_listeners: own_listeners().clone(),
        ..Default::default()
    };
    cfg.browser.chrome = args.chrome.clone();
    cfg.browser.max_pages = args.browser_pages;
    let h = stevedore_scrape::ScrapeHandler::new(cfg, &crate::metrics::REGISTRY)
        .context("building the scrape kind")?;
    Ok(SCRAPE.get_or_init(|| h).clone())
}

/// Every kind, configured. Handlers are built once per process (their
/// metrics register once); later calls reuse the first configuration.
pub fn kinds(args: &KindsArgs, shared: Shared) -> anyhow::Result<Kinds> {
    Ok(Kinds::default()
        .register(crate::kinds::probe::Probe::default())
        .register(analyze(args, shared)?)
        .register(scrape(args)?))
}

/// Every kind with default settings and in-process sharing (tests, tools).
pub fn default_kinds() -> Kinds {
    default_kinds_sharing(Shared::InProcess)
}

/// Every kind with default settings, analyze sharing its state through the
/// backend's SQLite file when it has one (tests on the embedded store).
pub fn backend_kinds(backend: &Backend) -> Kinds {
    default_kinds_sharing(Shared::local(backend))
}

/// Default settings; if a kind cannot be built, probe still runs.
fn default_kinds_sharing(shared: Shared) -> Kinds {
    match kinds(&KindsArgs::default(), shared) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "Building the kinds failed; only probe is available.");
            Kinds::default().register(crate::kinds::probe::Probe::default())
        }
    }
}

/// Kinds for a production role: analyze shares its limits through Redis.
pub async fn production_kinds(args: &KindsArgs, backend: &BackendArgs) -> anyhow::Result<Kinds> {
    let conn = crate::connect::redis_manager(backend.redis_client()?)
        .await
        .context("connecting to Redis for the analyze rate limits and cache")?;
    kinds(
        args,
        Shared::Redis {
            conn,
            prefix: backend.redis_prefix.clone(),
        },
    )
}

pub use roles::{api_role, ApiRole, Roles};

/// A running set of roles; `stop` drains them and waits.
pub struct Running {
    pub addr: Option<SocketAddr>,
    pub stop: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

pub async fn start(backend: Backend, kinds: Kinds, roles: Roles) -> anyhow::Result<Running> {
    // Before any worker starts, so no scrape job runs while these are still
    // reachable. A port-0 listener is added once bound: nothing listens on
    // its port before that.
    let listens = roles.api.as_ref().map(|a| a.listen).into_iter();
    for addr in listens.chain(roles.metrics).filter(|a| a.port() != 0) {
        own_listeners().add(addr);
    }
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut wake = None;
    if let Some(cfg) = roles.dispatcher.clone() {
        let d = Dispatcher::new(backend.store.clone(), backend.brokers.clone(), cfg);
        wake = Some(d.waker());
        tracker.spawn(d.run(stop.clone()));
    }
    for (pool, concurrency) in &roles.workers {
        let mut cfg = WorkerConfig::new(pool, *concurrency);
        cfg.lease = roles.timing.lease();
        cfg.heartbeat = roles.timing.heartbeat();
        cfg.grace = roles.timing.grace();
        cfg.check()?;
        let w = Worker::new(
            backend.store.clone(),
            backend.brokers.for_pool(pool).clone(),
            kinds.clone(),
            cfg,
        );
        let s = stop.clone();
        tracker.spawn(async move {
            if let Err(e) = w.run(s).await {
                tracing::error!(error = %e, "Worker stopped with an error.");
            }
        });
    }
    if let Some(listen) = roles.metrics {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the metrics listener {listen}"))?;
        own_listeners().add(listener.local_addr()?);
        let s = stop.clone();
        tracker.spawn(async move {
            let res = axum::serve(listener, api::metrics_router())
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "Metrics server failed.");
            }
        });
    }
    let mut hub_wake = None;
    let mut hub = None;
    if roles.api.is_some() {
        // A database that is down must not stop the API from starting (it
        // answers 503 meanwhile): the hub then reads the cursor later.
        let position = backend.events.cursor().await.ok();
        let h = Hub::new(position, roles.notify.stream_buffer);
        hub_wake = Some(h.wake.clone());
        let poll = Duration::from_millis(roles.notify.notifier_poll_ms.max(1));
        tracker.spawn(h.clone().run(backend.events.clone(), poll, stop.clone()));
        hub = Some(h);
    }
    if roles.notifier {
        let cfg = roles.notify.notifier_config()?;
        let n = Notifier::new(backend.events.clone(), cfg, hub_wake);
        tracker.spawn(n.run(stop.clone()));
    }
    let mut addr = None;
    if let (Some(api), Some(hub)) = (roles.api, hub) {
        let listener = TcpListener::bind(api.listen)
            .await
            .with_context(|| format!("binding {}", api.listen))?;
        let bound = listener.local_addr()?;
        own_listeners().add(bound);
        addr = Some(bound);
        let state = AppState {
            store: backend.store.clone(),
            kinds: kinds.clone(),
            brokers: backend.brokers.clone(),
            wake,
            events: backend.events.clone(),
            hub,
            webhooks: roles.notify.webhook_config()?,
            shutdown: stop.clone(),
            access: api.access,
            allowed_origins: api.allowed_origins.into(),
            metrics_token: api.metrics_token.map(Into::into),
            limits: api.limits,
        };
        let app = api::router(state);
        let s = stop.clone();
        tracker.spawn(async move {
            let res = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "API server failed.");
            }
        });
    }
    Ok(Running {
        addr,
        stop,
        tracker,
    })
}
