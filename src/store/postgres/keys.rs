//! API keys on Postgres.

use async_trait::async_trait;
use sqlx::Row as _;
use uuid::Uuid;

use super::PgStore;
use crate::store::keys::{parse_scope, rate, ApiKey, KeyStore, NewKey};
use crate::store::StoreResult;

const COLUMNS: &str =
    "id, prefix, tenant, scope, name, rate_limit, rate_window_secs, max_queued, created_at, revoked_at";

fn row_to_key(r: &sqlx::postgres::PgRow) -> anyhow::Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        prefix: r.try_get("prefix")?,
        tenant: r.try_get("tenant")?,
        scope: parse_scope(r.try_get("scope")?)?,
        name: r.try_get("name")?,
        rate: rate(r.try_get("rate_limit")?, r.try_get("rate_window_secs")?),
        max_queued: r.try_get("max_queued")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

#[async_trait]
impl KeyStore for PgStore {
    async fn create_key(&self, k: &NewKey) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, hash, prefix, tenant, scope, name, rate_limit, rate_window_secs,
               max_queued)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(k.id)
        .bind(&k.hash)
        .bind(&k.prefix)
        .bind(&k.tenant)
        .bind(k.scope.as_str())
        .bind(&k.name)
        .bind(k.rate.map(|r| i32::try_from(r.limit).unwrap_or(i32::MAX)))
        .bind(k.rate.map(|r| i32::try_from(r.window_secs).unwrap_or(i32::MAX)))
        .bind(k.max_queued)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn list_keys(&self) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys ORDER BY created_at DESC, id DESC"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(row_to_key).collect::<anyhow::Result<_>>()?)
    }

    async fn revoke_key(&self, id: Uuid) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(row_to_key).transpose()?)
    }

    async fn any_live_key(&self) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)")
                .fetch_one(self.pool())
                .await?,
        )
    }
}
