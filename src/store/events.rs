//! The notifier's queries, kept out of the core [`super::Store`] trait:
//! [`EventStore`] reads events in order, advances the persisted cursor
//! together with the webhook deliveries it writes, and keeps webhooks and
//! their deliveries. Implemented in `postgres/events.rs` and
//! `sqlite/events.rs`.
//!
//! Secrets pass through here as stored (sealed by
//! [`crate::notifier::keyring`] when a key is set): the store never sees a
//! key, so both dialects only move opaque text.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use super::StoreResult;
use crate::model::event::Event;

/// The snapshot a page of events was read in (Postgres `xid8`s as i64).
/// SQLite has one writer and no in-flight rows: use [`Snapshot::SERIAL`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub xmin: i64,
    pub xmax: i64,
}

impl Snapshot {
    /// Every gap is final at once.
    pub const SERIAL: Snapshot = Snapshot {
        xmin: i64::MAX,
        xmax: 0,
    };
}

/// Events read after a cursor, and the snapshot they were read in.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub snapshot: Snapshot,
}

/// A delivery to write with the cursor advance.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: Uuid,
    /// None for a job's own webhook.
    pub webhook_id: Option<Uuid>,
    pub job_id: Uuid,
    pub event_id: i64,
    pub event_type: String,
    pub url: String,
    /// What deliveries are limited by ([`crate::notifier::urls::host_key`]).
    pub host: String,
    /// The exact body, so every retry sends (and signs) the same bytes.
    pub body: String,
    pub event_at: DateTime<Utc>,
}

/// A registered endpoint (its secret is shown only when it is created).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Webhook {
    pub id: Uuid,
    /// User-info, if any, is shown as `***`.
    #[serde(serialize_with = "crate::notifier::urls::serialize_redacted")]
    pub url: String,
    pub events: Vec<String>,
    pub kinds: Option<Vec<String>>,
    /// Only this tenant's job events are delivered to it.
    #[serde(skip)]
    pub tenant: String,
    /// Set when a receiver answered 410 Gone.
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: Uuid,
    pub webhook_id: Option<Uuid>,
    pub url: String,
    /// The limit key: the receiving host (the URL for rows written before
    /// hosts were kept).
    pub host: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i32,
    pub event_at: DateTime<Utc>,
    /// The endpoint's or the job's secret as stored (maybe sealed); None
    /// for a job webhook without one: signed with its tenant's secret.
    pub secret: Option<String>,
    /// The job's tenant (None once the job is purged).
    pub tenant: Option<String>,
    /// The endpoint was disabled (410) after this delivery was written.
    pub disabled: bool,
}

/// What an attempt leaves in the row.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// `delivered`, `pending` (to retry at `next_attempt_at`) or `failed`.
    pub status: &'static str,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
}

/// A delivery as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryView {
    /// Also the `webhook-id` header, with a `msg_` prefix.
    pub id: Uuid,
    pub webhook_id: Option<Uuid>,
    pub job_id: Uuid,
    pub event_id: i64,
    pub event_type: String,
    /// User-info, if any, is shown as `***`.
    #[serde(serialize_with = "crate::notifier::urls::serialize_redacted")]
    pub url: String,
    /// `pending`, `delivering`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    Queued,
    NotFailed(String),
    NotFound,
}

/// How far behind the notifier and webhooks are.
#[derive(Debug, Clone, Default)]
pub struct Lag {
    /// Oldest event the notifier has not handled yet.
    pub oldest_unhandled: Option<DateTime<Utc>>,
    /// Oldest event with a delivery not yet delivered or failed.
    pub oldest_undelivered: Option<DateTime<Utc>>,
}

/// Where a stored webhook secret lives, for the re-encryption pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretOwner {
    /// `webhooks.secret`.
    Webhook,
    /// `secret` inside `jobs.webhook`.
    Job,
}

/// The NOTIFY channel the job_events trigger wakes the notifier on.
pub const EVENTS_CHANNEL: &str = "stevedore_events";
/// The NOTIFY channel the notifier announces its new cursor on.
pub const CURSOR_CHANNEL: &str = "stevedore_cursor";

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Up to `limit` events with id > `after`, ascending.
    async fn read_after(&self, after: i64, limit: i64) -> StoreResult<EventPage>;
    /// Events in (`after`, `upto`], ascending: rows at or below the cursor
    /// are final, so no gap handling is needed.
    async fn events_between(&self, after: i64, upto: i64, limit: i64) -> StoreResult<Vec<Event>>;
    async fn cursor(&self) -> StoreResult<i64>;
    /// Moves the cursor from `from` to `to` and writes `deliveries`, in one
    /// transaction; false (and nothing written) if the cursor was not at
    /// `from` any more (another notifier handled the batch).
    async fn advance(&self, from: i64, to: i64, deliveries: &[NewDelivery]) -> StoreResult<bool>;

    /// Registers an endpoint unless its tenant already has `max_per_tenant`
    /// (then None). The count and the insert are one step, so two
    /// concurrent requests cannot both take the last place.
    async fn create_webhook(
        &self,
        tenant: &str,
        url: &str,
        secret: &str,
        events: &[String],
        kinds: Option<&[String]>,
        max_per_tenant: i64,
    ) -> StoreResult<Option<Webhook>>;
    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>>;
    async fn delete_webhook(&self, id: Uuid) -> StoreResult<bool>;
    async fn disable_webhook(&self, id: Uuid, reason: &str) -> StoreResult<()>;

    /// Takes due deliveries (and ones whose lease ran out) for one attempt,
    /// at most `per_host` per receiving host and none for the hosts in
    /// `skip`.
    async fn claim_deliveries(
        &self,
        limit: i64,
        per_host: i64,
        skip: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<DueDelivery>>;
    /// Gives a claimed delivery back untouched.
    async fn release_delivery(&self, id: Uuid) -> StoreResult<()>;
    async fn record_attempt(&self, id: Uuid, rec: &AttemptRecord) -> StoreResult<()>;
    /// Deliveries newest first; with `tenant`, only those of its jobs' events.
    async fn list_deliveries(
        &self,
        status: Option<&str>,
        limit: i64,
        tenant: Option<&str>,
    ) -> StoreResult<Vec<DeliveryView>>;
    /// A failed delivery goes back to pending with a fresh schedule; with
    /// `tenant`, another tenant's delivery is not found.
    async fn retry_delivery(&self, id: Uuid, tenant: Option<&str>) -> StoreResult<RetryOutcome>;

    /// Up to `limit` stored secrets of `owner` with ids after `after`, by id
    /// (job webhooks without a secret are left out).
    async fn stored_secrets(
        &self,
        owner: SecretOwner,
        after: Uuid,
        limit: i64,
    ) -> StoreResult<Vec<(Uuid, String)>>;
    /// Replaces a stored secret if it still is `old`; false otherwise.
    async fn replace_secret(
        &self,
        owner: SecretOwner,
        id: Uuid,
        old: &str,
        new: &str,
    ) -> StoreResult<bool>;

    /// Deletes handled events and delivered deliveries older than `age`.
    async fn prune(&self, age: Duration) -> StoreResult<u64>;
    async fn lag(&self) -> StoreResult<Lag>;
    /// Calls `wake.notify_one()` on every NOTIFY on `channel` until `stop`
    /// (re-listening after errors). SQLite has no NOTIFY: it returns at once
    /// and dev mode wakes in process instead.
    async fn listen(&self, channel: &'static str, wake: Arc<Notify>, stop: CancellationToken);
}
