//! The notifier: turns the durable `job_events` rows into stream messages
//! and webhook deliveries.
//!
//! # Layout
//! - [`gaps`]: reading ids in order without skipping a late commit.
//! - [`hub`]: fan-out to the stream clients of an API process.
//! - [`deliver`]: signed webhook delivery with retries, limited per host.
//! - [`guard`]: the SSRF guard for webhook targets.
//! - [`keyring`]: webhook secrets sealed at rest, and their re-encryption.
//! - [`urls`]: user-info redaction and the per-host limit key.
//!
//! What watchers see is [`crate::model::event`]; the queries are
//! [`crate::store::events::EventStore`]'s.
//!
//! The [`Notifier`] service reads events after its persisted cursor, writes
//! the deliveries they call for and moves the cursor in one transaction, so
//! a restart resumes exactly where the last commit left off and no delivery
//! is lost or doubled. Transactions that write events wake it (NOTIFY, at
//! most once per 10 ms; in process on SQLite); a short poll is the safety
//! net. Each advance wakes the API processes' hubs, which then read the
//! newly final rows.

pub mod deliver;
pub mod gaps;
pub mod guard;
pub mod hub;
pub mod keyring;
pub mod urls;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use self::gaps::Frontier;
use self::guard::UrlGuard;
use self::keyring::Keyring;
use crate::metrics;
use crate::model::event::Event;
use crate::model::secret::Secret;
use crate::store::events::{EventStore, NewDelivery, Webhook, EVENTS_CHANNEL};
use crate::store::StoreResult;

/// How webhooks are delivered.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Delays between attempts; one more attempt than delays.
    pub schedule: Vec<Duration>,
    pub timeout: Duration,
    /// Requests in flight per receiving host (all its URLs together).
    pub per_host: usize,
    pub max_inflight: usize,
    /// `STEVEDORE_WEBHOOK_SECRET`: the root each tenant's signing secret is
    /// derived from ([`Secret::for_tenant`]); signs nothing itself.
    pub tenant_root: Option<Secret>,
    /// Seals secrets before they are stored and opens them to sign.
    pub keys: Arc<Keyring>,
    /// Registered endpoints per tenant.
    pub max_per_tenant: usize,
    pub guard: Arc<dyn UrlGuard>,
}

#[derive(Clone)]
pub struct NotifierConfig {
    pub batch: i64,
    /// Safety-net poll when no wake-up comes.
    pub poll: Duration,
    /// Handled events and delivered deliveries older than this are pruned.
    pub retention: Duration,
    pub webhook: WebhookConfig,
}

pub struct Notifier {
    store: Arc<dyn EventStore>,
    cfg: NotifierConfig,
    frontier: Frontier,
    cursor: Option<i64>,
    /// Rung after every advance: the in-process API hub, if any.
    hub_wake: Option<Arc<Notify>>,
    deliverer: Arc<deliver::Deliverer>,
}

impl Notifier {
    pub fn new(
        store: Arc<dyn EventStore>,
        cfg: NotifierConfig,
        hub_wake: Option<Arc<Notify>>,
    ) -> Self {
        let deliverer = deliver::Deliverer::new(store.clone(), cfg.webhook.clone(), cfg.poll);
        Self {
            store,
            cfg,
            frontier: Frontier::default(),
            cursor: None,
            hub_wake,
            deliverer,
        }
    }

    /// Handles one batch of events; returns how many were handled.
    pub async fn run_once(&mut self) -> StoreResult<usize> {
        let cursor = match self.cursor {
            Some(c) => c,
            None => self.store.cursor().await?,
        };
        self.cursor = Some(cursor);
        let page = self.store.read_after(cursor, self.cfg.batch).await?;
        let ids: Vec<i64> = page.events.iter().map(|e| e.id).collect();
        let (n, to) = self.frontier.advance(cursor, &ids, page.snapshot);
        if n == 0 {
            return Ok(0);
        }
        let events = &page.events[..n];
        let hooks: Vec<Webhook> = self
            .store
            .list_webhooks()
            .await?
            .into_iter()
            .filter(|w| w.disabled_at.is_none())
            .collect();
        let deliveries = deliveries_for(events, &hooks);
        if !self.store.advance(cursor, to, &deliveries).await? {
            // Another notifier moved the cursor: start again from its position.
            tracing::info!("Another notifier advanced the cursor; following it.");
            self.cursor = None;
            self.frontier.reset();
            return Ok(0);
        }
        self.cursor = Some(to);
        for e in events {
            metrics::EVENTS.with_label_values(&[&e.event_type]).inc();
        }
        if let Some(w) = &self.hub_wake {
            w.notify_one();
        }
        if !deliveries.is_empty() {
            self.deliverer.wake.notify_one();
        }
        Ok(n)
    }

