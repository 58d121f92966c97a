//! [`EventStore`] on Postgres. Events are read with the snapshot's `xmin`
//! and `xmax` so the frontier can tell an in-flight id from a lost one; the
//! cursor advance, the deliveries and the NOTIFY to API processes commit
//! together.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::event::Event;
use crate::store::events::{
    AttemptRecord, DeliveryView, DueDelivery, EventPage, EventStore, Lag, NewDelivery,
    RetryOutcome, SecretOwner, Snapshot, Webhook,
};
use crate::store::postgres::PgStore;
use crate::store::{event_columns, ms, StoreResult};

static EVENT_COLUMNS: LazyLock<String> = LazyLock::new(|| event_columns("j.errors -> -1"));

fn row_to_event(r: &PgRow) -> anyhow::Result<Event> {
    let webhook: Option<serde_json::Value> = r.try_get("webhook")?;
    let progress: Option<serde_json::Value> = r.try_get("progress")?;
    Ok(Event {
        id: r.try_get("id")?,
        event_type: r.try_get("type")?,
        job_id: r.try_get("job_id")?,
        kind: r.try_get("kind")?,
        status: r.try_get("status")?,
        attempt: r.try_get("attempt")?,
        parent_id: r.try_get("parent_id")?,
        at: r.try_get("at")?,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
        progress: progress
            .map(serde_json::from_value)
            .transpose()
            .context("stored progress report")?,
        webhook: webhook
            .map(serde_json::from_value)
            .transpose()
            .context("stored job webhook")?,
        tenant: r.try_get("tenant")?,
    })
}

fn row_to_webhook(r: &PgRow) -> Result<Webhook, sqlx::Error> {
    Ok(Webhook {
        id: r.try_get("id")?,
        url: r.try_get("url")?,
        events: r.try_get("events")?,
        kinds: r.try_get("kinds")?,
        tenant: r.try_get("tenant")?,
        disabled_at: r.try_get("disabled_at")?,
        disabled_reason: r.try_get("disabled_reason")?,
        created_at: r.try_get("created_at")?,
    })
}

