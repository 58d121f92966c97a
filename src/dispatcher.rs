//! The dispatcher: small named services that keep jobs moving when nothing
//! else would. `OutboxRelay` publishes committed jobs (and due retries and
//! delayed jobs) to their broker; `LeaseRescuer` returns jobs whose worker
//! died; `LostMessageRepair` re-sends jobs a broker forgot;
//! `ScheduleFirer` makes the jobs of due cron schedules. Each has a
//! `run_once` that tests call directly. Several dispatchers may run at once:
//! the store takes rows with `FOR UPDATE SKIP LOCKED`.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Brokers;
use crate::metrics;
use crate::model::{schedule, JobStatus};
use crate::store::{Store, StoreResult};

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub batch: i64,
    /// Idle poll interval of the relay when nobody wakes it.
    pub poll: Duration,
    pub rescue_every: Duration,
    /// A job waiting this long after it was sent is presumed lost by the broker.
    pub lost_after: Duration,
    /// Succeeded and cancelled jobs are deleted this long after they end.
    pub retain_succeeded: Duration,
    /// Dead jobs are deleted this long after they died.
    pub retain_dead: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            batch: 1000,
            poll: Duration::from_millis(100),
            rescue_every: Duration::from_secs(1),
            lost_after: Duration::from_secs(120),
            retain_succeeded: RETAIN_SUCCEEDED,
            retain_dead: RETAIN_DEAD,
        }
    }
}

pub const RETAIN_SUCCEEDED: Duration = Duration::from_secs(7 * 86_400);
pub const RETAIN_DEAD: Duration = Duration::from_secs(30 * 86_400);
/// Jobs one prune statement deletes; small, so it never holds many locks
/// or writes a burst of WAL beside the hot path.
const PRUNE_BATCH: i64 = 500;
/// How often due schedules are looked for: a per-second schedule fires
/// within this of its time.
pub const SCHEDULE_POLL: Duration = Duration::from_millis(250);
const SCHEDULE_BATCH: i64 = 100;

#[derive(Clone)]
pub struct Dispatcher {
    store: Arc<dyn Store>,
    brokers: Brokers,
    cfg: DispatcherConfig,
    /// Woken by an in-process submit so the relay publishes at once.
    wake: Arc<Notify>,
}

