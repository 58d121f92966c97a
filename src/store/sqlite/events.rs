//! [`EventStore`] on SQLite for `stevedore dev`. The store's single
//! connection serialises every transaction, so ids are visible in commit
//! order and the frontier never waits ([`Snapshot::SERIAL`]); instead of
//! NOTIFY, the store's event writes ring the in-process
//! bell (see [`SqliteStore`]).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::event::Event;
use crate::store::events::{
    AttemptRecord, DeliveryView, DueDelivery, EventPage, EventStore, Lag, NewDelivery,
    RetryOutcome, SecretOwner, Snapshot, Webhook, EVENTS_CHANNEL,
};
use crate::store::sqlite::{now_ms, SqliteStore};
use crate::store::{event_columns, ms, StoreResult};

fn t(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|v| Utc.timestamp_millis_opt(v).single())
}

fn uuid(s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("bad id {s:?} in the database"))
}

static EVENT_COLUMNS: LazyLock<String> =
    LazyLock::new(|| event_columns("json_extract(j.errors, '$[#-1]')"));

fn row_to_event(r: &SqliteRow) -> anyhow::Result<Event> {
    let json = |c: &str| -> anyhow::Result<Option<serde_json::Value>> {
        let s: Option<String> = r.try_get(c)?;
        Ok(s.as_deref().map(serde_json::from_str).transpose()?)
    };
    let parent: Option<String> = r.try_get("parent_id")?;
    let webhook: Option<String> = r.try_get("webhook")?;
    Ok(Event {
        id: r.try_get("id")?,
        event_type: r.try_get("type")?,
        job_id: uuid(r.try_get("job_id")?)?,
        kind: r.try_get("kind")?,
        status: r.try_get("status")?,
        attempt: r.try_get("attempt")?,
        parent_id: parent.as_deref().map(uuid).transpose()?,
        at: t(r.try_get("at")?).unwrap_or_default(),
        result: json("result")?,
        error: json("error")?,
        progress: json("progress")?
            .map(serde_json::from_value)
            .transpose()
            .context("stored progress report")?,
        webhook: webhook.as_deref().map(serde_json::from_str).transpose()?,
        tenant: r.try_get("tenant")?,
    })
}

fn row_to_webhook(r: &SqliteRow) -> anyhow::Result<Webhook> {
    let events: String = r.try_get("events")?;
    let kinds: Option<String> = r.try_get("kinds")?;
    Ok(Webhook {
        id: uuid(r.try_get("id")?)?,
        url: r.try_get("url")?,
        events: serde_json::from_str(&events)?,
        kinds: kinds.as_deref().map(serde_json::from_str).transpose()?,
        tenant: r.try_get("tenant")?,
        disabled_at: t(r.try_get("disabled_at")?),
        disabled_reason: r.try_get("disabled_reason")?,
        created_at: t(r.try_get("created_at")?).unwrap_or_default(),
    })
}

