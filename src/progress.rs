//! Progress reports of running attempts, from the handler to the store.
//!
//! Each attempt's `JobContext` gets an [`AttemptProgress`] as its sink; one
//! [`ProgressWriter`] per worker process records what the attempts report,
//! at most once per [`INTERVAL`] per attempt and many jobs in one write
//! ([`crate::store::Store::record_progress`], fenced on the attempt). The
//! writing task runs only while something waits to be written, so a job
//! that never reports costs no write and no task; its end costs one
//! uncontended lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use stevedore_handler::{Progress, ProgressSink};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use crate::metrics;
use crate::model::progress::{JobProgress, ProgressReport};
use crate::store::Store;

/// At most one write per attempt about this often (less [`SLACK`]).
/// Reports in between wait for the end of the interval (the last one is
/// never lost to the throttle).
pub const INTERVAL: Duration = Duration::from_millis(250);
/// Attempts due this soon are written along with the ones due now, so
/// that many reporting jobs share writes instead of each taking its own.
const SLACK: Duration = Duration::from_millis(50);
/// How long an ending attempt waits for its last reports to be written; a
/// database that slow delays the finish no further, and they are dropped.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// Reports of one attempt waiting for a write; past this the oldest go.
const MAX_PENDING: usize = 256;
/// A partial result bigger than this (as JSON) is left out of its report.
const MAX_PARTIAL_BYTES: usize = 16 * 1024;
/// A row held by another transaction (a heartbeat) is tried again this
/// soon, at most [`MAX_BUSY`] times in a row.
const BUSY_RETRY: Duration = Duration::from_millis(20);
const MAX_BUSY: u32 = 50;

/// Reports of one attempt not yet written. A partial result is a piece of
/// the result, so each one is kept; a plain report only says where the
/// attempt is, so the next report of either kind replaces it.
#[derive(Debug, Default)]
struct Pending(Vec<JobProgress>);

