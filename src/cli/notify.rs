//! `stevedore watch` (follow the event stream in the terminal, resuming by
//! itself) and `stevedore webhooks` (register, list, remove, deliveries,
//! retry, the tenant's signing secret through the API; `rotate-key` on the
//! database itself). Listings show URLs with user-info redacted.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::Value;

use super::{call, output, s};
use crate::config::{ClientArgs, WebhookKeyArgs};
use crate::notifier::keyring;
use crate::notifier::urls::redact;
use crate::store::events::EventStore;

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Register an endpoint; prints its secret once.
    Add {
        /// The receiver's URL (named `target` because `--url` is the API's).
        #[arg(value_name = "URL")]
        target: String,
        /// Event types (default job.succeeded, job.dead, job.cancelled).
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
    },
    List,
    Remove {
        id: String,
    },
    /// Deliveries, newest first; --failed for the webhook dead letters.
    Deliveries {
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Send a failed delivery again.
    Retry {
        id: String,
    },
    /// This tenant's secret, to verify job webhooks submitted without one.
    SigningSecret,
    /// Re-encrypt every stored webhook secret (endpoints' and jobs') under
    /// STEVEDORE_WEBHOOK_KEY: plain rows and rows sealed under
    /// STEVEDORE_WEBHOOK_KEY_PREVIOUS. Works on the database, not the API;
    /// safe to run again and while the fleet runs.
    RotateKey {
        /// Postgres; without it, the `stevedore dev` SQLite file in --data-dir
        /// (and its webhook.key when no key is set).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value = ".stevedore")]
        data_dir: PathBuf,
        #[command(flatten)]
        keys: WebhookKeyArgs,
    },
}

pub async fn webhooks(c: &ClientArgs, cmd: WebhooksCommand) -> anyhow::Result<()> {
    let http = super::client(c.api_key.as_deref())?;
    match cmd {
        WebhooksCommand::RotateKey {
            database_url,
            data_dir,
            keys,
        } => {
            let report = rotate_key(database_url.as_deref(), &data_dir, keys).await?;
            let v = serde_json::to_value(report).context("report")?;
            output(c, &v, |_| {
                println!(
                    "re-encrypted {}, already current {}, unreadable {}",
                    report.resealed, report.current, report.unreadable
                )
            });
            anyhow::ensure!(
                report.unreadable == 0,
                "{} secrets are sealed under a key that is not given \
                 (STEVEDORE_WEBHOOK_KEY_PREVIOUS?); their deliveries fail until it is",
                report.unreadable
            );
        }
        WebhooksCommand::SigningSecret => {
            let v = call(http.get(format!("{}/v1/webhook-signing-secret", c.url))).await?;
            output(c, &v, |v| println!("{}", s(v, "secret")));
        }
        WebhooksCommand::Add {
            target,
            events,
            kinds,
        } => {
            let mut body = serde_json::json!({"url": target});
            if !events.is_empty() {
                body["events"] = events.into();
            }
            if !kinds.is_empty() {
                body["kinds"] = kinds.into();
            }
            let v = call(http.post(format!("{}/v1/webhooks", c.url)).json(&body)).await?;
            output(c, &v, |v| {
                println!(
                    "id     {}\nsecret {}  (shown once: keep it to verify signatures)",
                    s(v, "id"),
                    s(v, "secret")
                )
            });
        }
        WebhooksCommand::List => {
            let v = call(http.get(format!("{}/v1/webhooks", c.url))).await?;
            output(c, &v, |v| {
                println!("{:<38} {:<40} {:<10} EVENTS", "ID", "URL", "STATE");
                for w in v["webhooks"].as_array().into_iter().flatten() {
                    let state = if w["disabled_at"].is_null() {
                        "active"
                    } else {
                        "disabled"
                    };
                    println!(
                        "{:<38} {:<40} {:<10} {}",
                        s(w, "id"),
                        redact(&s(w, "url")),
                        state,
                        w["events"]
                    );
                }
            });
        }
        WebhooksCommand::Remove { id } => {
            call(http.delete(format!("{}/v1/webhooks/{id}", c.url))).await?;
            output(c, &serde_json::json!({"id": id, "removed": true}), |_| {
                println!("{id} removed")
            });
        }
        WebhooksCommand::Deliveries { failed, limit } => {
            let mut req = http
                .get(format!("{}/v1/webhook-deliveries", c.url))
                .query(&[("limit", limit.to_string())]);
            if failed {
                req = req.query(&[("status", "failed")]);
            }
            let v = call(req).await?;
            output(c, &v, |v| {
                println!(
                    "{:<38} {:<14} {:<10} {:>3}  {:<36} LAST ERROR",
                    "ID", "EVENT", "STATUS", "TRY", "URL"
                );
                for d in v["deliveries"].as_array().into_iter().flatten() {
                    println!(
                        "{:<38} {:<14} {:<10} {:>3}  {:<36} {}",
                        s(d, "id"),
                        s(d, "event_type"),
                        s(d, "status"),
                        s(d, "attempts"),
                        redact(&s(d, "url")),
                        s(d, "last_error")
                    );
                }
            });
        }
        WebhooksCommand::Retry { id } => {
            let v = call(http.post(format!("{}/v1/webhook-deliveries/{id}/retry", c.url))).await?;
            output(c, &v, |v| println!("{} {}", s(v, "id"), s(v, "status")));
        }
    }
    Ok(())
}

