//! The worker runtime of one pool: receive job ids from the broker, claim
//! them in batches with a lease, run each attempt under its timeout while a
//! heartbeat extends the leases, then commit finishes in batches and ack the
//! broker only after the commit. SIGTERM (the `stop` token) stops intake,
//! lets in-flight attempts finish within a grace period and hands back the
//! rest.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use stevedore_handler::{JobContext, JobError};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::broker::{Acker, Broker, Delivery, Tag};
use crate::kinds::Kinds;
use crate::metrics;
use crate::model::job::NewJob;
use crate::model::lifecycle::{self, Outcome, Transition};
use crate::progress::ProgressWriter;
use crate::store::{Claimed, Store};
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub pool: String,
    /// How many handlers run at once.
    pub concurrency: usize,
    /// How many attempts whose handler has returned may wait for their
    /// finish to commit. They hold no handler slot, so a slow commit does
    /// not idle the handlers; this bound keeps their results' memory and
    /// the broker's unacked messages bounded.
    pub finishing: usize,
    /// How long a claim holds the job without a heartbeat.
    pub lease: Duration,
    /// How often leases are extended; at most a third of `lease`, so two
    /// heartbeats can be missed before another worker may take the job.
    pub heartbeat: Duration,
    /// How long in-flight attempts may run on after SIGTERM.
    pub grace: Duration,
    /// Name of this process for the broker and the `worker` column.
    pub name: String,
}

impl WorkerConfig {
    pub fn new(pool: &str, concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            pool: pool.to_owned(),
            concurrency,
            finishing: (concurrency * 4).clamp(FINISH_BATCH, 4 * FINISH_BATCH),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            grace: Duration::from_secs(20),
            name: format!("{pool}-{}-{}", std::process::id(), Uuid::now_v7().simple()),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.heartbeat * 3 <= self.lease,
            "heartbeat interval ({:?}) must be at most a third of the lease ({:?})",
            self.heartbeat,
            self.lease
        );
        Ok(())
    }
}

/// Why an attempt's token was fired.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Interrupt {
    Cancelled,
    LeaseLost,
    HandBack,
}

struct Running {
    attempt: i32,
    token: CancellationToken,
    why: Option<Interrupt>,
}

type RunningMap = Arc<Mutex<HashMap<Uuid, Running>>>;

fn lock(map: &RunningMap) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
    // The map holds plain data; a panic elsewhere cannot leave it half-written.
    map.lock().unwrap_or_else(|p| p.into_inner())
}

fn interrupt(map: &RunningMap, id: Uuid, why: Interrupt) {
    if let Some(r) = lock(map).get_mut(&id) {
        r.why.get_or_insert(why);
        r.token.cancel();
    }
}

/// What a finished attempt hands to the finisher: the write (none when the
/// lease was lost, since it would be refused anyway) and the message to ack.
struct Done {
    cmd: Option<Transition>,
    /// The remote side asked every job of this key to wait until then.
    cool: Option<(String, chrono::DateTime<chrono::Utc>)>,
    kind: String,
    tag: Tag,
    /// The attempt's span, so its `finish` span joins the job's trace
    /// (`Span::none()` when nothing is traced).
    span: tracing::Span,
}

/// The most finishes committed in one statement.
const FINISH_BATCH: usize = 256;

