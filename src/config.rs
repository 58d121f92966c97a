//! Configuration, parsed once at start by clap from flags and environment.
//! An empty variable (`OPENAI_API_KEY=`) counts as unset everywhere
//! ([`empty_env_is_unset`], [`env_setting`]), so the default applies.
//!
//! Environment variables (each also a flag):
//! - `DATABASE_URL`: Postgres URL for `api`, `worker`, `dispatcher`, `migrate`.
//! - `REDIS_URL` (default `redis://127.0.0.1:6379`; `rediss://` for TLS),
//!   `STEVEDORE_REDIS_CA_FILE` (a PEM CA to trust for `rediss://` instead of
//!   the system's), `STEVEDORE_REDIS_PREFIX` (default `stevedore`): the Redis
//!   broker, the analyze kind's shared limits and the API keys' rates.
//! - `STEVEDORE_BROKER` (`redis` or `amqp`, default `redis`) and per pool
//!   `STEVEDORE_BROKER_PROBE`, `STEVEDORE_BROKER_SCRAPE`,
//!   `STEVEDORE_BROKER_ANALYZE`; `AMQP_URL` (default
//!   `amqp://guest:guest@127.0.0.1:5672/%2f`; `amqps://` for TLS),
//!   `STEVEDORE_AMQP_CA_FILE` (a PEM CA to trust for `amqps://` besides the
//!   system's), `STEVEDORE_AMQP_PREFIX`, `STEVEDORE_AMQP_QUORUM`: the
//!   RabbitMQ broker.
//! - TLS to Postgres is in `DATABASE_URL` itself: `sslmode=verify-full` and
//!   `sslrootcert=<CA file>` (see [`crate::connect`]).
//! - `STEVEDORE_DB_POOL`: Postgres connections per process (default 16).
//! - `STEVEDORE_LEASE_SECS` (30), `STEVEDORE_HEARTBEAT_SECS` (5),
//!   `STEVEDORE_GRACE_SECS` (20): worker leases and shutdown.
//! - `STEVEDORE_LOST_AFTER_SECS` (120): when the dispatcher re-sends a job
//!   the broker seems to have lost.
//! - `OPENAI_BASE_URL`, `OPENAI_API_KEY`, `STEVEDORE_ANALYZE_MODEL`,
//!   `STEVEDORE_LOCAL_MODEL`, `STEVEDORE_ANALYZE_RPM`, `STEVEDORE_ANALYZE_TPM`,
//!   `STEVEDORE_ANSWER_CACHE_TTL_SECS`: the analyze kind.
//! - `STEVEDORE_URL` (default `http://127.0.0.1:8080`): the API the CLI talks to.
//! - `STEVEDORE_LOG` (default `info`): tracing filter; `--log-format json` for JSON logs.
//! - Notifier, stream and webhooks ([`NotifyArgs`]): `STEVEDORE_WEBHOOK_SECRET`
//!   (`whsec_...`, the root each tenant's signing secret is derived from,
//!   for job webhooks that bring no secret),
//!   `STEVEDORE_WEBHOOK_KEY` / `STEVEDORE_WEBHOOK_KEY_FILE` (base64 of 32
//!   bytes: seals webhook secrets at rest; `stevedore dev` makes
//!   `<data dir>/webhook.key` when unset), `STEVEDORE_WEBHOOK_KEY_PREVIOUS` /
//!   `STEVEDORE_WEBHOOK_KEY_PREVIOUS_FILE` (still opens secrets during a
//!   rotation), `STEVEDORE_WEBHOOK_MAX_PER_TENANT` (100 endpoints),
//!   `STEVEDORE_WEBHOOK_SCHEDULE` (default `5s,5m,30m,2h,5h,10h,10h`),
//!   `STEVEDORE_WEBHOOK_TIMEOUT_SECS` (10), `STEVEDORE_WEBHOOK_CONCURRENCY`
//!   (8 per receiving host), `STEVEDORE_WEBHOOK_MAX_INFLIGHT` (256),
//!   `STEVEDORE_WEBHOOK_ALLOW_HOSTS` (`host:port,...` webhook receivers let
//!   through the SSRF guard although internal),
//!   `STEVEDORE_EVENT_RETENTION_HOURS` (168), `STEVEDORE_NOTIFIER_POLL_MS`
//!   (100), `STEVEDORE_STREAM_BUFFER` (1024 events per stream client).
//! - `STEVEDORE_SCRAPE_ALLOW_HOSTS` (`host:port,...`): pages scraping may
//!   load although internal. Entries match the URL's literal host and port;
//!   the process's own API and metrics listeners are refused regardless.
//! - Deprecated ([`DeprecatedArgs`]): `STEVEDORE_ALLOW_HOSTS` counts for both
//!   allowlists above, with a warning at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Command, ValueEnum};