/// The re-encryption pass on Postgres (`database_url`) or the dev SQLite
/// file in `data_dir`.
async fn rotate_key(
    database_url: Option<&str>,
    data_dir: &std::path::Path,
    mut keys: WebhookKeyArgs,
) -> anyhow::Result<keyring::ResealReport> {
    let store: std::sync::Arc<dyn EventStore> = match database_url.filter(|u| !u.is_empty()) {
        Some(url) => std::sync::Arc::new(crate::store::postgres::PgStore::connect(url, 2).await?),
        None => {
            let file = data_dir.join("stevedore.db");
            anyhow::ensure!(
                file.exists(),
                "no DATABASE_URL and no {} (see --data-dir)",
                file.display()
            );
            keys.or_dev_file(data_dir)?;
            std::sync::Arc::new(crate::store::sqlite::SqliteStore::open(&file).await?)
        }
    };
    keyring::reseal_all(store.as_ref(), &keys.keyring()?).await
}

/// Follows `/v1/events`, printing one line per event (`--json`: the event),
/// and reconnects with `Last-Event-ID` when the connection drops.
pub async fn watch(c: &ClientArgs, kind: Option<String>, jobs: Vec<String>) -> anyhow::Result<()> {
    // No overall timeout: the stream is meant to stay open.
    let http = super::client_builder(c.api_key.as_deref())?
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let mut q: Vec<(&str, String)> = jobs.into_iter().map(|j| ("job", j)).collect();
    if let Some(k) = kind {
        q.push(("kind", k));
    }
    let mut last: Option<String> = None;
    loop {
        let mut req = http.get(format!("{}/v1/events", c.url)).query(&q);
        if let Some(id) = &last {
            req = req.header("last-event-id", id);
        }
        match req.send().await {
            Ok(mut resp) if resp.status().is_success() => {
                let mut buf = String::new();
                while let Ok(Some(chunk)) = resp.chunk().await {
                    buf.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buf.find("\n\n") {
                        let frame: String = buf.drain(..end + 2).collect();
                        print_frame(c, &frame, &mut last);
                    }
                }
                eprintln!("stream closed; reconnecting…");
            }
            Ok(resp) => {
                let status = resp.status();
                anyhow::bail!("{status}: {}", resp.text().await.unwrap_or_default());
            }
            Err(e) => eprintln!("cannot reach the API ({e}); retrying…"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_frame(c: &ClientArgs, frame: &str, last: &mut Option<String>) {
    let (mut id, mut data) = (None, String::new());
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    if data.is_empty() {
        return;
    }
    if id.is_some() {
        *last = id;
    }
    let Ok(v) = serde_json::from_str::<Value>(&data) else {
        return;
    };
    output(c, &v, |v| {
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            eprintln!("server: {err}");
            return;
        }
        let tail = match (v.get("result"), v.get("error")) {
            (Some(r), _) => format!(" result={r}"),
            (_, Some(e)) => format!(" error={}", s(e, "message")),
            _ => String::new(),
        };
        println!(
            "{:>8} {} {:<14} {} {:<8} attempt {}{tail}",
            s(v, "id"),
            s(v, "at"),
            s(v, "type"),
            s(v, "job_id"),
            s(v, "kind"),
            s(v, "attempt")
        );
    });
}
