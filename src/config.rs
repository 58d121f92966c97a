//! Configuration, parsed once at start by clap from flags and environment.
//!
//! Environment variables (each also a flag):
//! - `DATABASE_URL`: Postgres URL for `api`, `worker`, `dispatcher`, `migrate`.
//! - `REDIS_URL` (default `redis://127.0.0.1:6379`), `STEVEDORE_REDIS_PREFIX`
//!   (default `stevedore`): the Redis broker.
//! - `STEVEDORE_DB_POOL`: Postgres connections per process (default 16).
//! - `STEVEDORE_LEASE_SECS` (30), `STEVEDORE_HEARTBEAT_SECS` (5),
//!   `STEVEDORE_GRACE_SECS` (20): worker leases and shutdown.
//! - `STEVEDORE_LOST_AFTER_SECS` (120): when the dispatcher re-sends a job
//!   the broker seems to have lost.
//! - `STEVEDORE_URL` (default `http://127.0.0.1:8080`): the API the CLI talks to.
//! - `STEVEDORE_LOG` (default `info`): tracing filter; `--log-format json` for JSON logs.

use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
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
    /// Key prefix for every Redis key, so deployments can share a server.
    #[arg(long, env = "STEVEDORE_REDIS_PREFIX", default_value = "stevedore")]
    pub redis_prefix: String,
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
}

impl Default for TimingArgs {
    fn default() -> Self {
        Self {
            lease_secs: 30.0,
            heartbeat_secs: 5.0,
            grace_secs: 20.0,
            lost_after_secs: 120.0,
        }
    }
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
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}