use crate::broker::amqp::AmqpConfig;
use crate::model::secret::Secret;
use crate::notifier::guard::NetGuard;
use crate::notifier::keyring::Keyring;
use crate::notifier::{NotifierConfig, WebhookConfig};

/// Clap takes an empty variable as a value: an empty API key that switches
/// analyze to a remote provider, a number that fails to parse. Shells and
/// compose files write `NAME=` to mean "no value", so this drops the
/// environment source of every argument (in `cmd` and its subcommands)
/// whose variable is set but empty; its default, or nothing, applies.
pub fn empty_env_is_unset(cmd: Command) -> Command {
    cmd.mut_args(|arg| {
        let empty = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|v| v.is_empty());
        if empty {
            arg.env(None::<&'static str>)
        } else {
            arg
        }
    })
    .mut_subcommands(empty_env_is_unset)
}

/// A setting read from the environment outside clap, empty counting as
/// unset like every other setting.
pub fn env_setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Which broker carries a pool's job ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    Redis,
    Amqp,
}

impl BackendArgs {
    /// The Redis client, with `STEVEDORE_REDIS_CA_FILE` when it is set.
    pub fn redis_client(&self) -> anyhow::Result<redis::Client> {
        crate::connect::redis_client(&self.redis_url, self.redis_ca_file.as_deref())
    }

    /// The RabbitMQ broker's settings, with `STEVEDORE_AMQP_CA_FILE`.
    pub fn amqp_config(&self) -> anyhow::Result<AmqpConfig> {
        Ok(AmqpConfig {
            url: self.amqp_url.clone(),
            prefix: self.amqp_prefix.clone(),
            quorum: self.amqp_quorum,
            tls: crate::connect::amqp_tls(&self.amqp_url, self.amqp_ca_file.as_deref())?,
        })
    }

