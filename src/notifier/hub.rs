//! Fan-out of final events to the stream clients of one API process.
//!
//! The [`Hub`] follows the notifier's cursor (woken by NOTIFY on
//! `stevedore_cursor`, in process by the notifier itself, and by a short
//! poll as a safety net), reads the newly final rows and offers each to
//! every matching subscriber with `try_send` on a bounded channel. A
//! subscriber whose buffer is full is cut off with a reason: one slow
//! client can neither grow the server's memory nor hold up the others or
//! the fleet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::model::event::{Event, EventFilter};
use crate::store::events::{EventStore, CURSOR_CHANNEL};

/// Why a subscription ended on the server's side.
pub const SLOW_CLIENT: &str =
    "slow_client: the client did not keep up; reconnect with the last event id to resume";

/// One client's feed: live events after `from` (the hub's position when it
/// subscribed), and `overflow`, cancelled if its buffer overflowed.
pub struct Subscription {
    pub rx: mpsc::Receiver<Arc<Event>>,
    pub from: i64,
    pub overflow: CancellationToken,
    id: u64,
    hub: Arc<Hub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.lock().subs.remove(&self.id);
    }
}

struct Sub {
    filter: EventFilter,
    tx: mpsc::Sender<Arc<Event>>,
    overflow: CancellationToken,
}

struct Inner {
    /// Every event up to here has been offered to the subscribers; None
    /// until the cursor could first be read.
    position: Option<i64>,
    subs: HashMap<u64, Sub>,
    next_id: u64,
}

pub struct Hub {
    inner: Mutex<Inner>,
    /// Rung when the notifier moved its cursor.
    pub wake: Arc<Notify>,
    /// Events per subscriber before it is cut off.
    pub buffer: usize,
}

impl Hub {
    pub fn new(position: Option<i64>, buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                position,
                subs: HashMap::new(),
                next_id: 0,
            }),
            wake: Arc::new(Notify::new()),
            buffer: buffer.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A std mutex: no await happens while it is held, and the data stays
        // consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn position(&self) -> Option<i64> {
        self.lock().position
    }

    /// Registers a subscriber. Reading `position` under the same lock that
    /// `publish` takes means every event after `from` reaches the channel,
    /// and every event up to `from` is in the database for the backfill.
    /// None while the hub has not read the cursor yet (database down).
    pub fn subscribe(self: &Arc<Self>, filter: EventFilter) -> Option<Subscription> {
        let (tx, rx) = mpsc::channel(self.buffer);
        let overflow = CancellationToken::new();
        let mut g = self.lock();
        let from = g.position?;
        let id = g.next_id;
        g.next_id += 1;
        g.subs.insert(
            id,
            Sub {
                filter,
                tx,
                overflow: overflow.clone(),
            },
        );
        Some(Subscription {
            rx,
            from,
            overflow,
            id,
            hub: self.clone(),
        })
    }

    /// Offers final events (ascending, after `position`) to subscribers.
    pub fn publish(&self, events: &[Arc<Event>]) {
        let mut g = self.lock();
        for e in events {
            if g.position.is_some_and(|p| e.id <= p) {
                continue;
            }
            g.position = Some(e.id);
            g.subs.retain(|_, s| {
                if !s.filter.matches(e) {
                    return true;
                }
                match s.tx.try_send(e.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.overflow.cancel();
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
    }

    /// Follows the cursor until `stop`: reads (position, cursor] and
    /// publishes it.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn EventStore>,
        poll: Duration,
        stop: CancellationToken,
    ) {
        let listener = tokio::spawn({
            let (store, wake, stop) = (store.clone(), self.wake.clone(), stop.clone());
            async move { store.listen(CURSOR_CHANNEL, wake, stop).await }
        });
        while !stop.is_cancelled() {
            if let Err(e) = self.catch_up(store.as_ref()).await {
                tracing::warn!(error = %e, "Stream hub could not read events; will retry.");
            }
            tokio::select! {
                () = self.wake.notified() => {},
                () = tokio::time::sleep(poll) => {},
                () = stop.cancelled() => {},
            }
        }
        listener.abort();
    }

    async fn catch_up(&self, store: &dyn EventStore) -> crate::store::StoreResult<()> {
        let upto = store.cursor().await?;
        loop {
            let Some(from) = self.position() else {
                // First read: the stream starts at the current cursor.
                self.lock().position.get_or_insert(upto);
                continue;
            };
            if from >= upto {
                return Ok(());
            }
            let events = store.events_between(from, upto, 1000).await?;
            let Some(last) = events.last().map(|e| e.id) else {
                // Pruned or rolled-back ids only: skip to the cursor.
                self.lock().position = Some(upto);
                return Ok(());
            };
            let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
            self.publish(&events);
            if last >= upto {
                return Ok(());
            }
        }
    }
}

/// Counts a connected stream client for as long as it lives.
pub struct ClientGauge(&'static str);

impl ClientGauge {
    pub fn new(transport: &'static str) -> Self {
        metrics::STREAM_CLIENTS
            .with_label_values(&[transport])
            .inc();
        Self(transport)
    }

    pub fn dropped(&self, reason: &str) {
        metrics::STREAM_DROPPED
            .with_label_values(&[self.0, reason])
            .inc();
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        metrics::STREAM_CLIENTS.with_label_values(&[self.0]).dec();
    }
}