impl Pending {
    fn push(&mut self, p: JobProgress) {
        match self.0.last_mut() {
            Some(last) if last.partial.is_none() => *last = p,
            _ => {
                if self.0.len() >= MAX_PENDING {
                    self.0.remove(0);
                }
                self.0.push(p);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

type Key = (Uuid, i32);

struct Entry {
    pending: Pending,
    /// No write for this attempt before then.
    next_at: Instant,
    /// Reports of this attempt are being written now.
    in_flight: bool,
    /// Writes in a row that found the row busy.
    busy: u32,
    /// The store refused the attempt (it lost its lease): drop its reports.
    fenced: bool,
    /// The attempt ended; told once its last reports are written.
    waiters: Vec<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    attempts: HashMap<Key, Entry>,
    /// A writing task is running.
    writing: bool,
}

struct Shared {
    store: Arc<dyn Store>,
    state: Mutex<State>,
    wake: Notify,
    /// Reports may come from blocking threads (a local model's inference),
    /// which cannot spawn on their own.
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, and no await while it is held: a panic elsewhere
        // cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The progress writer of one worker process. Cheap to clone.
#[derive(Clone)]
pub struct ProgressWriter(Arc<Shared>);

impl ProgressWriter {
    /// Must be called inside the Tokio runtime that is to do the writing.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self(Arc::new(Shared {
            store,
            state: Mutex::default(),
            wake: Notify::new(),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// The sink of one attempt; [`AttemptProgress::end`] it when it is over.
    pub fn attempt(&self, job_id: Uuid, attempt: i32) -> Arc<AttemptProgress> {
        Arc::new(AttemptProgress {
            shared: self.0.clone(),
            key: (job_id, attempt),
            ended: AtomicBool::new(false),
        })
    }
}

/// Where one attempt's reports go.
pub struct AttemptProgress {
    shared: Arc<Shared>,
    key: Key,
    /// Set under the state lock, so a report racing the end is either
    /// written with the others or dropped, never left behind.
    ended: AtomicBool,
}

impl ProgressSink for AttemptProgress {
    fn report(&self, progress: Progress) {
        let mut p = JobProgress::reported(progress, self.key.1);
        if let Some(partial) = &p.partial {
            let size = serde_json::to_string(partial).map_or(usize::MAX, |s| s.len());
            if size > MAX_PARTIAL_BYTES {
                tracing::warn!(job.id = %self.key.0, size, "Partial result too big; reported without it.");
                p.partial = None;
            }
        }
        let mut st = self.shared.lock();
        if self.ended.load(Ordering::Relaxed) {
            return;
        }
        // The first report of an attempt is due at once.
        let e = st.attempts.entry(self.key).or_insert_with(|| Entry {
            pending: Pending::default(),
            next_at: Instant::now(),
            in_flight: false,
            busy: 0,
            fenced: false,
            waiters: Vec::new(),
        });
        if e.fenced {
            return;
        }
        e.pending.push(p);
        if !st.writing {
            st.writing = true;
            self.shared.runtime.spawn(write_loop(self.shared.clone()));
        }
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl AttemptProgress {
    /// The attempt is over: waits (at most [`FLUSH_WAIT`]) until what it
    /// reported is written, before its finish is, so a watcher sees its
    /// last stage; anything it reports from now on is dropped.
    pub async fn end(&self) {
        let done = {
            let mut st = self.shared.lock();
            self.ended.store(true, Ordering::Relaxed);
            let Some(e) = st.attempts.get_mut(&self.key) else {
                return;
            };
            if e.fenced || (e.pending.is_empty() && !e.in_flight) {
                st.attempts.remove(&self.key);
                return;
            }
            e.next_at = e.next_at.min(Instant::now());
            let (tx, rx) = oneshot::channel();
            e.waiters.push(tx);
            rx
        };
        self.shared.wake.notify_one();
        if tokio::time::timeout(FLUSH_WAIT, done).await.is_err() {
            tracing::debug!(job.id = %self.key.0, "Last progress not written in time; dropped.");
            self.shared.lock().attempts.remove(&self.key);
        }
    }
}

/// Writes due reports until none is left, then ends (the next report
/// starts another).
async fn write_loop(shared: Arc<Shared>) {
    loop {
        let now = Instant::now();
        let (due, later) = {
            let mut st = shared.lock();
            let mut due: Vec<(Key, Vec<JobProgress>)> = Vec::new();
            let mut later: Option<Instant> = None;
            for (key, e) in &mut st.attempts {
                if e.in_flight || e.pending.is_empty() {
                    continue;
                }
                if e.next_at <= now + SLACK {
                    e.in_flight = true;
                    e.next_at = now + INTERVAL;
                    due.push((*key, std::mem::take(&mut e.pending.0)));
                } else {
                    later = Some(later.map_or(e.next_at, |l| l.min(e.next_at)));
                }
            }
            if due.is_empty() && later.is_none() {
                st.writing = false;
                return;
            }
            (due, later)
        };
        if !due.is_empty() {
            write(&shared, due).await;
        } else if let Some(at) = later {
            tokio::select! {
                () = tokio::time::sleep_until(at) => {},
                () = shared.wake.notified() => {},
            }
        }
    }
}

async fn write(shared: &Shared, due: Vec<(Key, Vec<JobProgress>)>) {
    let reports: Vec<ProgressReport> = due
        .iter()
        .flat_map(|((id, _), ps)| {
            ps.iter().map(|p| ProgressReport {
                job_id: *id,
                progress: p.clone(),
            })
        })
        .collect();
    let outcome = shared.store.record_progress(&reports).await;
    let (written, busy): (HashSet<Uuid>, HashSet<Uuid>) = match outcome {
        Ok(r) => (
            r.written.into_iter().collect(),
            r.busy.into_iter().collect(),
        ),
        Err(e) => {
            // Best effort: the reports are dropped, the attempt goes on.
            tracing::warn!(error = %e, reports = reports.len(), "Progress not recorded.");
            (due.iter().map(|((id, _), _)| *id).collect(), HashSet::new())
        }
    };
    let now = Instant::now();
    let mut st = shared.lock();
    for (key, taken) in due {
        let Some(e) = st.attempts.get_mut(&key) else {
            continue;
        };
        e.in_flight = false;
        if written.contains(&key.0) {
            e.busy = 0;
        } else if busy.contains(&key.0) {
            if e.busy < MAX_BUSY {
                e.busy += 1;
                let newer = std::mem::take(&mut e.pending.0);
                for p in taken.into_iter().chain(newer) {
                    e.pending.push(p);
                }
                e.next_at = now + BUSY_RETRY;
            } else {
                e.busy = 0;
                tracing::debug!(job.id = %key.0, "Progress dropped: the job's row stayed busy.");
            }
        } else {
            metrics::FENCED.with_label_values(&["progress"]).inc();
            tracing::debug!(job.id = %key.0, attempt = key.1, "Progress refused: the attempt lost its lease.");
            e.fenced = true;
            e.pending.0.clear();
        }
        if !e.waiters.is_empty() {
            if e.pending.is_empty() {
                if let Some(e) = st.attempts.remove(&key) {
                    for w in e.waiters {
                        let _ = w.send(());
                    }
                }
            } else if e.busy == 0 {
                // Reports that came while this write was under way.
                e.next_at = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(message: &str, partial: Option<i32>) -> JobProgress {
        JobProgress {
            fraction: 0.5,
            message: message.into(),
            partial: partial.map(serde_json::Value::from),
            attempt: 1,
            at: chrono::Utc::now(),
        }
    }

    #[test]
    fn plain_reports_merge_and_partials_are_kept() {
        let mut p = Pending::default();
        p.push(report("loading", None));
        p.push(report("rendering", None));
        p.push(report("answered 1", Some(0)));
        p.push(report("answered 2", Some(1)));
        p.push(report("checking", None));
        p.push(report("done", None));
        let messages: Vec<&str> = p.0.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["answered 1", "answered 2", "done"]);
    }

    #[test]
    fn too_many_partials_drop_the_oldest() {
        let mut p = Pending::default();
        for i in 0..(MAX_PENDING as i32 + 3) {
            p.push(report("answered", Some(i)));
        }
        assert_eq!(p.0.len(), MAX_PENDING);
        assert_eq!(p.0[0].partial, Some(serde_json::Value::from(3)));
    }
}
