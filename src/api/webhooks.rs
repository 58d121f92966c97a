//! Webhook routes: register (the secret is shown once, then stored sealed;
//! at most `STEVEDORE_WEBHOOK_MAX_PER_TENANT` per tenant), list (user-info
//! in URLs shown as `***`), remove, the tenant's signing secret for job
//! webhooks, and the deliveries with their dead letters (`status=failed`)
//! and retry. Every URL passes the SSRF guard here and again at each
//! delivery.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use stevedore_handler::FieldError;
use utoipa::{IntoParams, ToSchema};

use super::{parse_body, parse_id, query, ApiError, AppState};
use crate::auth::Principal;
use crate::model::job::NewJob;
use crate::model::secret::Secret;
use crate::model::EventType;
use crate::store::events::{DeliveryView, RetryOutcome, Webhook};

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// http or https; must pass the SSRF guard
    /// (`STEVEDORE_WEBHOOK_ALLOW_HOSTS` lets named local receivers through).
    #[schema(pattern = "^https?://")]
    pub url: String,
    /// Event types; default `job.succeeded`, `job.dead`, `job.cancelled`.
    #[schema(value_type = Option<Vec<EventType>>, min_items = 1)]
    pub events: Option<Vec<String>>,
    /// Job kinds; default all.
    pub kinds: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedWebhook {
    pub id: uuid::Uuid,
    /// `whsec_...`: shown only in this answer; verify signatures with it.
    pub secret: String,
    /// User-info, if any, is shown as `***`.
    #[serde(serialize_with = "crate::notifier::urls::serialize_redacted")]
    pub url: String,
    pub events: Vec<String>,
    pub kinds: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
}

async fn guard(s: &AppState, url: &str, field: &str) -> Result<(), FieldError> {
    s.webhooks
        .guard
        .check(url)
        .await
        .map(drop)
        .map_err(|e| FieldError::new(field, e.to_string()))
}

/// A job's own webhook must pass the guard and have a key to sign with:
/// its own secret, which is sealed here before the job is stored, or its
/// tenant's (derived from `STEVEDORE_WEBHOOK_SECRET`).
pub(crate) async fn check_job_webhook(s: &AppState, job: &mut NewJob) -> Result<(), FieldError> {
    let Some(w) = &mut job.webhook else {
        return Ok(());
    };
    guard(s, &w.url, "webhook.url").await?;
    match &mut w.secret {
        Some(secret) => *secret = s.webhooks.keys.seal(secret),
        None if s.webhooks.tenant_root.is_none() => {
            return Err(FieldError::new(
                "webhook.secret",
                "required: this deployment has no STEVEDORE_WEBHOOK_SECRET to derive \
                 the tenant's signing secret from",
            ))
        }
        None => {}
    }
    Ok(())
}

/// Register a webhook endpoint.
#[utoipa::path(post, path = "/v1/webhooks", request_body = CreateWebhook, responses(
    (status = 201, body = CreatedWebhook),
    (status = 409, description = "The tenant has as many webhooks as it may", body = super::error::ErrorBody),
    (status = 422, description = "Invalid or refused URL, unknown event type", body = super::error::ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CreateWebhook = parse_body(body)?;
    guard(&s, &req.url, "url")
        .await
        .map_err(ApiError::Invalid)?;
    let events = req
        .events
        .unwrap_or_else(|| EventType::TERMINAL.map(|t| t.as_str().to_owned()).to_vec());
    if events.is_empty() {
        return Err(ApiError::Invalid(FieldError::new(
            "events",
            "must not be empty",
        )));
    }
    if let Some(bad) = events.iter().find(|e| EventType::parse(e).is_none()) {
        return Err(ApiError::Invalid(FieldError::new(
            "events",
            format!("unknown event type {bad:?}; known: {}", EventType::names()),
        )));
    }
    let secret = Secret::generate();
    let cap = s.webhooks.max_per_tenant;
    let w = s
        .events
        .create_webhook(
            &who.tenant,
            &req.url,
            &s.webhooks.keys.seal(&secret),
            &events,
            req.kinds.as_deref(),
            i64::try_from(cap).unwrap_or(i64::MAX),
        )
        .await?
        .ok_or(ApiError::WebhookLimit { cap })?;
    let body = CreatedWebhook {
        id: w.id,
        secret,
        url: w.url,
        events: w.events,
        kinds: w.kinds,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Registered webhooks (without their secrets).
#[utoipa::path(get, path = "/v1/webhooks", responses((status = 200, body = WebhookList)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<WebhookList>, ApiError> {
    let mut webhooks = s.events.list_webhooks().await?;
    webhooks.retain(|w| w.tenant == who.tenant);
    Ok(Json(WebhookList { webhooks }))
}

/// Remove a webhook and its deliveries.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", params(("id" = Uuid, Path)), responses(
    (status = 204, description = "Removed"), (status = 404, body = super::error::ErrorBody)))]
