//! What a process runs: [`Roles`] (built up from [`Roles::new`]) and the
//! API role with who it lets in ([`ApiRole`], [`api_role`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

use super::Backend;
use crate::api::auth::Access;
use crate::config::{BackendArgs, NotifyArgs, TimingArgs};
use crate::dispatcher::DispatcherConfig;

/// What runs in one process. Start from [`Roles::new`] and add roles.
#[derive(Clone)]
pub struct Roles {
    pub api: Option<ApiRole>,
    pub dispatcher: Option<DispatcherConfig>,
    /// (pool, concurrency)
    pub workers: Vec<(String, usize)>,
    /// Run the notifier (stream feed and webhook delivery) here.
    pub notifier: bool,
    pub notify: NotifyArgs,
    pub timing: TimingArgs,
    /// Serve `/metrics` and `/healthz` here (for roles without the API).
    pub metrics: Option<SocketAddr>,
}

/// The HTTP API role: where it listens and who it lets in.
#[derive(Clone)]
pub struct ApiRole {
    pub listen: SocketAddr,
    pub access: Access,
    /// Origins besides the API's own that may open the streams.
    pub allowed_origins: Vec<String>,
    pub metrics_token: Option<String>,
    pub limits: crate::api::limits::Limits,
}

impl ApiRole {
    /// No keys: everyone may do everything (dev mode, tests,
    /// `--insecure-no-auth`).
    pub fn open(listen: SocketAddr) -> Self {
        Self {
            listen,
            access: Access::Open,
            allowed_origins: vec![],
            metrics_token: None,
            limits: Default::default(),
        }
    }
}

/// The API role as `stevedore api` runs it: with keys unless
/// `--insecure-no-auth`, and then only after saying so. With keys, it
/// refuses to start without the auth secret or without a live key, since
/// it could serve no one.
pub async fn api_role(
    listen: SocketAddr,
    args: &crate::config::AccessArgs,
    backend: &Backend,
    backend_args: &BackendArgs,
) -> anyhow::Result<ApiRole> {
    let access = if args.insecure_no_auth {
        tracing::warn!(
            %listen,
            "Serving without API keys (--insecure-no-auth): anyone who can reach this address may submit, read and purge jobs."
        );
        Access::Open
    } else {
        let secret = args.secret()?.context(
            "no auth secret: set STEVEDORE_AUTH_SECRET (or STEVEDORE_AUTH_SECRET_FILE), \
             or start with --insecure-no-auth on a trusted network",
        )?;
        anyhow::ensure!(
            backend.keys.any_live_key().await?,
            "no API key exists: create one with `stevedore keys create --tenant <name> --scope admin`, \
             or start with --insecure-no-auth on a trusted network"
        );
        let conn = crate::connect::redis_manager(backend_args.redis_client()?)
            .await
            .context("connecting to Redis for the API keys' request rates")?;
        let rates = crate::api::limits::KeyRates::new(conn, &backend_args.redis_prefix);
        Access::with_rates(backend.keys.clone(), secret, Some(rates))
    };
    Ok(ApiRole {
        listen,
        access,
        allowed_origins: args.allowed_origins.clone(),
        metrics_token: args.metrics_token.clone().filter(|t| !t.is_empty()),
        limits: crate::api::limits::Limits::new(
            Duration::from_secs_f64(args.api_timeout_secs.max(0.001)),
            args.api_max_in_flight,
        ),
    })
}

impl Roles {
    /// No role at all yet.
    pub fn new(timing: TimingArgs) -> Self {
        Self {
            api: None,
            dispatcher: None,
            workers: vec![],
            notifier: false,
            notify: NotifyArgs::default(),
            timing,
            metrics: None,
        }
    }

    pub fn with_api(mut self, api: ApiRole) -> Self {
        self.api = Some(api);
        self
    }

    pub fn with_dispatcher(mut self, cfg: DispatcherConfig) -> Self {
        self.dispatcher = Some(cfg);
        self
    }

    pub fn with_workers(mut self, pools: Vec<(String, usize)>) -> Self {
        self.workers = pools;
        self
    }

    /// Runs the notifier here (stream feed and webhook delivery).
    pub fn with_notifier(mut self) -> Self {
        self.notifier = true;
        self
    }

    /// Webhook and stream settings, for the API and the notifier.
    pub fn with_notify(mut self, notify: NotifyArgs) -> Self {
        self.notify = notify;
        self
    }

    pub fn with_metrics(mut self, listen: Option<SocketAddr>) -> Self {
        self.metrics = listen;
        self
    }
}
