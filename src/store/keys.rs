//! API keys as the stores keep them: only the keyed hash, the tenant and
//! scope, and whether the key was revoked. [`KeyStore`] is implemented in
//! `postgres/keys.rs` and `sqlite/keys.rs`; the rules are in
//! [`crate::auth`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::StoreResult;
use crate::auth::{Rate, Scope};

/// A key as listed: never the key itself, nor its hash.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub tenant: String,
    pub scope: Scope,
    pub name: Option<String>,
    pub rate: Option<Rate>,
    /// Submits are refused while the tenant has this many jobs waiting.
    pub max_queued: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: Uuid,
    pub hash: String,
    pub prefix: String,
    pub tenant: String,
    pub scope: Scope,
    pub name: Option<String>,
    pub rate: Option<Rate>,
    pub max_queued: Option<i64>,
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn create_key(&self, key: &NewKey) -> StoreResult<()>;
    /// Every key, newest first, revoked ones included.
    async fn list_keys(&self) -> StoreResult<Vec<ApiKey>>;
    /// False when no such key exists or it was already revoked.
    async fn revoke_key(&self, id: Uuid) -> StoreResult<bool>;
    /// The live (not revoked) key with this hash.
    async fn key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKey>>;
    /// Whether any key is live: `stevedore api` refuses to start otherwise.
    async fn any_live_key(&self) -> StoreResult<bool>;
}

pub(crate) fn parse_scope(s: &str) -> anyhow::Result<Scope> {
    s.parse::<Scope>().map_err(anyhow::Error::msg)
}

/// The two rate columns as one value (both set, or none).
pub(crate) fn rate(limit: Option<i32>, window: Option<i32>) -> Option<Rate> {
    Some(Rate {
        limit: u32::try_from(limit?).ok()?,
        window_secs: u32::try_from(window?).ok()?,
    })
}