pub async fn remove(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let owned = s
        .events
        .list_webhooks()
        .await?
        .iter()
        .any(|w| w.id == id && w.tenant == who.tenant);
    if owned && s.events.delete_webhook(id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound("webhook"))
    }
}

#[derive(Serialize, ToSchema)]
pub struct SigningSecret {
    /// `whsec_...`: verifies the job webhooks of this tenant that were
    /// submitted without a `webhook.secret`.
    pub secret: String,
}

/// The tenant's signing secret for job webhooks without their own secret.
#[utoipa::path(get, path = "/v1/webhook-signing-secret", responses(
    (status = 200, body = SigningSecret),
    (status = 404, description = "No STEVEDORE_WEBHOOK_SECRET here: job webhooks need their own", body = super::error::ErrorBody)))]
pub async fn signing_secret(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<SigningSecret>, ApiError> {
    let root = s
        .webhooks
        .tenant_root
        .as_ref()
        .ok_or(ApiError::NotFound("signing secret"))?;
    Ok(Json(SigningSecret {
        secret: root.for_tenant(&who.tenant).to_text(),
    }))
}

/// A delivery's state (documentation of the `status` filter).
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivering,
    Delivered,
    Failed,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    /// `pending`, `delivering`, `delivered` or `failed` (the webhook dead letters).
    #[param(value_type = Option<DeliveryStatus>, inline)]
    pub status: Option<String>,
    /// 1..=500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// Webhook deliveries, newest first.
#[utoipa::path(get, path = "/v1/webhook-deliveries", params(DeliveryQuery), responses(
    (status = 200, body = DeliveryList)))]
pub async fn deliveries(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    q: Result<Query<DeliveryQuery>, QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let q = query(q)?;
    if let Some(st) = &q.status {
        if !["pending", "delivering", "delivered", "failed"].contains(&st.as_str()) {
            return Err(ApiError::BadParam(FieldError::new(
                "status",
                "must be pending, delivering, delivered or failed",
            )));
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadParam(FieldError::new(
            "limit",
            "must be between 1 and 500",
        )));
    }
    let deliveries = s
        .events
        .list_deliveries(q.status.as_deref(), limit, Some(&who.tenant))
        .await?;
    Ok(Json(DeliveryList { deliveries }))
}

/// Send a failed delivery again, with a fresh schedule and the same `webhook-id`.
#[utoipa::path(post, path = "/v1/webhook-deliveries/{id}/retry", params(("id" = Uuid, Path)), responses(
    (status = 202, description = "Queued again", body = super::Acted), (status = 404, body = super::error::ErrorBody),
    (status = 409, description = "Not failed", body = super::error::ErrorBody)))]
pub async fn retry(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match s.events.retry_delivery(id, Some(&who.tenant)).await? {
        RetryOutcome::Queued => {
            Ok((StatusCode::ACCEPTED, Json(super::Acted::new(id, "pending"))).into_response())
        }
        RetryOutcome::NotFailed(st) => Err(ApiError::Conflict(format!(
            "delivery is {st}; only failed deliveries can be retried"
        ))),
        RetryOutcome::NotFound => Err(ApiError::NotFound("delivery")),
    }
}