    /// The broker of each pool that has its own setting; the rest use `broker`.
    pub fn pool_brokers(&self) -> Vec<(&'static str, BrokerKind)> {
        [
            ("probe", self.broker_probe),
            ("scrape", self.broker_scrape),
            ("analyze", self.broker_analyze),
        ]
        .into_iter()
        .filter_map(|(p, b)| Some((p, b?)))
        .collect()
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Who the API lets in: API keys (hashed under the auth secret), or no
/// keys at all when started with `--insecure-no-auth`.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// Serve without API keys: anyone who can reach the port may do
    /// anything. For a trusted network only; a warning is logged at start.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// The secret API keys are hashed under (at least 32 bytes).
    #[arg(long, env = "STEVEDORE_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// A file holding the auth secret (e.g. a mounted secret).
    #[arg(long, env = "STEVEDORE_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<std::path::PathBuf>,
    /// Origins besides the API's own that may open the event streams
    /// (comma-separated, e.g. https://dash.example.com).
    #[arg(long, env = "STEVEDORE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// When set, `/metrics` needs `Authorization: Bearer <token>`.
    #[arg(long, env = "STEVEDORE_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// A request (streams aside) still running after this many seconds is
    /// answered 503.
    #[arg(long, env = "STEVEDORE_API_TIMEOUT_SECS", default_value_t = 30.0)]
    pub api_timeout_secs: f64,
    /// Requests in flight (streams aside) past which new ones get 503 with
    /// Retry-After at once.
    #[arg(long, env = "STEVEDORE_API_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub api_max_in_flight: usize,
}

impl AccessArgs {
    pub fn secret(&self) -> anyhow::Result<Option<crate::auth::AuthSecret>> {
        crate::auth::AuthSecret::from_settings(
            self.auth_secret.as_deref(),
            self.auth_secret_file.as_deref(),
        )
    }
}

/// Where jobs and queues live in production.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Postgres URL, the source of truth.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, env = "STEVEDORE_DB_POOL", default_value_t = 16)]
    pub db_pool: u32,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// A PEM file of the CA that signed Redis's certificate (`rediss://`),
    /// trusted instead of the system's CAs.
    #[arg(long, env = "STEVEDORE_REDIS_CA_FILE", value_parser = path_or_empty)]
    pub redis_ca_file: Option<PathBuf>,
    /// Key prefix for every Redis key, so deployments can share a server.
    #[arg(long, env = "STEVEDORE_REDIS_PREFIX", default_value = "stevedore")]
    pub redis_prefix: String,
    /// The broker of every pool without its own setting.
    #[arg(long, env = "STEVEDORE_BROKER", value_enum, default_value = "redis")]
    pub broker: BrokerKind,
    #[arg(long, env = "STEVEDORE_BROKER_PROBE", value_enum)]
    pub broker_probe: Option<BrokerKind>,
    #[arg(long, env = "STEVEDORE_BROKER_SCRAPE", value_enum)]
    pub broker_scrape: Option<BrokerKind>,
    #[arg(long, env = "STEVEDORE_BROKER_ANALYZE", value_enum)]
    pub broker_analyze: Option<BrokerKind>,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// A PEM file of a CA to trust for RabbitMQ (`amqps://`), besides the
    /// system's CAs.
    #[arg(long, env = "STEVEDORE_AMQP_CA_FILE", value_parser = path_or_empty)]
    pub amqp_ca_file: Option<PathBuf>,
    /// Prefix of every RabbitMQ queue and exchange name.
    #[arg(long, env = "STEVEDORE_AMQP_PREFIX", default_value = "stevedore")]
    pub amqp_prefix: String,
    /// Declare quorum queues instead of classic durable ones.
    #[arg(long, env = "STEVEDORE_AMQP_QUORUM", default_value_t = false)]
    pub amqp_quorum: bool,
    #[command(flatten)]
    pub timing: TimingArgs,
}

/// Leases, heartbeats and repair delays.
#[derive(Debug, Clone, Args)]
pub struct TimingArgs {
    #[arg(long, env = "STEVEDORE_LEASE_SECS", default_value_t = 30.0)]
    pub lease_secs: f64,
    #[arg(long, env = "STEVEDORE_HEARTBEAT_SECS", default_value_t = 5.0)]
    pub heartbeat_secs: f64,
    #[arg(long, env = "STEVEDORE_GRACE_SECS", default_value_t = 20.0)]
    pub grace_secs: f64,
    #[arg(long, env = "STEVEDORE_LOST_AFTER_SECS", default_value_t = 120.0)]
    pub lost_after_secs: f64,
    /// How long succeeded and cancelled jobs are kept after they end
    /// (e.g. 7d, 12h, 90m).
    #[arg(long, env = "STEVEDORE_RETAIN_SUCCEEDED", default_value = "7d", value_parser = parse_duration)]
    pub retain_succeeded: Duration,
    /// How long dead jobs are kept after they died.
    #[arg(long, env = "STEVEDORE_RETAIN_DEAD", default_value = "30d", value_parser = parse_duration)]
    pub retain_dead: Duration,
}

impl Default for TimingArgs {
    fn default() -> Self {
        Self {
            lease_secs: 30.0,
            heartbeat_secs: 5.0,
            grace_secs: 20.0,
            lost_after_secs: 120.0,
            retain_succeeded: crate::dispatcher::RETAIN_SUCCEEDED,
            retain_dead: crate::dispatcher::RETAIN_DEAD,
        }
    }
}

/// A file setting that may be set but empty, as compose passes a variable
/// the env file leaves unset; empty means none (see
/// [`crate::connect`]). clap's own path parser refuses an empty value.
pub(crate) fn path_or_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

pub(crate) fn secs(v: f64) -> Duration {
    Duration::try_from_secs_f64(v.max(0.0)).unwrap_or(Duration::MAX)
}

