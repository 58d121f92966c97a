//! `stevedore pools list|pause|resume`: the pool routes from a terminal.

use clap::Subcommand;
use serde_json::Value;

use super::{call, client, output, s};
use crate::config::ClientArgs;

#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// Each pool: paused or not, jobs by status, workers connected.
    List,
    /// Workers finish what they run and start nothing new; submits go on.
    Pause { pool: String },
    /// Start the pool's jobs again, the most urgent first.
    Resume { pool: String },
}

pub async fn run(c: &ClientArgs, cmd: PoolsCommand) -> anyhow::Result<()> {
    let http = client(c.api_key.as_deref())?;
    let base = format!("{}/v1/pools", c.url);
    let (v, one) = match cmd {
        PoolsCommand::List => (call(http.get(&base)).await?, false),
        PoolsCommand::Pause { pool } => {
            (call(http.post(format!("{base}/{pool}/pause"))).await?, true)
        }
        PoolsCommand::Resume { pool } => (
            call(http.post(format!("{base}/{pool}/resume"))).await?,
            true,
        ),
    };
    output(c, &v, |v| {
        println!(
            "{:<12} {:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>12}",
            "POOL", "STATE", "QUEUED", "RUNNING", "RETRYING", "DEAD", "WORKERS", "CONCURRENCY"
        );
        let rows: Vec<&Value> = if one {
            vec![v]
        } else {
            v["pools"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default()
        };
        for p in rows {
            let state = if p["paused"].as_bool() == Some(true) {
                "paused"
            } else {
                "running"
            };
            println!(
                "{:<12} {:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>12}",
                s(p, "name"),
                state,
                s(p, "queued"),
                s(p, "running"),
                s(p, "retrying"),
                s(p, "dead"),
                s(p, "workers"),
                s(p, "concurrency")
            );
        }
    });
    Ok(())
}
