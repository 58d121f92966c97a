//! `stevedore doctor`: checks what a fleet process needs before it starts
//! (configuration, Postgres reachable with current migrations and a sane
//! clock, each broker in use, Chromium, the analyze model) and says, for
//! each problem, what is wrong and how to fix it. Exits non-zero when
//! anything is wrong, so deploy scripts can gate on it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sqlx::{Connection as _, PgConnection};

use crate::config::BrokerKind;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Postgres URL the fleet uses.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The CA trusted for a rediss:// URL.
    #[arg(long, env = "STEVEDORE_REDIS_CA_FILE", value_parser = crate::config::path_or_empty)]
    pub redis_ca_file: Option<PathBuf>,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// A CA trusted for an amqps:// URL.
    #[arg(long, env = "STEVEDORE_AMQP_CA_FILE", value_parser = crate::config::path_or_empty)]
    pub amqp_ca_file: Option<PathBuf>,
    /// The broker of every pool without its own setting.
    #[arg(long, env = "STEVEDORE_BROKER", value_enum, default_value = "redis")]
    pub broker: BrokerKind,
    #[arg(long, env = "STEVEDORE_BROKER_PROBE", value_enum)]
    pub broker_probe: Option<BrokerKind>,
    #[arg(long, env = "STEVEDORE_BROKER_SCRAPE", value_enum)]
    pub broker_scrape: Option<BrokerKind>,
    #[arg(long, env = "STEVEDORE_BROKER_ANALYZE", value_enum)]
    pub broker_analyze: Option<BrokerKind>,
    /// The Chromium executable scrape workers use.
    #[arg(long, env = "CHROME", default_value = "/usr/bin/chromium")]
    pub chrome: PathBuf,
    /// The GGUF file of the local analyze model.
    #[arg(long, env = "STEVEDORE_LOCAL_MODEL", default_value = stevedore_analyze::DEFAULT_LOCAL_MODEL)]
    pub local_model: PathBuf,
    /// With a key, analyze calls the OpenAI-compatible API and needs no local model.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Seconds each check may take before it counts as failed.
    #[arg(long, default_value_t = 5.0)]
    pub timeout_secs: f64,
}

/// What to check when a service's TLS handshake fails.
const TLS_FIX_PG: &str = "sslrootcert in DATABASE_URL must be the CA that signed the server's \
     certificate, and the certificate must name the URL's host";
const TLS_FIX_REDIS: &str = "STEVEDORE_REDIS_CA_FILE must be the CA that signed Redis's \
     certificate, and the certificate must name the host in REDIS_URL";
const TLS_FIX_AMQP: &str = "STEVEDORE_AMQP_CA_FILE must be the CA that signed RabbitMQ's \
     certificate, and the certificate must name the host in AMQP_URL";

/// A clock further off than this breaks leases: they are stamped by the
/// database but waited out by the workers' own clocks.
const MAX_SKEW_SECS: f64 = 2.0;

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        println!("  ok    {what:<10} {detail}");
    }
    fn fail(&mut self, what: &str, detail: &str, fix: &str) {
        self.problems += 1;
        println!("  FAIL  {what:<10} {detail}\n        fix: {fix}");
    }
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let timeout = crate::config::secs(args.timeout_secs);
    let mut r = Report { problems: 0 };
    println!("stevedore doctor");
    let brokers = brokers_in_use(&args);
    match &args.database_url {
        None => r.fail(
            "config",
            "DATABASE_URL is not set",
            "export DATABASE_URL=postgres://USER@HOST:5432/DB (only `stevedore dev` runs without it)",
        ),
        Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => r
            .fail(
                "config",
                &format!("DATABASE_URL is not a postgres:// URL: {}", redact(url)),
                "set DATABASE_URL=postgres://USER@HOST:5432/DB",
            ),
        Some(_) => {
            let names: Vec<String> = brokers
                .iter()
                .map(|(k, pools)| format!("{} ({})", broker_name(*k), pools.join(", ")))
                .collect();
            r.ok("config", &format!("brokers: {}", names.join("; ")));
        }
    }
    if let Some(url) = &args.database_url {
        postgres(&mut r, url, timeout).await;
    }
    for (kind, _) in &brokers {
        match kind {
            BrokerKind::Redis => redis(&mut r, &args, timeout).await,
            BrokerKind::Amqp => amqp(&mut r, &args, timeout).await,
        }
    }
    chromium(&mut r, &args.chrome, timeout).await;
    model(&mut r, &args);
    if r.problems > 0 {
        let s = if r.problems == 1 { "" } else { "s" };
        println!("{} problem{s} found", r.problems);
        // The problems are printed above; an error here would only repeat
        // them (with a backtrace when RUST_BACKTRACE is set).
        std::process::exit(1);
    }
    println!("everything looks fine");
    Ok(())
}