pub struct Worker {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    kinds: Kinds,
    cfg: WorkerConfig,
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        kinds: Kinds,
        cfg: WorkerConfig,
    ) -> Self {
        Self {
            store,
            broker,
            kinds,
            cfg,
        }
    }

    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        self.cfg.check()?;
        let cfg = &self.cfg;
        let span = tracing::info_span!("worker", pool = %cfg.pool, name = %cfg.name);
        // Unacked at once: the running, the finishing waiting in the
        // channel and the batch being committed.
        let prefetch = cfg.concurrency + cfg.finishing + FINISH_BATCH;
        let mut consumer = (|| self.broker.consumer(&cfg.pool, &cfg.name, prefetch))
            .retry(retry_policy())
            .when(|_| !stop.is_cancelled())
            .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "Broker not reachable."))
            .await?;
        let running: RunningMap = Arc::default();
        let (done_tx, done_rx) = mpsc::channel(cfg.finishing);
        let finisher = tokio::spawn(
            finisher(self.store.clone(), consumer.acker(), done_rx).instrument(span.clone()),
        );
        let hb_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(
            heartbeater(
                self.store.clone(),
                running.clone(),
                cfg.clone(),
                hb_stop.clone(),
            )
            .instrument(span.clone()),
        );
        let paused = Arc::new(AtomicBool::new(false));
        let watch = tokio::spawn(
            watch_pool(
                self.store.clone(),
                cfg.clone(),
                paused.clone(),
                hb_stop.clone(),
            )
            .instrument(span.clone()),
        );
        let sem = Arc::new(Semaphore::new(cfg.concurrency));
        let progress = ProgressWriter::new(self.store.clone());
        let tracker = TaskTracker::new();
        tracing::info!(parent: &span, concurrency = cfg.concurrency, "Worker started.");

        while !stop.is_cancelled() {
            // Paused: finish what runs, take nothing new. A delivery that
            // raced the pause is not lost: the claim refuses it and puts it
            // back in the outbox until the resume.
            if paused.load(Ordering::Relaxed) {
                tokio::select! {
                    () = tokio::time::sleep(PAUSE_POLL / 4) => {},
                    () = stop.cancelled() => break,
                }
                continue;
            }
            let first = tokio::select! {
                p = sem.clone().acquire_owned() => p.ok(),
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut permits = vec![first];
            while permits.len() < 256 {
                match sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let received = tokio::select! {
                r = consumer.receive(permits.len(), Duration::from_secs(1)) => r,
                () = stop.cancelled() => break,
            };
            let deliveries = match received {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "Receive failed; backing off.");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {},
                        () = stop.cancelled() => {},
                    }
                    continue;
                }
            };
            if deliveries.is_empty() {
                continue;
            }
            // Claim in a task of its own so the next receive overlaps this
            // claim's commit: with one loop, throughput would be capped at
            // one batch per database round trip.
            let intake = Intake {
                store: self.store.clone(),
                kinds: self.kinds.clone(),
                cfg: cfg.clone(),
                running: running.clone(),
                done: done_tx.clone(),
                tracker: tracker.clone(),
                span: span.clone(),
                progress: progress.clone(),
            };
            tracker.spawn(intake.claim_and_run(deliveries, permits, stop.clone()));
        }

        tracing::info!(parent: &span, in_flight = tracker.len(), "Stopping: no new work taken.");
        tracker.close();
        if tokio::time::timeout(cfg.grace, tracker.wait())
            .await
            .is_err()
        {
            let ids: Vec<Uuid> = lock(&running).keys().copied().collect();
            tracing::warn!(parent: &span, handed_back = ids.len(), "Grace period over; handing back.");
            for id in ids {
                interrupt(&running, id, Interrupt::HandBack);
            }
            tracker.wait().await;
        }
        hb_stop.cancel();
        drop(done_tx);
        let _ = heartbeat.await;
        let _ = watch.await;
        let _ = finisher.await;
        if let Err(e) = self.store.worker_gone(&cfg.name).await {
            tracing::debug!(parent: &span, error = %e, "Could not sign off; the entry ages out.");
        }
        tracing::info!(parent: &span, "Worker stopped.");
        Ok(())
    }
}

/// What a claim task needs: it claims a batch, acks what it could not
/// claim, and starts an attempt per claimed job.
struct Intake {
    store: Arc<dyn Store>,
    kinds: Kinds,
    cfg: WorkerConfig,
    running: RunningMap,
    done: mpsc::Sender<Done>,
    tracker: TaskTracker,
    span: tracing::Span,
    progress: ProgressWriter,
}