fn row_to_delivery(r: &SqliteRow) -> anyhow::Result<DeliveryView> {
    let status: String = r.try_get("status")?;
    let hook: Option<String> = r.try_get("webhook_id")?;
    Ok(DeliveryView {
        id: uuid(r.try_get("id")?)?,
        webhook_id: hook.as_deref().map(uuid).transpose()?,
        job_id: uuid(r.try_get("job_id")?)?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        url: r.try_get("url")?,
        next_attempt_at: if status == "pending" {
            t(r.try_get("next_attempt_at")?)
        } else {
            None
        },
        status,
        attempts: r.try_get("attempts")?,
        last_status: r.try_get("last_status")?,
        last_error: r.try_get("last_error")?,
        created_at: t(r.try_get("created_at")?).unwrap_or_default(),
        finished_at: t(r.try_get("finished_at")?),
    })
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn read_after(&self, after: i64, limit: i64) -> StoreResult<EventPage> {
        let events = self.events_between(after, i64::MAX, limit).await?;
        Ok(EventPage {
            events,
            snapshot: Snapshot::SERIAL,
        })
    }

    async fn events_between(&self, after: i64, upto: i64, limit: i64) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(&format!(
            "SELECT {cols} FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id
             WHERE e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?",
            cols = EVENT_COLUMNS.as_str()
        ))
        .bind(after)
        .bind(upto)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(row_to_event)
            .collect::<anyhow::Result<_>>()?)
    }

    async fn cursor(&self) -> StoreResult<i64> {
        let c: Option<i64> =
            sqlx::query_scalar("SELECT last_id FROM notifier_cursor WHERE name = 'main'")
                .fetch_optional(self.pool())
                .await?;
        Ok(c.unwrap_or(0))
    }

    async fn advance(&self, from: i64, to: i64, ds: &[NewDelivery]) -> StoreResult<bool> {
        let mut tx = self.pool().begin().await?;
        let moved = sqlx::query(
            "UPDATE notifier_cursor SET last_id = ? WHERE name = 'main' AND last_id = ?",
        )
        .bind(to)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved != 1 {
            return Ok(false);
        }
        let now = now_ms();
        for d in ds {
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, webhook_id, job_id, event_id, event_type, url,
                   body, next_attempt_at, event_at, created_at, updated_at, host)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(d.id.to_string())
            .bind(d.webhook_id.map(|w| w.to_string()))
            .bind(d.job_id.to_string())
            .bind(d.event_id)
            .bind(&d.event_type)
            .bind(&d.url)
            .bind(&d.body)
            .bind(now)
            .bind(d.event_at.timestamp_millis())
            .bind(now)
            .bind(now)
            .bind(&d.host)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn create_webhook(
        &self,
        tenant: &str,
        url: &str,
        secret: &str,
        events: &[String],
        kinds: Option<&[String]>,
        max_per_tenant: i64,
    ) -> StoreResult<Option<Webhook>> {
        // One statement on the store's single writer: the count and the
        // insert cannot interleave with another create.
        let row = sqlx::query(
            "INSERT INTO webhooks (id, url, secret, events, kinds, created_at, tenant)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
             WHERE (SELECT count(*) FROM webhooks WHERE tenant = ?7) < ?8
             RETURNING *",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(url)
        .bind(secret)
        .bind(serde_json::to_string(events).context("events")?)
        .bind(
            kinds
                .map(serde_json::to_string)
                .transpose()
                .context("kinds")?,
        )
        .bind(now_ms())
        .bind(tenant)
        .bind(max_per_tenant)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(row_to_webhook).transpose()?)
    }

    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>> {
        let rows = sqlx::query("SELECT * FROM webhooks ORDER BY id")
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .iter()
            .map(row_to_webhook)
            .collect::<anyhow::Result<_>>()?)
    }

    async fn delete_webhook(&self, id: Uuid) -> StoreResult<bool> {
        let mut tx = self.pool().begin().await?;
        // SQLite enforces foreign keys only when asked; delete explicitly.
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM webhooks WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn disable_webhook(&self, id: Uuid, reason: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhooks SET disabled_at = ?, disabled_reason = ?
             WHERE id = ? AND disabled_at IS NULL",
        )
        .bind(now_ms())
        .bind(reason)
        .bind(id.to_string())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn claim_deliveries(
        &self,
        limit: i64,
        per_host: i64,
        skip: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<DueDelivery>> {
        let now = now_ms();
        let skip = serde_json::to_string(skip).context("skip list")?;
        // One connection: the select and the updates below cannot interleave
        // with another claim, so no row lock is needed.
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "SELECT * FROM (
               SELECT d.id, d.webhook_id, d.url, coalesce(d.host, d.url) AS host, d.body,
                 d.attempts, d.event_at, d.next_attempt_at,
                 w.secret AS hook_secret, w.disabled_at AS disabled,
                 json_extract(j.webhook, '$.secret') AS job_secret, j.tenant,
                 row_number() OVER (PARTITION BY coalesce(d.host, d.url)
                                    ORDER BY d.next_attempt_at, d.id) AS rn
               FROM webhook_deliveries d
               LEFT JOIN webhooks w ON w.id = d.webhook_id LEFT JOIN jobs j ON j.id = d.job_id
               WHERE ((d.status = 'pending' AND d.next_attempt_at <= ?1)
                      OR (d.status = 'delivering' AND d.lease_until < ?1))
                 AND coalesce(d.host, d.url) NOT IN (SELECT value FROM json_each(?2)))
             WHERE rn <= ?3 ORDER BY next_attempt_at LIMIT ?4",
        )
        .bind(now)
        .bind(skip)
        .bind(per_host)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("id")?;
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'delivering', lease_until = ?, updated_at = ?
                 WHERE id = ?",
            )
            .bind(now + ms(lease))
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            let hook: Option<String> = r.try_get("webhook_id")?;
            let disabled: Option<i64> = r.try_get("disabled")?;
            out.push(DueDelivery {
                id: uuid(&id)?,
                secret: if hook.is_some() {
                    r.try_get("hook_secret")?
                } else {
                    r.try_get("job_secret")?
                },
                webhook_id: hook.as_deref().map(uuid).transpose()?,
                url: r.try_get("url")?,
                host: r.try_get("host")?,
                tenant: r.try_get("tenant")?,
                body: r.try_get("body")?,
                attempts: r.try_get("attempts")?,
                event_at: t(r.try_get("event_at")?).unwrap_or_default(),
                disabled: disabled.is_some(),
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn release_delivery(&self, id: Uuid) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', lease_until = NULL
             WHERE id = ? AND status = 'delivering'",
        )
        .bind(id.to_string())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn record_attempt(&self, id: Uuid, rec: &AttemptRecord) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "UPDATE webhook_deliveries SET status = ?2, attempts = ?3,
               next_attempt_at = coalesce(?4, next_attempt_at), lease_until = NULL,
               last_status = ?5, last_error = ?6, updated_at = ?7,
               finished_at = CASE WHEN ?2 IN ('delivered', 'failed') THEN ?7 END
             WHERE id = ?1 AND status = 'delivering'",
        )
        .bind(id.to_string())
        .bind(rec.status)
        .bind(rec.attempts)
        .bind(rec.next_attempt_at.map(|t| t.timestamp_millis()))
        .bind(rec.last_status)
        .bind(&rec.last_error)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn list_deliveries(
        &self,
        status: Option<&str>,
        limit: i64,
        tenant: Option<&str>,
    ) -> StoreResult<Vec<DeliveryView>> {
        let rows = sqlx::query(
            "SELECT * FROM webhook_deliveries d WHERE (?1 IS NULL OR status = ?1)
               AND (?3 IS NULL OR EXISTS
                    (SELECT 1 FROM jobs j WHERE j.id = d.job_id AND j.tenant = ?3))
             ORDER BY id DESC LIMIT ?2",
        )
        .bind(status)
        .bind(limit)
        .bind(tenant)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(row_to_delivery)
            .collect::<anyhow::Result<_>>()?)
    }

    async fn retry_delivery(&self, id: Uuid, tenant: Option<&str>) -> StoreResult<RetryOutcome> {
        let sid = id.to_string();
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM webhook_deliveries d WHERE id = ?1
               AND (?2 IS NULL OR EXISTS
                    (SELECT 1 FROM jobs j WHERE j.id = d.job_id AND j.tenant = ?2))",
        )
        .bind(&sid)
        .bind(tenant)
        .fetch_optional(self.pool())
        .await?;
        if status.is_none() {
            return Ok(RetryOutcome::NotFound);
        }
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?,
               finished_at = NULL, updated_at = ? WHERE id = ? AND status = 'failed'",
        )
        .bind(now_ms())
        .bind(now_ms())
        .bind(&sid)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(match (n, status) {
            (1, _) => RetryOutcome::Queued,
            (_, Some(s)) => RetryOutcome::NotFailed(s),
            (_, None) => RetryOutcome::NotFound,
        })
    }

    async fn stored_secrets(
        &self,
        owner: SecretOwner,
        after: Uuid,
        limit: i64,
    ) -> StoreResult<Vec<(Uuid, String)>> {
        let sql = match owner {
            SecretOwner::Webhook => {
                "SELECT id, secret FROM webhooks WHERE id > ? ORDER BY id LIMIT ?"
            }
            SecretOwner::Job => {
                "SELECT id, json_extract(webhook, '$.secret') AS secret FROM jobs
                 WHERE id > ? AND json_extract(webhook, '$.secret') IS NOT NULL
                 ORDER BY id LIMIT ?"
            }
        };
        let rows: Vec<(String, String)> = sqlx::query_as(sql)
            .bind(after.to_string())
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, secret)| Ok((uuid(&id)?, secret)))
            .collect::<anyhow::Result<_>>()?)
    }

    async fn replace_secret(
        &self,
        owner: SecretOwner,
        id: Uuid,
        old: &str,
        new: &str,
    ) -> StoreResult<bool> {
        let sql = match owner {
            SecretOwner::Webhook => "UPDATE webhooks SET secret = ?3 WHERE id = ?1 AND secret = ?2",
            SecretOwner::Job => {
                "UPDATE jobs SET webhook = json_set(webhook, '$.secret', ?3)
                 WHERE id = ?1 AND json_extract(webhook, '$.secret') = ?2"
            }
        };
        let n = sqlx::query(sql)
            .bind(id.to_string())
            .bind(old)
            .bind(new)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn prune(&self, age: Duration) -> StoreResult<u64> {
        let before = now_ms() - ms(age);
        let events = sqlx::query(
            "DELETE FROM job_events WHERE at < ?
               AND id <= (SELECT last_id FROM notifier_cursor WHERE name = 'main')",
        )
        .bind(before)
        .execute(self.pool())
        .await?
        .rows_affected();
        let deliveries = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE status = 'delivered' AND finished_at < ?",
        )
        .bind(before)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(events + deliveries)
    }

    async fn lag(&self) -> StoreResult<Lag> {
        let (a, b): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT at FROM job_events
                     WHERE id > (SELECT last_id FROM notifier_cursor WHERE name = 'main')
                     ORDER BY id LIMIT 1),
                    (SELECT min(event_at) FROM webhook_deliveries
                     WHERE status IN ('pending', 'delivering'))",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Lag {
            oldest_unhandled: t(a),
            oldest_undelivered: t(b),
        })
    }

    /// No NOTIFY on SQLite: event writes ring the store's bell in process,
    /// and that stands in for the events channel. Other channels have no
    /// writer in another process to hear from.
    async fn listen(&self, channel: &'static str, wake: Arc<Notify>, stop: CancellationToken) {
        if channel != EVENTS_CHANNEL {
            return;
        }
        loop {
            tokio::select! {
                () = self.bell.notified() => wake.notify_one(),
                () = stop.cancelled() => return,
            }
        }
    }
}