impl TimingArgs {
    pub fn lease(&self) -> Duration {
        secs(self.lease_secs)
    }
    pub fn heartbeat(&self) -> Duration {
        secs(self.heartbeat_secs)
    }
    pub fn grace(&self) -> Duration {
        secs(self.grace_secs)
    }
    pub fn lost_after(&self) -> Duration {
        secs(self.lost_after_secs)
    }
}

/// What the job kinds need: the analyze providers and their limits.
#[derive(Debug, Clone, Args)]
pub struct KindsArgs {
    /// An OpenAI-compatible endpoint (OpenAI, Azure, vLLM, Ollama, llama.cpp
    /// server). With neither this nor a key, analyze uses the local model.
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    #[arg(long, env = "STEVEDORE_ANALYZE_MODEL", default_value = "gpt-4o-mini")]
    pub analyze_model: String,
    /// Other models a job may name in `payload.model` (comma-separated);
    /// any other name is refused at submit (422, field `payload.model`).
    #[arg(long, env = "STEVEDORE_ANALYZE_MODELS", value_delimiter = ',')]
    pub analyze_models: Vec<String>,
    /// The GGUF file of the local provider (scripts/fetch-model.sh gets it).
    #[arg(long, env = "STEVEDORE_LOCAL_MODEL", default_value = stevedore_analyze::DEFAULT_LOCAL_MODEL)]
    pub local_model: std::path::PathBuf,
    /// Requests and tokens per minute per provider and model, shared by
    /// every analyze worker.
    #[arg(long, env = "STEVEDORE_ANALYZE_RPM", default_value_t = 500)]
    pub analyze_rpm: u64,
    #[arg(long, env = "STEVEDORE_ANALYZE_TPM", default_value_t = 200_000)]
    pub analyze_tpm: u64,
    #[arg(long, env = "STEVEDORE_ANSWER_CACHE_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    pub answer_cache_ttl_secs: u64,
    /// `host:port` pairs scraping may reach although they are internal,
    /// matched on the URL's literal host and port.
    #[arg(long, env = "STEVEDORE_SCRAPE_ALLOW_HOSTS", default_value = "")]
    pub scrape_allow_hosts: String,
    /// The Chromium executable for `render: browser` (Debian's package).
    #[arg(long, env = "CHROME", default_value = "/usr/bin/chromium")]
    pub chrome: std::path::PathBuf,
    /// Browser pages open at once per scrape worker process.
    #[arg(long, env = "STEVEDORE_BROWSER_PAGES", default_value_t = 4)]
    pub browser_pages: usize,
}

impl Default for KindsArgs {
    fn default() -> Self {
        Self {
            openai_base_url: None,
            openai_api_key: None,
            analyze_model: "gpt-4o-mini".into(),
            analyze_models: vec![],
            local_model: stevedore_analyze::DEFAULT_LOCAL_MODEL.into(),
            analyze_rpm: 500,
            analyze_tpm: 200_000,
            answer_cache_ttl_secs: 7 * 24 * 3600,
            scrape_allow_hosts: String::new(),
            chrome: "/usr/bin/chromium".into(),
            browser_pages: 4,
        }
    }
}

/// The API address for CLI commands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    #[arg(
        long,
        env = "STEVEDORE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The API key to send (`Authorization: Bearer`).
    #[arg(long, env = "STEVEDORE_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The key webhook secrets are sealed under at rest (see
/// [`crate::notifier::keyring`]).
#[derive(Debug, Clone, Default, Args)]
pub struct WebhookKeyArgs {
    /// Base64 of 32 random bytes (`openssl rand -base64 32`). Unset: secrets
    /// are stored in plain text (a warning says so at start).
    #[arg(long, env = "STEVEDORE_WEBHOOK_KEY", hide_env_values = true)]
    pub webhook_key: Option<String>,
    /// A file holding the webhook key.
    #[arg(long, env = "STEVEDORE_WEBHOOK_KEY_FILE", value_parser = path_or_empty)]
    pub webhook_key_file: Option<PathBuf>,
    /// The key before the current one: still opens secrets until
    /// `stevedore webhooks rotate-key` has re-encrypted them.
    #[arg(long, env = "STEVEDORE_WEBHOOK_KEY_PREVIOUS", hide_env_values = true)]
    pub webhook_key_previous: Option<String>,
    #[arg(long, env = "STEVEDORE_WEBHOOK_KEY_PREVIOUS_FILE", value_parser = path_or_empty)]
    pub webhook_key_previous_file: Option<PathBuf>,
}