impl Intake {
    async fn claim_and_run(
        self,
        deliveries: Vec<Delivery>,
        mut permits: Vec<tokio::sync::OwnedSemaphorePermit>,
        stop: CancellationToken,
    ) {
        // Stopped while claiming: the messages stay unacked and come back.
        let Some(claimed) = self.claim(&deliveries, &stop).await else {
            return;
        };
        let mut by_id: HashMap<Uuid, Claimed> = claimed.into_iter().map(|c| (c.id, c)).collect();
        for d in deliveries {
            // A duplicate delivery, or a job running elsewhere, finished or
            // cancelled: ack it so it is not redelivered, do no work.
            let Some(job) = by_id.remove(&d.job_id) else {
                let _ = self
                    .done
                    .send(Done {
                        cmd: None,
                        cool: None,
                        kind: String::new(),
                        tag: d.tag,
                        span: tracing::Span::none(),
                    })
                    .await;
                continue;
            };
            let Some(permit) = permits.pop() else {
                // Cannot happen: we received at most one id per permit.
                tracing::error!(parent: &self.span, "More claims than permits.");
                break;
            };
            let token = CancellationToken::new();
            lock(&self.running).insert(
                job.id,
                Running {
                    attempt: job.attempt,
                    token: token.clone(),
                    why: None,
                },
            );
            let attempt_span = tracing::info_span!(
                parent: &self.span, "job", job.id = %job.id, job.kind = %job.kind, attempt = job.attempt
            );
            // Every attempt continues the trace stored with the job (the
            // submit's, or the parent job's), never the worker's own span.
            telemetry::continue_trace(&attempt_span, job.traceparent.as_ref());
            let fut = run_attempt(
                self.kinds.clone(),
                self.progress.attempt(job.id, job.attempt),
                job,
                token,
                self.running.clone(),
                self.done.clone(),
                d,
                permit,
            );
            self.tracker.spawn(fut.instrument(attempt_span));
        }
    }

    /// Claims with retries while the database is unreachable: the messages
    /// are not acked, so giving up would only delay the jobs.
    async fn claim(
        &self,
        deliveries: &[Delivery],
        stop: &CancellationToken,
    ) -> Option<Vec<Claimed>> {
        let ids: Vec<Uuid> = deliveries.iter().map(|d| d.job_id).collect();
        let res = (|| self.store.claim(&ids, &self.cfg.name, self.cfg.lease))
            .retry(retry_policy())
            .when(|_| !stop.is_cancelled())
            .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "Claim failed; retrying."))
            .await;
        match res {
            Ok(c) => {
                let now = chrono::Utc::now();
                for job in &c {
                    metrics::STARTED.with_label_values(&[&job.kind]).inc();
                    let since = |t: chrono::DateTime<chrono::Utc>| {
                        (now - t).to_std().unwrap_or_default().as_secs_f64()
                    };
                    metrics::WAIT_SECONDS
                        .with_label_values(&[&job.kind])
                        .observe(since(job.created_at));
                    metrics::START_LAG
                        .with_label_values(&[&job.kind])
                        .observe(since(job.due_at.max(job.created_at)));
                }
                Some(c)
            }
            Err(_) => None,
        }
    }
}