    /// Runs the notifier, the deliverer and the pruner until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let wake = Arc::new(Notify::new());
        tracker.spawn({
            let (store, wake, stop) = (self.store.clone(), wake.clone(), stop.clone());
            async move { store.listen(EVENTS_CHANNEL, wake, stop).await }
        });
        tracker.spawn(self.deliverer.clone().run(stop.clone()));
        tracker.spawn(housekeeping(
            self.store.clone(),
            self.cfg.retention,
            stop.clone(),
        ));
        while !stop.is_cancelled() {
            match self.run_once().await {
                Ok(n) if n as i64 >= self.cfg.batch => continue,
                Ok(_) => {}
                Err(e) => {
                    self.cursor = None;
                    tracing::warn!(error = %e, "Notifier batch failed; will retry.");
                }
            }
            tokio::select! {
                () = wake.notified() => {},
                () = tokio::time::sleep(self.cfg.poll) => {},
                () = stop.cancelled() => {},
            }
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// The deliveries a batch of events calls for: registered endpoints that
/// subscribed to the type (and kind), and the job's own webhook on its
/// terminal event.
pub fn deliveries_for(events: &[Event], hooks: &[Webhook]) -> Vec<NewDelivery> {
    let mut out = Vec::new();
    for e in events {
        let mut push = |webhook_id, url: &str| {
            out.push(NewDelivery {
                id: Uuid::now_v7(),
                webhook_id,
                job_id: e.job_id,
                event_id: e.id,
                event_type: e.event_type.clone(),
                url: url.to_owned(),
                host: urls::host_key(url),
                body: e.webhook_body(),
                event_at: e.at,
            })
        };
        for h in hooks {
            let kind_ok = h.kinds.as_ref().is_none_or(|k| k.contains(&e.kind));
            let tenant_ok = e.tenant.as_ref() == Some(&h.tenant);
            if tenant_ok && kind_ok && h.events.contains(&e.event_type) {
                push(Some(h.id), &h.url);
            }
        }
        if let (true, Some(w)) = (e.is_terminal(), &e.webhook) {
            push(None, &w.url);
        }
    }
    out
}

/// Refreshes the lag gauges every few seconds and prunes once a minute.
async fn housekeeping(store: Arc<dyn EventStore>, retention: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            () = stop.cancelled() => return,
        }
        match store.lag().await {
            Ok(lag) => {
                let age = |t: Option<chrono::DateTime<Utc>>| {
                    t.map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0))
                };
                metrics::EVENT_LAG
                    .with_label_values(&["notifier"])
                    .set(age(lag.oldest_unhandled));
                metrics::EVENT_LAG
                    .with_label_values(&["webhook"])
                    .set(age(lag.oldest_undelivered));
            }
            Err(e) => tracing::warn!(error = %e, "Reading notifier lag failed."),
        }
        if n.is_multiple_of(12) {
            match store.prune(retention).await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(rows, "Pruned old events and deliveries."),
                Err(e) => tracing::warn!(error = %e, "Pruning failed; will retry."),
            }
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(tenant: &str) -> Webhook {
        Webhook {
            id: Uuid::now_v7(),
            url: format!("http://127.0.0.1:1/{tenant}"),
            events: vec!["job.succeeded".into()],
            kinds: None,
            tenant: tenant.into(),
            disabled_at: None,
            disabled_reason: None,
            created_at: chrono::Utc::now(),
        }
    }

    fn event(tenant: Option<&str>) -> Event {
        Event {
            id: 7,
            event_type: "job.succeeded".into(),
            job_id: Uuid::now_v7(),
            kind: "probe".into(),
            status: "succeeded".into(),
            attempt: 1,
            parent_id: None,
            at: chrono::Utc::now(),
            result: None,
            error: None,
            progress: None,
            webhook: None,
            tenant: tenant.map(str::to_owned),
        }
    }

    #[test]
    fn a_webhook_gets_only_its_own_tenants_events() {
        let (a, b) = (hook("a"), hook("b"));
        let out = deliveries_for(&[event(Some("a"))], &[a.clone(), b]);
        let to: Vec<Option<Uuid>> = out.iter().map(|d| d.webhook_id).collect();
        assert_eq!(to, vec![Some(a.id)]);
        assert!(
            deliveries_for(&[event(None)], &[a]).is_empty(),
            "a purged job's event goes nowhere"
        );
    }
}