impl Dispatcher {
    pub fn new(store: Arc<dyn Store>, brokers: Brokers, cfg: DispatcherConfig) -> Self {
        Self {
            store,
            brokers,
            cfg,
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// OutboxRelay: one batch of due outbox rows to the brokers.
    pub async fn relay_once(&self) -> StoreResult<usize> {
        self.store.relay_outbox(self.cfg.batch, &self.brokers).await
    }

    /// LeaseRescuer: one batch of expired leases; and held jobs whose
    /// concurrency key has room again.
    pub async fn rescue_once(&self) -> StoreResult<usize> {
        let released = self.store.release_held().await?;
        if released > 0 {
            metrics::REPAIRED
                .with_label_values(&["held_release"])
                .inc_by(released);
            self.wake.notify_one();
        }
        let n = self.store.rescue_expired(self.cfg.batch).await?;
        if n > 0 {
            metrics::REPAIRED
                .with_label_values(&["lease_rescuer"])
                .inc_by(n as u64);
            tracing::info!(jobs = n, "Expired leases rescued.");
        }
        Ok(n)
    }

    /// LostMessageRepair: for each pool, when the broker holds fewer
    /// messages than Postgres has jobs waiting on it, re-sends that many of
    /// the longest-waiting jobs. Comparing counts first keeps a long but
    /// healthy queue from being re-sent over and over.
    pub async fn repair_once(&self) -> StoreResult<usize> {
        let mut n = 0;
        for (pool, waiting) in self.store.published_waiting().await? {
            let broker = self.brokers.for_pool(&pool);
            let depth = match broker.depth(&pool).await {
                Ok(d) => i64::try_from(d).unwrap_or(i64::MAX),
                // Nothing to compare with; once it is back (empty or not)
                // the next round decides.
                Err(e) => {
                    tracing::warn!(%pool, error = %e, "Broker depth unknown; repair skipped.");
                    continue;
                }
            };
            let missing = waiting.saturating_sub(depth);
            if missing > 0 {
                n += self
                    .store
                    .repair_lost(&pool, self.cfg.lost_after, missing.min(self.cfg.batch))
                    .await?;
            }
        }
        if n > 0 {
            metrics::REPAIRED
                .with_label_values(&["lost_message_repair"])
                .inc_by(n as u64);
            tracing::info!(jobs = n, "Jobs re-sent after their message was lost.");
        }
        Ok(n)
    }

    /// ScheduleFirer: one job for each due schedule (the latest fire time
    /// it missed, if it missed several); answers how many schedules fired.
    pub async fn fire_schedules_once(&self) -> StoreResult<usize> {
        let now = chrono::Utc::now();
        let fired = self
            .store
            .fire_schedules(now, SCHEDULE_BATCH, &move |s| {
                let jitter = match s.jitter_secs {
                    0 => 0,
                    j => rand::rng().random_range(0..=j),
                };
                schedule::fire(s, now, chrono::Duration::seconds(i64::from(jitter)))
            })
            .await?;
        for f in &fired {
            if f.job_id.is_some() {
                metrics::SCHEDULE_FIRES.with_label_values(&["job"]).inc();
            }
            if let Some(e) = &f.error {
                metrics::SCHEDULE_FIRES.with_label_values(&["error"]).inc();
                tracing::warn!(tenant = %f.tenant, schedule = %f.name, error = %e,
                    "A schedule fired but made no job.");
            }
        }
        if fired.iter().any(|f| f.job_id.is_some()) {
            self.wake.notify_one();
        }
        Ok(fired.len())
    }

    async fn refresh_gauges(&self) -> StoreResult<()> {
        let d = self.store.depths().await?;
        let pools = self.store.pools(crate::worker::ALIVE).await?;
        metrics::set_pools(&pools, d.by_kind_status.keys().map(|(k, _)| k.as_str()));
        metrics::DEPTH.reset();
        for ((kind, status), n) in d.by_kind_status {
            metrics::DEPTH
                .with_label_values(&[&kind, status.as_str()])
                .set(n);
        }
        for s in [JobStatus::Queued, JobStatus::Dead] {
            // Keep a zero visible for the probe pool so dashboards have a series.
            metrics::DEPTH
                .with_label_values(&["probe", s.as_str()])
                .add(0);
        }
        Ok(())
    }

    /// Deletes jobs past their retention, a few batches per call; answers
    /// how many.
    pub async fn prune_once(&self) -> StoreResult<u64> {
        let mut total = 0;
        for (statuses, keep) in [
            (
                &[JobStatus::Succeeded, JobStatus::Cancelled][..],
                self.cfg.retain_succeeded,
            ),
            (&[JobStatus::Dead][..], self.cfg.retain_dead),
        ] {
            for _ in 0..10 {
                let n = self
                    .store
                    .prune_finished(statuses, keep, PRUNE_BATCH)
                    .await?;
                total += n;
                if n < PRUNE_BATCH as u64 {
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(jobs = total, "Pruned jobs past their retention.");
        }
        Ok(total)
    }

    /// Runs every service until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let me = self.clone();
        let s = stop.clone();
        tracker.spawn(async move {
            while !s.is_cancelled() {
                match me.relay_once().await {
                    Ok(n) if n as i64 >= me.cfg.batch => continue,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "Outbox relay failed."),
                }
                tokio::select! {
                    () = me.wake.notified() => {},
                    () = tokio::time::sleep(me.cfg.poll) => {},
                    () = s.cancelled() => {},
                }
            }
        });
        let me = self.clone();
        let every = self.cfg.rescue_every;
        tracker.spawn(periodic(stop.clone(), every, move || {
            let me = me.clone();
            async move {
                me.rescue_once().await?;
                Ok(())
            }
        }));
        let me = self.clone();
        let every =
            (self.cfg.lost_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        tracker.spawn(periodic(stop.clone(), every, move || {
            let me = me.clone();
            async move {
                me.repair_once().await?;
                Ok(())
            }
        }));
        let me = self.clone();
        tracker.spawn(periodic(stop.clone(), SCHEDULE_POLL, move || {
            let me = me.clone();
            async move {
                while me.fire_schedules_once().await? as i64 >= SCHEDULE_BATCH {}
                Ok(())
            }
        }));
        let me = self.clone();
        tracker.spawn(periodic(stop.clone(), Duration::from_secs(60), move || {
            let me = me.clone();
            async move {
                me.prune_once().await?;
                Ok(())
            }
        }));
        let me = self.clone();
        tracker.spawn(periodic(stop.clone(), Duration::from_secs(5), move || {
            let me = me.clone();
            async move { me.refresh_gauges().await }
        }));
        tracker.close();
        tracker.wait().await;
    }
}

async fn periodic<F, Fut>(stop: CancellationToken, every: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = StoreResult<()>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            () = stop.cancelled() => return,
        }
        if let Err(e) = f().await {
            tracing::warn!(error = %e, "Dispatcher service failed; will retry.");
        }
    }
}