fn broker_name(k: BrokerKind) -> &'static str {
    match k {
        BrokerKind::Redis => "redis",
        BrokerKind::Amqp => "amqp",
    }
}

/// Each broker in use with the pools it carries.
fn brokers_in_use(a: &DoctorArgs) -> Vec<(BrokerKind, Vec<&'static str>)> {
    let mut out: Vec<(BrokerKind, Vec<&'static str>)> = Vec::new();
    for (pool, own) in [
        ("probe", a.broker_probe),
        ("scrape", a.broker_scrape),
        ("analyze", a.broker_analyze),
    ] {
        let k = own.unwrap_or(a.broker);
        match out.iter_mut().find(|(b, _)| *b == k) {
            Some((_, pools)) => pools.push(pool),
            None => out.push((k, vec![pool])),
        }
    }
    out
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(unparseable URL)".into(),
    }
}

async fn postgres(r: &mut Report, url: &str, timeout: Duration) {
    let shown = redact(url);
    let opts = match crate::connect::pg_options(url) {
        Ok(o) => o,
        Err(e) => {
            return r.fail(
                "postgres",
                &format!("{e:#}"),
                "correct DATABASE_URL (and the sslrootcert file it names)",
            )
        }
    };
    // One connection, not a pool: a pool would retry until its timeout and
    // report only "timed out", hiding "connection refused" or a bad password.
    let mut conn = match tokio::time::timeout(timeout, PgConnection::connect_with(&opts)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let fix = if crate::connect::is_tls_failure(&e) || matches!(e, sqlx::Error::Tls(_)) {
                TLS_FIX_PG
            } else {
                "start Postgres (scripts/services.sh locally) or correct DATABASE_URL"
            };
            return r.fail("postgres", &format!("cannot connect to {shown}: {e}"), fix);
        }
        Err(_) => {
            return r.fail(
                "postgres",
                &format!("no answer from {shown} within {timeout:?}"),
                "check the host, port and firewall in DATABASE_URL",
            )
        }
    };
    r.ok("postgres", &format!("reachable at {shown}"));
    migrations(r, &mut conn).await;
    clock(r, &mut conn).await;
    let _ = conn.close().await;
}

async fn migrations(r: &mut Report, conn: &mut PgConnection) {
    let known: Vec<i64> = sqlx::migrate!("./migrations/postgres")
        .iter()
        .map(|m| m.version)
        .collect();
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await
        {
            Ok(v) => v,
            // No table yet: nothing was ever migrated.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => vec![],
            Err(e) => {
                return r.fail(
                    "migrations",
                    &format!("cannot read _sqlx_migrations: {e}"),
                    "check that the DATABASE_URL user may read the database",
                )
            }
        };
    let pending: Vec<String> = known
        .iter()
        .filter(|v| !applied.contains(v))
        .map(i64::to_string)
        .collect();
    let unknown = applied.iter().filter(|v| !known.contains(v)).count();
    if !pending.is_empty() {
        r.fail(
            "migrations",
            &format!("{} not applied: {}", pending.len(), pending.join(", ")),
            "run `stevedore migrate` with the same DATABASE_URL",
        );
    } else if unknown > 0 {
        r.fail(
            "migrations",
            &format!("the database has {unknown} migration(s) this binary does not know"),
            "run the release that migrated it (this binary is older than the database)",
        );
    } else {
        r.ok("migrations", &format!("all {} applied", known.len()));
    }
}

async fn clock(r: &mut Report, conn: &mut PgConnection) {
    let before = chrono::Utc::now();
    let db: Result<chrono::DateTime<chrono::Utc>, _> =
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *conn)
            .await;
    let after = chrono::Utc::now();
    match db {
        Ok(db) => {
            let mid = before + (after - before) / 2;
            let skew = (db - mid).as_seconds_f64();
            if skew.abs() > MAX_SKEW_SECS {
                r.fail(
                    "clock",
                    &format!("this host's clock is {skew:+.1}s off the database's"),
                    "run NTP (chrony or systemd-timesyncd) on this host and the database host",
                );
            } else {
                r.ok("clock", &format!("{skew:+.3}s from the database"));
            }
        }
        Err(e) => r.fail(
            "clock",
            &format!("cannot read the database clock: {e}"),
            "check the database connection",
        ),
    }
}

