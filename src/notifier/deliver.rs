//! Webhook delivery: claims due delivery rows, POSTs them signed, and
//! records each attempt's outcome on the row: 2xx delivered; 429, 5xx,
//! timeouts and connection errors retried on the schedule; 410 Gone fails
//! and disables the endpoint; anything else (redirects included, which are
//! never followed) fails at once. Concurrency is bounded per receiving
//! host (every URL on one host shares the limit, so a receiver cannot be
//! flooded by registering many paths) and overall; a receiver's answer is
//! read up to [`MAX_ANSWER`] and no further; and a request never holds a
//! database connection, so a slow or dead receiver delays neither jobs nor
//! other receivers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::WebhookConfig;
use crate::metrics;
use crate::model::secret::Secret;
use crate::store::events::{AttemptRecord, DueDelivery, EventStore};

/// How much of a receiver's answer is read: enough for any acknowledgement,
/// while an endless or huge body costs neither memory nor the timeout.
pub const MAX_ANSWER: usize = 64 * 1024;

pub struct Deliverer {
    store: Arc<dyn EventStore>,
    cfg: WebhookConfig,
    poll: Duration,
    /// In-flight requests per receiving host ([`DueDelivery::host`]). A std
    /// mutex: never held across an await.
    inflight: Mutex<HashMap<String, usize>>,
    clients: Mutex<HashMap<(String, SocketAddr), reqwest::Client>>,
    pub wake: Arc<Notify>,
}

enum Outcome {
    Delivered(u16),
    Retry(Option<u16>, String),
    Failed(Option<u16>, String),
    Gone,
}