impl WebhookKeyArgs {
    pub fn keyring(&self) -> anyhow::Result<Keyring> {
        Keyring::from_settings(
            self.webhook_key.as_deref(),
            self.webhook_key_file.as_deref(),
            self.webhook_key_previous.as_deref(),
            self.webhook_key_previous_file.as_deref(),
        )
    }

    /// Whether a current key is set (as a value or a file).
    pub fn is_set(&self) -> bool {
        self.webhook_key.as_deref().is_some_and(|k| !k.is_empty())
            || self
                .webhook_key_file
                .as_deref()
                .is_some_and(|p| !p.as_os_str().is_empty())
    }

    /// `stevedore dev` with no key set: the generated key file in the data
    /// directory, so dev mode seals secrets without any setting.
    pub fn or_dev_file(&mut self, data_dir: &std::path::Path) -> anyhow::Result<()> {
        if !self.is_set() {
            self.webhook_key_file = Some(crate::notifier::keyring::dev_key_file(data_dir)?);
        }
        Ok(())
    }
}

/// The notifier, the event stream and webhook delivery.
#[derive(Debug, Clone, Args)]
pub struct NotifyArgs {
    /// Tenants' signing secrets for job webhooks without a secret of their
    /// own are derived from it; it signs nothing itself.
    #[arg(long, env = "STEVEDORE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    #[command(flatten)]
    pub keys: WebhookKeyArgs,
    /// Registered webhook endpoints per tenant.
    #[arg(long, env = "STEVEDORE_WEBHOOK_MAX_PER_TENANT", default_value_t = 100)]
    pub webhook_max_per_tenant: usize,
    #[arg(
        long,
        env = "STEVEDORE_WEBHOOK_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h,10h"
    )]
    pub webhook_schedule: String,
    #[arg(long, env = "STEVEDORE_WEBHOOK_TIMEOUT_SECS", default_value_t = 10.0)]
    pub webhook_timeout_secs: f64,
    /// Deliveries in flight per receiving host (all its URLs together).
    #[arg(long, env = "STEVEDORE_WEBHOOK_CONCURRENCY", default_value_t = 8)]
    pub webhook_concurrency: usize,
    #[arg(long, env = "STEVEDORE_WEBHOOK_MAX_INFLIGHT", default_value_t = 256)]
    pub webhook_max_inflight: usize,
    /// `host:port` pairs webhooks may reach although they are internal,
    /// matched on the URL's literal host and port.
    #[arg(long, env = "STEVEDORE_WEBHOOK_ALLOW_HOSTS", default_value = "")]
    pub webhook_allow_hosts: String,
    #[arg(long, env = "STEVEDORE_EVENT_RETENTION_HOURS", default_value_t = 168.0)]
    pub event_retention_hours: f64,
    #[arg(long, env = "STEVEDORE_NOTIFIER_POLL_MS", default_value_t = 100)]
    pub notifier_poll_ms: u64,
    #[arg(long, env = "STEVEDORE_STREAM_BUFFER", default_value_t = 1024)]
    pub stream_buffer: usize,
}

impl Default for NotifyArgs {
    fn default() -> Self {
        Self {
            webhook_secret: None,
            keys: WebhookKeyArgs::default(),
            webhook_max_per_tenant: 100,
            webhook_schedule: "5s,5m,30m,2h,5h,10h,10h".into(),
            webhook_timeout_secs: 10.0,
            webhook_concurrency: 8,
            webhook_max_inflight: 256,
            webhook_allow_hosts: String::new(),
            event_retention_hours: 168.0,
            notifier_poll_ms: 100,
            stream_buffer: 1024,
        }
    }
}

/// Settings kept so existing setups go on working, each with a warning
/// naming its replacement.
#[derive(Debug, Clone, Default, Args)]
pub struct DeprecatedArgs {
    /// Replaced by STEVEDORE_SCRAPE_ALLOW_HOSTS and
    /// STEVEDORE_WEBHOOK_ALLOW_HOSTS; counts for both meanwhile.
    #[arg(long, env = "STEVEDORE_ALLOW_HOSTS", hide = true)]
    pub allow_hosts: Option<String>,
}