async fn redis(r: &mut Report, args: &DoctorArgs, timeout: Duration) {
    let shown = redact(&args.redis_url);
    let client = match crate::connect::redis_client(&args.redis_url, args.redis_ca_file.as_deref())
    {
        Ok(c) => c,
        Err(e) => {
            return r.fail(
                "redis",
                &format!("{e:#}"),
                "correct REDIS_URL and STEVEDORE_REDIS_CA_FILE",
            )
        }
    };
    let ping = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(_)) => r.ok("redis", &format!("PING answered at {shown}")),
        Ok(Err(e)) => {
            let fix = if crate::connect::is_tls_failure(&e) {
                TLS_FIX_REDIS
            } else {
                "start Redis (scripts/services.sh locally) or correct REDIS_URL"
            };
            r.fail("redis", &format!("{shown}: {e}"), fix)
        }
        Err(_) => r.fail(
            "redis",
            &format!("no answer from {shown} within {timeout:?}"),
            "check the host, port and firewall in REDIS_URL",
        ),
    }
}

async fn amqp(r: &mut Report, args: &DoctorArgs, timeout: Duration) {
    let shown = redact(&args.amqp_url);
    let tls = match crate::connect::amqp_tls(&args.amqp_url, args.amqp_ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            return r.fail(
                "amqp",
                &format!("{e:#}"),
                "correct AMQP_URL and STEVEDORE_AMQP_CA_FILE",
            )
        }
    };
    let props = lapin::ConnectionProperties::default();
    let connect = crate::connect::amqp_connect(&args.amqp_url, &tls, props);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(c)) => {
            let _ = c.close(200, "doctor done".into()).await;
            r.ok("amqp", &format!("connected to {shown}"));
        }
        Ok(Err(e)) => {
            let fix = if crate::connect::is_tls_failure(&e) {
                TLS_FIX_AMQP
            } else {
                "start RabbitMQ (scripts/services.sh locally) or correct AMQP_URL (user, password, vhost)"
            };
            r.fail("amqp", &format!("{shown}: {e}"), fix)
        }
        Err(_) => r.fail(
            "amqp",
            &format!("no answer from {shown} within {timeout:?}"),
            "check the host, port and firewall in AMQP_URL",
        ),
    }
}

async fn chromium(r: &mut Report, chrome: &std::path::Path, timeout: Duration) {
    let fix = "apt-get install chromium (scripts/services.sh does), or set CHROME to its path";
    let out = tokio::process::Command::new(chrome)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    // Chromium's first start can be slow on a cold disk.
    match tokio::time::timeout(timeout.max(Duration::from_secs(20)), out).await {
        Ok(Ok(o)) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            r.ok("chromium", v.trim());
        }
        Ok(Ok(o)) => r.fail(
            "chromium",
            &format!("{} --version failed: {}", chrome.display(), o.status),
            fix,
        ),
        Ok(Err(e)) => r.fail(
            "chromium",
            &format!("cannot run {}: {e}", chrome.display()),
            fix,
        ),
        Err(_) => r.fail(
            "chromium",
            &format!("{} --version did not answer", chrome.display()),
            fix,
        ),
    }
}

fn model(r: &mut Report, a: &DoctorArgs) {
    if a.openai_api_key.as_deref().is_some_and(|k| !k.is_empty()) {
        return r.ok(
            "model",
            "OPENAI_API_KEY is set: analyze uses the OpenAI-compatible API",
        );
    }
    let fix = "run scripts/fetch-model.sh, or set STEVEDORE_LOCAL_MODEL to the .gguf file";
    let path = a.local_model.display();
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(&a.local_model)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    match read {
        Ok(()) if &magic == b"GGUF" => r.ok("model", &format!("local model {path}")),
        Ok(()) => r.fail("model", &format!("{path} is not a GGUF file"), fix),
        Err(e) => r.fail("model", &format!("cannot read {path}: {e}"), fix),
    }
}