fn row_to_delivery(r: &PgRow) -> Result<DeliveryView, sqlx::Error> {
    let status: String = r.try_get("status")?;
    let next: DateTime<Utc> = r.try_get("next_attempt_at")?;
    Ok(DeliveryView {
        id: r.try_get("id")?,
        webhook_id: r.try_get("webhook_id")?,
        job_id: r.try_get("job_id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        url: r.try_get("url")?,
        next_attempt_at: (status == "pending").then_some(next),
        status,
        attempts: r.try_get("attempts")?,
        last_status: r.try_get("last_status")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

#[async_trait]
impl EventStore for PgStore {
    async fn read_after(&self, after: i64, limit: i64) -> StoreResult<EventPage> {
        // One statement, one snapshot: the rows and the xmin/xmax the
        // frontier judges gaps by must come from the same instant.
        let rows = sqlx::query(&format!(
            "SELECT {cols},
                    pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
                    pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax
             FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id
             WHERE e.id > $1 ORDER BY e.id LIMIT $2",
            cols = EVENT_COLUMNS.as_str()
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let snapshot = match rows.first() {
            Some(r) => Snapshot {
                xmin: r.try_get("xmin")?,
                xmax: r.try_get("xmax")?,
            },
            None => Snapshot::SERIAL,
        };
        let events = rows
            .iter()
            .map(row_to_event)
            .collect::<anyhow::Result<_>>()?;
        Ok(EventPage { events, snapshot })
    }

    async fn events_between(&self, after: i64, upto: i64, limit: i64) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(&format!(
            "SELECT {cols} FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id
             WHERE e.id > $1 AND e.id <= $2 ORDER BY e.id LIMIT $3",
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
        // The row lock on the cursor serialises two notifiers; the loser
        // re-evaluates `last_id = from` after the winner commits, matches
        // nothing and writes nothing, so no delivery is ever doubled.
        let moved = sqlx::query(
            "UPDATE notifier_cursor SET last_id = $2 WHERE name = 'main' AND last_id = $1",
        )
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved != 1 {
            return Ok(false);
        }
        if !ds.is_empty() {
            let col = |f: fn(&NewDelivery) -> String| ds.iter().map(f).collect::<Vec<_>>();
            sqlx::query(
                "INSERT INTO webhook_deliveries
                   (id, webhook_id, job_id, event_id, event_type, url, body, event_at, host)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[],
                                      $6::text[], $7::text[], $8::timestamptz[], $9::text[])",
            )
            .bind(ds.iter().map(|d| d.id).collect::<Vec<_>>())
            .bind(ds.iter().map(|d| d.webhook_id).collect::<Vec<_>>())
            .bind(ds.iter().map(|d| d.job_id).collect::<Vec<_>>())
            .bind(ds.iter().map(|d| d.event_id).collect::<Vec<_>>())
            .bind(col(|d| d.event_type.clone()))
            .bind(col(|d| d.url.clone()))
            .bind(col(|d| d.body.clone()))
            .bind(ds.iter().map(|d| d.event_at).collect::<Vec<_>>())
            .bind(col(|d| d.host.clone()))
            .execute(&mut *tx)
            .await?;
        }
        // One NOTIFY per batch from a single writer: cheap, and it tells API
        // processes in other processes that events up to `to` are final.
        sqlx::query("SELECT pg_notify($1, $2::text)")
            .bind(crate::store::events::CURSOR_CHANNEL)
            .bind(to)
            .execute(&mut *tx)
            .await?;
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
        let mut tx = self.pool().begin().await?;
        // Under READ COMMITTED two inserts would each count the other's
        // place as free: a per-tenant lock until commit makes count and
        // insert one step, without locking other tenants out.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('stevedore.webhooks:' || $1, 0))",
        )
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "INSERT INTO webhooks (id, url, secret, events, kinds, tenant)
             SELECT $1, $2, $3, $4, $5, $6
             WHERE (SELECT count(*) FROM webhooks WHERE tenant = $6) < $7
             RETURNING *",
        )
        .bind(Uuid::now_v7())
        .bind(url)
        .bind(secret)
        .bind(events)
        .bind(kinds)
        .bind(tenant)
        .bind(max_per_tenant)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.as_ref().map(row_to_webhook).transpose()?)
    }

    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>> {
        let rows = sqlx::query("SELECT * FROM webhooks ORDER BY id")
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(row_to_webhook).collect::<Result<_, _>>()?)
    }

    async fn delete_webhook(&self, id: Uuid) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn disable_webhook(&self, id: Uuid, reason: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhooks SET disabled_at = now(), disabled_reason = $2
             WHERE id = $1 AND disabled_at IS NULL",
        )
        .bind(id)
        .bind(reason)
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
        const DUE: &str = "((d.status = 'pending' AND d.next_attempt_at <= now())
                           OR (d.status = 'delivering' AND d.lease_until < now()))";
        // The window caps each receiving host's share of a batch so a
        // receiver with a backlog cannot crowd out the others; SKIP LOCKED lets
        // several notifiers share the work. A lease that ran out means the
        // notifier holding it died mid-request: the delivery is retried.
        let rows = sqlx::query(&format!(
            "WITH due AS (
                SELECT id FROM (
                  SELECT d.id, d.next_attempt_at,
                         row_number() OVER (PARTITION BY coalesce(d.host, d.url)
                                            ORDER BY d.next_attempt_at, d.id) AS rn
                  FROM webhook_deliveries d
                  WHERE {DUE} AND NOT (coalesce(d.host, d.url) = ANY($1))) w
                WHERE rn <= $2 ORDER BY next_attempt_at LIMIT $3
             ), pick AS (
                -- ids as an array: one pass over the window, then primary-key
                -- lookups (a join against the window made a nested loop).
                SELECT d.id FROM webhook_deliveries d
                WHERE d.id = ANY(ARRAY(SELECT id FROM due)) AND {DUE}
                FOR UPDATE SKIP LOCKED
             )
             UPDATE webhook_deliveries d SET status = 'delivering',
               lease_until = now() + $4 * interval '1 millisecond', updated_at = now()
             FROM pick WHERE d.id = pick.id
             RETURNING d.id, d.webhook_id, d.url, coalesce(d.host, d.url) AS host, d.body,
               d.attempts, d.event_at,
               (SELECT w.secret FROM webhooks w WHERE w.id = d.webhook_id) AS hook_secret,
               (SELECT w.disabled_at IS NOT NULL FROM webhooks w WHERE w.id = d.webhook_id) AS disabled,
               (SELECT j.webhook ->> 'secret' FROM jobs j WHERE j.id = d.job_id) AS job_secret,
               (SELECT j.tenant FROM jobs j WHERE j.id = d.job_id) AS tenant"
        ))
        .bind(skip)
        .bind(per_host)
        .bind(limit)
        .bind(ms(lease) as f64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let webhook_id: Option<Uuid> = r.try_get("webhook_id")?;
                let hook_secret: Option<String> = r.try_get("hook_secret")?;
                let job_secret: Option<String> = r.try_get("job_secret")?;
                Ok(DueDelivery {
                    id: r.try_get("id")?,
                    secret: if webhook_id.is_some() {
                        hook_secret
                    } else {
                        job_secret
                    },
                    webhook_id,
                    url: r.try_get("url")?,
                    host: r.try_get("host")?,
                    tenant: r.try_get("tenant")?,
                    body: r.try_get("body")?,
                    attempts: r.try_get("attempts")?,
                    event_at: r.try_get("event_at")?,
                    disabled: r.try_get::<Option<bool>, _>("disabled")?.unwrap_or(false),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn release_delivery(&self, id: Uuid) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', lease_until = NULL
             WHERE id = $1 AND status = 'delivering'",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn record_attempt(&self, id: Uuid, rec: &AttemptRecord) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $2, attempts = $3,
               next_attempt_at = coalesce($4, next_attempt_at), lease_until = NULL,
               last_status = $5, last_error = $6, updated_at = now(),
               finished_at = CASE WHEN $2 IN ('delivered', 'failed') THEN now() END
             WHERE id = $1 AND status = 'delivering'",
        )
        .bind(id)
        .bind(rec.status)
        .bind(rec.attempts)
        .bind(rec.next_attempt_at)
        .bind(rec.last_status)
        .bind(&rec.last_error)
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
            "SELECT * FROM webhook_deliveries d WHERE ($1::text IS NULL OR status = $1)
               AND ($3::text IS NULL OR EXISTS
                    (SELECT 1 FROM jobs j WHERE j.id = d.job_id AND j.tenant = $3))
             ORDER BY id DESC LIMIT $2",
        )
        .bind(status)
        .bind(limit)
        .bind(tenant)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(row_to_delivery).collect::<Result<_, _>>()?)
    }

    async fn retry_delivery(&self, id: Uuid, tenant: Option<&str>) -> StoreResult<RetryOutcome> {
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM webhook_deliveries d WHERE id = $1
               AND ($2::text IS NULL OR EXISTS
                    (SELECT 1 FROM jobs j WHERE j.id = d.job_id AND j.tenant = $2))",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(self.pool())
        .await?;
        if status.is_none() {
            return Ok(RetryOutcome::NotFound);
        }
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0,
               next_attempt_at = now(), finished_at = NULL, updated_at = now()
             WHERE id = $1 AND status = 'failed'",
        )
        .bind(id)
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
                "SELECT id, secret FROM webhooks WHERE id > $1 ORDER BY id LIMIT $2"
            }
            SecretOwner::Job => {
                "SELECT id, webhook ->> 'secret' AS secret FROM jobs
                 WHERE id > $1 AND webhook ->> 'secret' IS NOT NULL ORDER BY id LIMIT $2"
            }
        };
        Ok(sqlx::query_as(sql)
            .bind(after)
            .bind(limit)
            .fetch_all(self.pool())
            .await?)
    }

    async fn replace_secret(
        &self,
        owner: SecretOwner,
        id: Uuid,
        old: &str,
        new: &str,
    ) -> StoreResult<bool> {
        let sql = match owner {
            SecretOwner::Webhook => "UPDATE webhooks SET secret = $3 WHERE id = $1 AND secret = $2",
            SecretOwner::Job => {
                "UPDATE jobs SET webhook = jsonb_set(webhook, '{secret}', to_jsonb($3::text))
                 WHERE id = $1 AND webhook ->> 'secret' = $2"
            }
        };
        let n = sqlx::query(sql)
            .bind(id)
            .bind(old)
            .bind(new)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn prune(&self, age: Duration) -> StoreResult<u64> {
        let age = ms(age) as f64;
        let events = sqlx::query(
            "DELETE FROM job_events WHERE id IN (
                SELECT id FROM job_events
                WHERE at < now() - $1 * interval '1 millisecond'
                  AND id <= (SELECT last_id FROM notifier_cursor WHERE name = 'main')
                ORDER BY id LIMIT 10000)",
        )
        .bind(age)
        .execute(self.pool())
        .await?
        .rows_affected();
        let deliveries = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE status = 'delivered'
               AND finished_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(age)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(events + deliveries)
    }

    async fn lag(&self) -> StoreResult<Lag> {
        let (oldest_unhandled, oldest_undelivered) = sqlx::query_as(
            "SELECT (SELECT at FROM job_events
                     WHERE id > (SELECT last_id FROM notifier_cursor WHERE name = 'main')
                     ORDER BY id LIMIT 1),
                    (SELECT min(event_at) FROM webhook_deliveries
                     WHERE status IN ('pending', 'delivering'))",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Lag {
            oldest_unhandled,
            oldest_undelivered,
        })
    }

    async fn listen(&self, channel: &'static str, wake: Arc<Notify>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let mut listener = match PgListener::connect_with(self.pool()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, channel, "LISTEN connection failed; polling meanwhile.");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            };
            if let Err(e) = listener.listen(channel).await {
                tracing::warn!(error = %e, channel, "LISTEN failed; polling meanwhile.");
                continue;
            }
            // A notification may have been sent between the last read and
            // this LISTEN: wake once so the caller reads again.
            wake.notify_one();
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(_) => wake.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, channel, "LISTEN connection lost.");
                            break;
                        }
                    },
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}