impl Deliverer {
    pub fn new(store: Arc<dyn EventStore>, cfg: WebhookConfig, poll: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            cfg,
            poll,
            inflight: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
        })
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        // A claimed row is leased for longer than a request can take, so a
        // notifier that dies mid-request has its deliveries retried.
        let lease = self.cfg.timeout * 3 + Duration::from_secs(30);
        while !stop.is_cancelled() {
            let (skip, free) = {
                let g = self.inflight();
                let skip: Vec<String> = g
                    .iter()
                    .filter(|(_, n)| **n >= self.cfg.per_host)
                    .map(|(u, _)| u.clone())
                    .collect();
                (skip, self.cfg.max_inflight.saturating_sub(g.values().sum()))
            };
            let mut full = false;
            if free > 0 {
                let limit = free.min(256) as i64;
                match self
                    .store
                    .claim_deliveries(limit, self.cfg.per_host as i64, &skip, lease)
                    .await
                {
                    Ok(ds) => {
                        full = ds.len() as i64 == limit;
                        for d in ds {
                            self.start(&tracker, d).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Claiming webhook deliveries failed."),
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {},
                () = tokio::time::sleep(self.poll) => {},
                () = stop.cancelled() => {},
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn start(self: &Arc<Self>, tracker: &TaskTracker, d: DueDelivery) {
        let over = {
            let mut g = self.inflight();
            let n = g.entry(d.host.clone()).or_default();
            if *n >= self.cfg.per_host {
                true
            } else {
                *n += 1;
                false
            }
        };
        if over {
            // The batch held more for this host than it has room for now.
            if let Err(e) = self.store.release_delivery(d.id).await {
                tracing::warn!(error = %e, "Releasing a delivery failed; its lease will expire.");
            }
            return;
        }
        let me = self.clone();
        tracker.spawn(async move {
            let host = d.host.clone();
            me.attempt(d).await;
            let mut g = me.inflight();
            if let Some(n) = g.get_mut(&host) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    g.remove(&host);
                }
            }
            drop(g);
            me.wake.notify_one();
        });
    }

    async fn attempt(&self, d: DueDelivery) {
        let attempt = d.attempts + 1;
        let outcome = self.send(&d).await;
        let (label, rec) = match outcome {
            Outcome::Delivered(code) => {
                let secs = (Utc::now() - d.event_at).as_seconds_f64().max(0.0);
                metrics::WEBHOOK_LATENCY.observe(secs);
                (
                    "delivered",
                    record("delivered", attempt, None, Some(code), None),
                )
            }
            Outcome::Retry(code, err) => match self.cfg.schedule.get(d.attempts as usize) {
                Some(delay) => {
                    let next = Utc::now() + jitter(*delay);
                    (
                        "retry",
                        record("pending", attempt, Some(next), code, Some(err)),
                    )
                }
                None => {
                    let err = format!("{err} (schedule exhausted after {attempt} attempts)");
                    ("failed", record("failed", attempt, None, code, Some(err)))
                }
            },
            Outcome::Failed(code, err) => {
                ("failed", record("failed", attempt, None, code, Some(err)))
            }
            Outcome::Gone => {
                if let Some(w) = d.webhook_id {
                    if let Err(e) = self
                        .store
                        .disable_webhook(w, "receiver answered 410 Gone")
                        .await
                    {
                        tracing::warn!(error = %e, webhook.id = %w, "Disabling a webhook failed.");
                    }
                    tracing::info!(webhook.id = %w, "Webhook disabled: its receiver answered 410 Gone.");
                }
                let err = Some("410 Gone: endpoint disabled".to_owned());
                ("gone", record("failed", attempt, None, Some(410), err))
            }
        };
        metrics::WEBHOOK_DELIVERIES
            .with_label_values(&[label, &attempt.min(99).to_string()])
            .inc();
        // If this write fails the lease runs out and the delivery is sent
        // again: receivers dedupe on `webhook-id`, which stays the same.
        if let Err(e) = self.store.record_attempt(d.id, &rec).await {
            tracing::warn!(error = %e, delivery.id = %d.id, "Recording a webhook attempt failed.");
        }
    }

    async fn send(&self, d: &DueDelivery) -> Outcome {
        if d.disabled {
            return Outcome::Failed(None, "endpoint disabled".into());
        }
        let secret = match self.secret(d) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(None, e),
        };
        // Checked at every attempt: DNS may have changed since registration.
        let target = match self.cfg.guard.check(&d.url).await {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(None, format!("refused by the SSRF guard: {e}")),
        };
        let client = match self.client(&target.host, target.addr) {
            Ok(c) => c,
            Err(e) => return Outcome::Retry(None, format!("HTTP client: {e}")),
        };
        let msg_id = format!("msg_{}", d.id.simple());
        let ts = Utc::now().timestamp();
        let res = client
            .post(target.url)
            .header("content-type", "application/json")
            .header("webhook-id", &msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", secret.sign(&msg_id, ts, &d.body))
            .body(d.body.clone())
            .send()
            .await;
        match res {
            Ok(r) => {
                let code = r.status().as_u16();
                read_answer(r, MAX_ANSWER).await;
                match code {
                    200..=299 => Outcome::Delivered(code),
                    410 => Outcome::Gone,
                    429 | 500..=599 => {
                        Outcome::Retry(Some(code), format!("receiver answered {code}"))
                    }
                    _ => Outcome::Failed(Some(code), format!("receiver answered {code}")),
                }
            }
            Err(e) if e.is_timeout() => Outcome::Retry(None, "timed out".into()),
            // Without the URL: it may hold user-info, and the error is
            // listed with the delivery.
            Err(e) => Outcome::Retry(None, format!("request failed: {}", e.without_url())),
        }
    }

    /// The key to sign with: the endpoint's or the job's own secret
    /// (opened if sealed), else the job's tenant's. Never the deployment
    /// secret itself: anyone may name a job webhook's URL.
    fn secret(&self, d: &DueDelivery) -> Result<Secret, String> {
        match (&d.secret, d.webhook_id) {
            (Some(stored), _) => {
                let plain = self
                    .cfg
                    .keys
                    .open(stored)
                    .map_err(|e| format!("cannot open the webhook secret: {e}"))?;
                Secret::parse(&plain).map_err(|e| format!("bad secret: {e}"))
            }
            (None, Some(_)) => Err("the endpoint has no secret".into()),
            (None, None) => {
                let root = self.cfg.tenant_root.as_ref().ok_or(
                    "no webhook.secret and no STEVEDORE_WEBHOOK_SECRET to derive the \
                     tenant's signing secret from",
                )?;
                let tenant = d.tenant.as_deref().ok_or("the job is gone")?;
                Ok(root.for_tenant(tenant))
            }
        }
    }

    /// One client per pinned address, so connections are reused while every
    /// request still goes to the address the guard checked.
    fn client(&self, host: &str, addr: SocketAddr) -> reqwest::Result<reqwest::Client> {
        let mut g = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.get(&(host.to_owned(), addr)) {
            return Ok(c.clone());
        }
        let c = reqwest::Client::builder()
            // A proxy from the environment would re-resolve the host, past the pin.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.cfg.timeout)
            .resolve(host, addr)
            .pool_max_idle_per_host(self.cfg.per_host)
            .build()?;
        if g.len() >= 1000 {
            g.clear();
        }
        g.insert((host.to_owned(), addr), c.clone());
        Ok(c)
    }
}

fn record(
    status: &'static str,
    attempts: i32,
    next_attempt_at: Option<chrono::DateTime<Utc>>,
    last_status: Option<u16>,
    last_error: Option<String>,
) -> AttemptRecord {
    AttemptRecord {
        status,
        attempts,
        next_attempt_at,
        last_status: last_status.map(i32::from),
        last_error,
    }
}

/// Reads a receiver's answer up to `limit` bytes and drops the rest: a
/// short answer leaves the connection reusable, and a longer one closes it
/// instead of being read to its end. Returns how much was read.
pub async fn read_answer(mut r: reqwest::Response, limit: usize) -> usize {
    let mut n = 0;
    while n < limit {
        match r.chunk().await {
            Ok(Some(c)) => n += c.len(),
            Ok(None) | Err(_) => break,
        }
    }
    n
}

/// ±10 % so deliveries that failed together do not retry together.
fn jitter(d: Duration) -> chrono::Duration {
    let f = rand::rng().random_range(0.9..1.1);
    chrono::Duration::from_std(d.mul_f64(f)).unwrap_or(chrono::Duration::MAX)
}