// One argument per thing the attempt owns until its finish is sent.
#[allow(clippy::too_many_arguments)]
async fn run_attempt(
    kinds: Kinds,
    progress: Arc<crate::progress::AttemptProgress>,
    job: Claimed,
    token: CancellationToken,
    running: RunningMap,
    done: mpsc::Sender<Done>,
    delivery: Delivery,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let ctx = JobContext::new(
        job.id,
        u32::try_from(job.attempt).unwrap_or(0),
        token.clone(),
    )
    .with_progress(progress.clone());
    let outcome: Result<serde_json::Value, JobError> = match kinds.get(&job.kind) {
        None => Err(JobError::permanent(format!(
            "no handler for kind {:?} in this worker",
            job.kind
        ))),
        Some(handler) => {
            let limit = Duration::from_secs(u64::try_from(job.timeout_secs).unwrap_or(1));
            let run = AssertUnwindSafe(handler.run(&ctx, job.payload.clone()))
                .catch_unwind()
                .instrument(telemetry::span(|| tracing::info_span!("run")));
            tokio::select! {
                r = tokio::time::timeout(limit, run) => match r {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(JobError::retryable("handler panicked")),
                    Err(_) => Err(JobError::retryable(format!("timed out after {}s", job.timeout_secs))),
                },
                () = token.cancelled() => Err(JobError::retryable("interrupted")),
            }
        }
    };
    // Its last reports land before its finish can.
    progress.end().await;
    let why = lock(&running).remove(&job.id).and_then(|r| r.why);
    let cool = match (&outcome, &job.concurrency_key) {
        (
            Err(JobError::Retryable {
                retry_after: Some(after),
                ..
            }),
            Some(key),
        ) => chrono::Duration::from_std(*after)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_add_signed(d))
            .map(|until| (key.clone(), until)),
        _ => None,
    };
    metrics::RUN_SECONDS
        .with_label_values(&[&job.kind])
        .observe(started.elapsed().as_secs_f64());
    let outcome = match (why, outcome) {
        (Some(Interrupt::LeaseLost), _) => None,
        (Some(Interrupt::Cancelled), _) => Some(Outcome::StoppedForCancel),
        (Some(Interrupt::HandBack), _) => Some(Outcome::HandedBack),
        (None, Ok(result)) => Some(success(&kinds, &job, result, &ctx)),
        (None, Err(e)) => {
            if matches!(e, JobError::Snooze { .. }) {
                tracing::info!(reason = %e, "Attempt snoozed.");
            } else {
                tracing::info!(error = %e, retryable = e.is_retryable(), "Attempt failed.");
            }
            Some(Outcome::Failed(e))
        }
    };
    let cmd = outcome.and_then(
        |o| match lifecycle::next(&job.state(), o, chrono::Utc::now()) {
            Ok(t) => Some(t),
            // A claimed job is running, and every attempt outcome is legal
            // there; refusing to write is the safe answer to a broken rule.
            Err(e) => {
                tracing::error!(error = %e, "Attempt outcome refused by the lifecycle.");
                None
            }
        },
    );
    // The handler slot is held until the finish has a place in the
    // finishing stage (back-pressure when commits fall behind), not until
    // it commits.
    let _ = done
        .send(Done {
            cmd,
            cool,
            kind: job.kind,
            tag: delivery.tag,
            span: telemetry::span(tracing::Span::current),
        })
        .await;
    drop(permit);
}

fn success(kinds: &Kinds, job: &Claimed, result: serde_json::Value, ctx: &JobContext) -> Outcome {
    // Children join this attempt's trace; when this worker does not trace,
    // they keep the parent's context so a traced worker still joins it.
    let trace = telemetry::of_span(&tracing::Span::current()).or_else(|| job.traceparent.clone());
    let children: Result<Vec<NewJob>, _> = ctx
        .take_children()
        .into_iter()
        .map(|c| {
            NewJob::child(job.id, c, kinds).map(|j| NewJob {
                traceparent: trace.clone(),
                ..j
            })
        })
        .collect();
    match children {
        Ok(children) => Outcome::Succeeded { result, children },
        // A child the core cannot accept is a bug in the handler's output;
        // retrying would build the same child again.
        Err(e) => Outcome::Failed(JobError::permanent(format!("invalid child job: {e}"))),
    }
}