impl DeprecatedArgs {
    /// Adds the old shared allowlist to each of the new ones this process
    /// uses (scrape, webhook or both), and says so once.
    pub fn apply(&self, allowlists: &mut [&mut String]) {
        let Some(old) = self.allow_hosts.as_deref().filter(|a| !a.is_empty()) else {
            return;
        };
        tracing::warn!(
            allow_hosts = old,
            "STEVEDORE_ALLOW_HOSTS is deprecated: it still counts for scraping and webhooks; \
             set STEVEDORE_SCRAPE_ALLOW_HOSTS and STEVEDORE_WEBHOOK_ALLOW_HOSTS instead."
        );
        for list in allowlists {
            **list = join_allowlists(list, old);
        }
    }
}

/// Two `host:port,...` lists as one.
pub fn join_allowlists(a: &str, b: &str) -> String {
    [a, b]
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `5s,5m,30m,2h` (units ms, s, m, h, d).
pub fn parse_schedule(s: &str) -> anyhow::Result<Vec<Duration>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| parse_duration(p).map_err(|e| anyhow::anyhow!("webhook schedule: {e}")))
        .collect()
}

/// Parses one duration: a number and a unit (ms, s, m, h, d; s if none).
pub fn parse_duration(p: &str) -> Result<Duration, String> {
    let p = p.trim();
    let split = p
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(p.len());
    let (n, unit) = p.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{p:?} is not a duration such as 90s, 30m, 12h or 7d"))?;
    let mult = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("bad unit in {p:?}: use ms, s, m, h or d")),
    };
    Ok(secs(n * mult))
}

impl NotifyArgs {
    pub fn webhook_config(&self) -> anyhow::Result<WebhookConfig> {
        let tenant_root = self
            .webhook_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(Secret::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("STEVEDORE_WEBHOOK_SECRET: {e}"))?;
        let keys = self.keys.keyring()?;
        if !keys.seals() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "STEVEDORE_WEBHOOK_KEY is not set: webhook secrets are stored in plain text; \
                     set it (base64 of 32 random bytes) and run `stevedore webhooks rotate-key`."
                )
            });
        }
        Ok(WebhookConfig {
            schedule: parse_schedule(&self.webhook_schedule)?,
            timeout: secs(self.webhook_timeout_secs),
            per_host: self.webhook_concurrency.max(1),
            max_inflight: self.webhook_max_inflight.max(1),
            tenant_root,
            keys: Arc::new(keys),
            max_per_tenant: self.webhook_max_per_tenant,
            guard: Arc::new(NetGuard::new(&self.webhook_allow_hosts)),
        })
    }

    pub fn notifier_config(&self) -> anyhow::Result<NotifierConfig> {
        Ok(NotifierConfig {
            batch: 1000,
            poll: Duration::from_millis(self.notifier_poll_ms.max(1)),
            retention: secs(self.event_retention_hours * 3600.0),
            webhook: self.webhook_config()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_say_what_is_wrong() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration(" 90 "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("7 days")
            .expect_err("no such unit")
            .contains("unit"));
        assert!(parse_duration("d")
            .expect_err("no number")
            .contains("not a duration"));
    }

    #[test]
    fn schedule_parses_units() {
        let s = parse_schedule("5s, 5m,2h,250ms").expect("valid");
        assert_eq!(
            s,
            vec![
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(7200),
                Duration::from_millis(250)
            ]
        );
        assert!(parse_schedule("5x").is_err());
    }

    #[test]
    fn the_old_allowlist_counts_for_every_list_it_is_applied_to() {
        let mut scrape = "127.0.0.1:9000".to_owned();
        let mut webhook = String::new();
        let old = DeprecatedArgs {
            allow_hosts: Some("127.0.0.1:9001".into()),
        };
        old.apply(&mut [&mut scrape, &mut webhook]);
        assert_eq!(scrape, "127.0.0.1:9000,127.0.0.1:9001");
        assert_eq!(webhook, "127.0.0.1:9001");
        DeprecatedArgs::default().apply(&mut [&mut webhook]);
        assert_eq!(webhook, "127.0.0.1:9001");
    }
}
