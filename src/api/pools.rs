//! Pool routes: each pool's depth by status, the workers serving it, and
//! pausing and resuming it. Pools are shared by every tenant, so only an
//! admin key of the default tenant (the deployment's own) may pause one.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState};
use crate::auth::{Principal, DEFAULT_TENANT};
use crate::model::JobStatus;
use crate::worker::ALIVE;

/// One pool as `GET /v1/pools` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pool {
    pub name: String,
    /// Paused pools keep accepting jobs and start none.
    pub paused: bool,
    pub queued: i64,
    pub running: i64,
    pub retrying: i64,
    pub dead: i64,
    /// Worker processes seen in the last few seconds.
    pub workers: i64,
    /// Their concurrency added up.
    pub concurrency: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PoolList {
    pub pools: Vec<Pool>,
}

pub(super) fn operator(who: &Principal) -> Result<(), ApiError> {
    if who.tenant == DEFAULT_TENANT {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "pools are shared by every tenant; only an admin key of the default tenant may manage them",
        ))
    }
}

/// Every pool: the kinds this API knows, and any other a worker serves or
/// that was paused.
#[utoipa::path(get, path = "/v1/pools", responses(
    (status = 200, body = PoolList), (status = 403, body = super::error::ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<PoolList>, ApiError> {
    operator(&who)?;
    let (states, depths) = tokio::try_join!(s.store.pools(ALIVE), s.store.depths())?;
    let mut pools: BTreeMap<String, Pool> = s
        .kinds
        .names()
        .into_iter()
        .map(|n| (n.to_owned(), empty(n)))
        .collect();
    for st in states {
        let p = pools
            .entry(st.name.clone())
            .or_insert_with(|| empty(&st.name));
        p.paused = st.paused;
        p.workers = st.workers;
        p.concurrency = st.concurrency;
    }
    for ((kind, status), n) in depths.by_kind_status {
        let p = pools.entry(kind.clone()).or_insert_with(|| empty(&kind));
        match status {
            JobStatus::Queued => p.queued = n,
            JobStatus::Running => p.running = n,
            JobStatus::Retrying => p.retrying = n,
            JobStatus::Dead => p.dead = n,
            _ => {}
        }
    }
    Ok(Json(PoolList {
        pools: pools.into_values().collect(),
    }))
}

fn empty(name: &str) -> Pool {
    Pool {
        name: name.to_owned(),
        paused: false,
        queued: 0,
        running: 0,
        retrying: 0,
        dead: 0,
        workers: 0,
        concurrency: 0,
    }
}

/// Workers finish what they run and start nothing new; submits are still
/// accepted. Holds across restarts until resumed.
#[utoipa::path(post, path = "/v1/pools/{pool}/pause", params(("pool" = String, Path)), responses(
    (status = 200, description = "Paused", body = Pool),
    (status = 403, body = super::error::ErrorBody),
    (status = 404, body = super::error::ErrorBody)))]
pub async fn pause(
    s: State<AppState>,
    who: Extension<Principal>,
    pool: Path<String>,
) -> Result<Json<Pool>, ApiError> {
    set(s, who, pool, true).await
}

/// Jobs start again, the most urgent first.
#[utoipa::path(post, path = "/v1/pools/{pool}/resume", params(("pool" = String, Path)), responses(
    (status = 200, description = "Resumed", body = Pool),
    (status = 403, body = super::error::ErrorBody),
    (status = 404, body = super::error::ErrorBody)))]
pub async fn resume(
    s: State<AppState>,
    who: Extension<Principal>,
    pool: Path<String>,
) -> Result<Json<Pool>, ApiError> {
    set(s, who, pool, false).await
}

async fn set(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(pool): Path<String>,
    paused: bool,
) -> Result<Json<Pool>, ApiError> {
    operator(&who)?;
    // Only pools jobs can be submitted to: a typo must not create a pool
    // that pauses nothing.
    if s.kinds.get(&pool).is_none() {
        return Err(ApiError::NotFound("pool"));
    }
    s.store.set_paused(&pool, paused).await?;
    if !paused {
        // The relay holds what the pool kept; wake it rather than wait for
        // its next round.
        if let Some(w) = &s.wake {
            w.notify_one();
        }
    }
    let Json(list) = list(State(s), Extension(who)).await?;
    list.pools
        .into_iter()
        .find(|p| p.name == pool)
        .map(Json)
        .ok_or(ApiError::NotFound("pool"))
}