/// Commits finishes in batches, then acks their messages. A finish is never
/// dropped: store errors are retried until the write lands (or is fenced).
async fn finisher(store: Arc<dyn Store>, acker: Arc<dyn Acker>, mut rx: mpsc::Receiver<Done>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, FINISH_BATCH).await > 0 {
        for (key, until) in batch.iter().filter_map(|d| d.cool.as_ref()) {
            // Before the finish, so the job's own retry cannot start ahead
            // of the key's cool-down; losing it only loses politeness.
            if let Err(e) = store.cool_down(key, *until).await {
                tracing::warn!(error = %e, %key, "Cool-down not recorded.");
            }
        }
        // One `finish` span per attempt, open over the batch's commit and
        // ack (the attempt's own span stays open until then, too).
        let _spans: Vec<tracing::Span> = batch
            .iter()
            .filter(|d| !d.span.is_none())
            .map(|d| {
                let to = d.cmd.as_ref().map_or("lease_lost", |c| c.to.as_str());
                tracing::info_span!(parent: &d.span, "finish", outcome = to)
            })
            .collect();
        let cmds: Vec<Transition> = batch.iter().filter_map(|d| d.cmd.clone()).collect();
        let applied = (|| store.apply(&cmds))
            .retry(retry_policy())
            .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "Finish failed; retrying."))
            .await
            .unwrap_or_default();
        let applied: std::collections::HashSet<Uuid> = applied.into_iter().collect();
        for d in &batch {
            let Some(cmd) = &d.cmd else { continue };
            if applied.contains(&cmd.id) {
                metrics::FINISHED
                    .with_label_values(&[&d.kind, cmd.to.as_str()])
                    .inc();
            } else {
                metrics::FENCED.with_label_values(&["finish"]).inc();
                tracing::warn!(job.id = %cmd.id, attempt = cmd.attempt, "Late finish refused: the lease was lost.");
            }
        }
        let tags: Vec<Tag> = batch.drain(..).map(|d| d.tag).collect();
        // Acked only now that the state is committed; a failed ack means a
        // redelivery, which the conditional claim turns into a no-op.
        if let Err(e) = acker.ack(&tags).await {
            metrics::BROKER_ACK_ERRORS.inc();
            tracing::warn!(error = %e, "Ack failed; messages will be redelivered and dropped.");
        }
    }
}

/// How often a worker process says it is alive and learns whether its pool
/// is paused.
pub const PAUSE_POLL: Duration = Duration::from_secs(1);

/// A worker process that has not said it is alive for this long is gone
/// (`GET /v1/pools`, the pool gauges).
pub const ALIVE: Duration = Duration::from_secs(PAUSE_POLL.as_secs() * 5);

async fn watch_pool(
    store: Arc<dyn Store>,
    cfg: WorkerConfig,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let concurrency = i32::try_from(cfg.concurrency).unwrap_or(i32::MAX);
    let mut tick = tokio::time::interval(PAUSE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            () = stop.cancelled() => return,
        }
        match store.worker_seen(&cfg.pool, &cfg.name, concurrency).await {
            Ok(now) => {
                if paused.swap(now, Ordering::Relaxed) != now {
                    tracing::info!(
                        paused = now,
                        "Pool {}.",
                        if now { "paused" } else { "resumed" }
                    );
                }
            }
            // Keep the last known state: the claim enforces a pause anyway.
            Err(e) => tracing::debug!(error = %e, "Could not read the pool's state."),
        }
    }
}

async fn heartbeater(
    store: Arc<dyn Store>,
    running: RunningMap,
    cfg: WorkerConfig,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            () = stop.cancelled() => return,
        }
        let held: Vec<(Uuid, i32)> = lock(&running)
            .iter()
            .filter(|(_, r)| r.why.is_none())
            .map(|(id, r)| (*id, r.attempt))
            .collect();
        if held.is_empty() {
            continue;
        }
        match store.heartbeat(&held, cfg.lease).await {
            Ok(still) => {
                let still: HashMap<Uuid, bool> = still
                    .into_iter()
                    .map(|h| (h.id, h.cancel_requested))
                    .collect();
                for (id, _) in held {
                    match still.get(&id) {
                        Some(true) => interrupt(&running, id, Interrupt::Cancelled),
                        Some(false) => {}
                        None => {
                            metrics::FENCED.with_label_values(&["heartbeat"]).inc();
                            tracing::warn!(job.id = %id, "Lease lost; abandoning the attempt.");
                            interrupt(&running, id, Interrupt::LeaseLost);
                        }
                    }
                }
            }
            // Keep running: if the database stays away past the lease, the
            // late finish is fenced and the newer attempt wins.
            Err(e) => tracing::warn!(error = %e, "Heartbeat failed."),
        }
    }
}
