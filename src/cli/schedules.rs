//! `stevedore schedules create|list|show|delete|pause|resume`: the cron
//! schedule routes from a terminal.

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{json, Value};

use super::{call, client, output, s};
use crate::config::ClientArgs;

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Create a schedule, or replace the one of the same name.
    #[command(after_help = "Examples:
  stevedore schedules create nightly --cron '0 3 * * *' --timezone Europe/Berlin \\
      --kind scrape --payload '{\"url\": \"https://quiz.example/daily\"}'
  stevedore schedules create heartbeat --cron '*/10 * * * * *' --kind probe")]
    Create {
        name: String,
        /// Five fields (minute hour day month weekday), or six with seconds first.
        #[arg(long)]
        cron: String,
        /// IANA time zone the pattern is read in (default UTC).
        #[arg(long)]
        timezone: Option<String>,
        /// Start each job up to this many seconds after its fire time, at random.
        #[arg(long)]
        jitter: Option<u32>,
        /// The kind of job each fire submits.
        #[arg(long)]
        kind: String,
        /// The job's payload, as JSON.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// -100..=100; higher runs first (default 0).
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
    },
    /// The schedules of your tenant, with their next and last fire.
    List,
    /// One schedule, as JSON.
    Show { name: String },
    /// Delete a schedule; the jobs it made stay.
    Delete { name: String },
    /// No fires until resumed.
    Pause { name: String },
    /// Fire again from the next fire time after now.
    Resume { name: String },
}

pub async fn run(c: &ClientArgs, cmd: SchedulesCommand) -> anyhow::Result<()> {
    let http = client(c.api_key.as_deref())?;
    let base = format!("{}/v1/schedules", c.url);
    let v = match cmd {
        SchedulesCommand::Create {
            name,
            cron,
            timezone,
            jitter,
            kind,
            payload,
            priority,
        } => {
            let payload: Value =
                serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            let mut job = json!({"kind": kind, "payload": payload});
            if let Some(p) = priority {
                job["priority"] = p.into();
            }
            let mut body = json!({"name": name, "cron": cron, "job": job});
            if let Some(tz) = timezone {
                body["timezone"] = tz.into();
            }
            if let Some(j) = jitter {
                body["jitter_secs"] = j.into();
            }
            call(http.post(&base).json(&body)).await?
        }
        SchedulesCommand::List => call(http.get(&base)).await?,
        SchedulesCommand::Show { name } => {
            let v = call(http.get(format!("{base}/{name}"))).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        SchedulesCommand::Delete { name } => {
            call(http.delete(format!("{base}/{name}"))).await?;
            if !c.json {
                println!("deleted {name}");
            }
            return Ok(());
        }
        SchedulesCommand::Pause { name } => call(http.post(format!("{base}/{name}/pause"))).await?,
        SchedulesCommand::Resume { name } => {
            call(http.post(format!("{base}/{name}/resume"))).await?
        }
    };
    output(c, &v, |v| {
        println!(
            "{:<20} {:<18} {:<14} {:<8} {:<8} {:<25} {:<25}",
            "NAME", "CRON", "TIMEZONE", "KIND", "STATE", "NEXT FIRE", "LAST FIRE"
        );
        let rows: Vec<&Value> = match v["schedules"].as_array() {
            Some(all) => all.iter().collect(),
            None => vec![v],
        };
        for r in rows {
            let state = if r["paused"].as_bool() == Some(true) {
                "paused"
            } else {
                "active"
            };
            println!(
                "{:<20} {:<18} {:<14} {:<8} {:<8} {:<25} {:<25}",
                s(r, "name"),
                s(r, "cron"),
                s(r, "timezone"),
                s(&r["job"], "kind"),
                state,
                s(r, "next_fire_at"),
                s(r, "last_fire_at"),
            );
        }
    });
    Ok(())
}
