//! The one error type of the HTTP API. Every failure leaves as
//! `{"error": {"code", "message", "field"?}}` with a 4xx for the client's
//! mistakes and 503 when a dependency is down; internal errors are logged
//! and shown only as a generic message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use stevedore_handler::FieldError;
use utoipa::ToSchema;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    BadParam(FieldError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("request body is larger than the 1 MiB limit")]
    TooLarge,
    #[error("{0}")]
    Unavailable(String),
    #[error("the tenant has {waiting} jobs waiting; this key may add jobs only while fewer than {cap} wait")]
    QueueFull { waiting: i64, cap: i64 },
    #[error("the tenant has as many webhooks as STEVEDORE_WEBHOOK_MAX_PER_TENANT allows ({cap}); remove one first")]
    WebhookLimit { cap: usize },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::Other(e) => Self::Internal(e),
        }
    }
}

/// The API's error body (`{"error": {"code", "message"}}`) for answers made
/// outside a handler: the gate, the load limits, the router's fallbacks.
pub fn respond(status: StatusCode, code: &'static str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = match &self {
            Self::NotJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", None),
            Self::BadParam(f) => (
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                Some(f.field.clone()),
            ),
            Self::Invalid(f) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_job",
                Some(f.field.clone()),
            ),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", None),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            Self::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full", None),
            Self::WebhookLimit { .. } => (StatusCode::CONFLICT, "webhook_limit", None),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        };
        let message = match &self {
            Self::Internal(e) => {
                tracing::error!(error = ?e, "Internal error.");
                "internal error; see the server log".to_owned()
            }
            Self::Unavailable(m) => {
                tracing::warn!(error = %m, "Dependency unavailable.");
                "a dependency (database or broker) is unavailable; retry later".to_owned()
            }
            Self::Invalid(f) | Self::BadParam(f) => f.message.clone(),
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message,
                field: field.filter(|f| !f.is_empty()),
            },
        };
        let mut r = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            // Waiting jobs drain at the fleet's pace; a few seconds is a
            // fair first guess for when there is room again.
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        r
    }
}
