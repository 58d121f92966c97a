//! `stevedore limits list|set|remove`: the concurrency limit routes from a
//! terminal.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{call, client, output, s};
use crate::config::ClientArgs;

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Every limit, with its keys' jobs running and waiting for room.
    List,
    /// At most N jobs of each key starting with PREFIX run at once, fleet-wide.
    #[command(after_help = "Examples:
  stevedore limits set host: 2             # two pages per site at once (scrape jobs)
  stevedore limits set host:slow.example 1 # a longer prefix wins for its keys
  stevedore limits set tenant: 5           # jobs submitted with \"concurrency_key\": \"tenant:...\"")]
    Set { prefix: String, max_running: i32 },
    /// Keys with PREFIX run without this limit (or under a shorter prefix's).
    Remove { prefix: String },
}

pub async fn run(c: &ClientArgs, cmd: LimitsCommand) -> anyhow::Result<()> {
    let http = client(c.api_key.as_deref())?;
    let base = format!("{}/v1/concurrency-limits", c.url);
    let v = match cmd {
        LimitsCommand::List => call(http.get(&base)).await?,
        LimitsCommand::Set {
            prefix,
            max_running,
        } => {
            let body = json!({"max_running": max_running});
            call(http.put(format!("{base}/{prefix}")).json(&body)).await?
        }
        LimitsCommand::Remove { prefix } => {
            call(http.delete(format!("{base}/{prefix}"))).await?;
            if !c.json {
                println!("removed {prefix}");
            }
            return Ok(());
        }
    };
    output(c, &v, |v| {
        println!(
            "{:<30} {:>12} {:>8} {:>8}",
            "PREFIX", "MAX RUNNING", "RUNNING", "HELD"
        );
        let rows: Vec<&Value> = match v["limits"].as_array() {
            Some(all) => all.iter().collect(),
            None => vec![v],
        };
        for l in rows {
            println!(
                "{:<30} {:>12} {:>8} {:>8}",
                s(l, "prefix"),
                s(l, "max_running"),
                s(l, "running"),
                s(l, "held")
            );
        }
    });
    Ok(())
}
