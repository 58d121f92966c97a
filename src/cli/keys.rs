//! `stevedore keys`: create, list and revoke API keys. It talks to the
//! database directly (an operator's tool, like `migrate`), so the first
//! admin key can be made before any key exists.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::auth::{check_tenant, generate, Scope};
use crate::config::AccessArgs;
use crate::store::keys::{KeyStore, NewKey};
use crate::store::postgres::PgStore;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[command(flatten)]
    pub access: AccessArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it once; only its hash is stored.
    Create {
        #[arg(long)]
        tenant: String,
        /// read, submit or admin (each includes the ones before it).
        #[arg(long)]
        scope: Scope,
        /// A name to tell the key apart later.
        #[arg(long)]
        name: Option<String>,
        /// Requests this key may make, shared by every API process: 100/s,
        /// 6000/m or 10000/h (429 with Retry-After past it).
        #[arg(long)]
        rate: Option<crate::auth::Rate>,
        /// Refuse this key's submits (429) while its tenant has this many
        /// jobs waiting.
        #[arg(long)]
        max_queued: Option<u32>,
    },
    /// Every key (never the key itself), newest first.
    List,
    /// Stop a key from working (within seconds on every API process).
    Revoke { id: Uuid },
}

pub async fn run(args: &KeysArgs, cmd: KeysCommand) -> anyhow::Result<()> {
    let pg = PgStore::connect(&args.database_url, 2).await?;
    pg.migrate().await.context("connecting to the database")?;
    let keys: Arc<dyn KeyStore> = Arc::new(pg);
    match cmd {
        KeysCommand::Create {
            tenant,
            scope,
            name,
            rate,
            max_queued,
        } => {
            check_tenant(&tenant).map_err(|m| anyhow::anyhow!("--tenant: {m}"))?;
            let secret = args.access.secret()?.context(
                "no auth secret: set STEVEDORE_AUTH_SECRET (or STEVEDORE_AUTH_SECRET_FILE) \
                 to the value the API processes use",
            )?;
            let g = generate(&secret);
            let id = Uuid::now_v7();
            keys.create_key(&NewKey {
                id,
                hash: g.hash,
                prefix: g.prefix,
                tenant: tenant.clone(),
                scope,
                name,
                rate,
                max_queued: max_queued.map(i64::from),
            })
            .await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "key": g.key, "tenant": tenant, "scope": scope})
                );
            } else {
                eprintln!("key {id} for tenant {tenant}, scope {scope}; shown once, store it now:");
                println!("{}", g.key);
            }
        }
        KeysCommand::List => {
            let list = keys.list_keys().await?;
            if args.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!(
                    "{:<36}  {:<9}  {:<16}  {:<6}  {:<7}  NAME",
                    "ID", "PREFIX", "TENANT", "SCOPE", "STATE"
                );
                for k in list {
                    let state = if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "live"
                    };
                    println!(
                        "{:<36}  {:<9}  {:<16}  {:<6}  {:<7}  {}",
                        k.id,
                        k.prefix,
                        k.tenant,
                        k.scope,
                        state,
                        k.name.unwrap_or_default()
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(
                keys.revoke_key(id).await?,
                "no live key {id} (see `stevedore keys list`)"
            );
            println!("{id} revoked");
        }
    }
    Ok(())
}
