//! One conformance suite for both stores: every `Store` method against a
//! fresh Postgres database and a fresh SQLite file, with the fencing cases
//! (a late write of an older attempt is refused) and the batch edge cases
//! (empty batch, duplicate ids, mixed outcomes). The rules themselves are
//! unit-tested in `src/model/`; this checks that both stores apply them
//! the same way.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde_json::json;
use stevedore::model::job::{Backoff, NewJob};
use stevedore::model::lifecycle::{next, Outcome, Transition};
use stevedore::model::progress::{JobProgress, ProgressReport};
use stevedore::model::schedule::{self, NewSchedule};
use stevedore::model::trace::TraceParent;
use stevedore::model::JobStatus;
use stevedore::store::events::EventStore;
use stevedore::store::postgres::PgStore;
use stevedore::store::sqlite::SqliteStore;
use stevedore::store::{CancelOutcome, Claimed, DeadLetterOutcome, ListFilter, Publisher, Store};
use stevedore_handler::JobError;
use support::eventually;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

/// A migrated store of one kind, dropped with the test.
struct Db {
    store: Arc<dyn Store>,
    /// The same store, as the notifier reads it.
    notifier: Arc<dyn EventStore>,
    pg_url: Option<String>,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy)]
enum Kind {
    Postgres,
    Sqlite,
}

impl Db {
    async fn open(kind: Kind) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, notifier, pg_url): (Arc<dyn Store>, Arc<dyn EventStore>, _) = match kind {
            Kind::Postgres => {
                let url = support::fresh_pg_database().await;
                let pg = PgStore::connect(&url, 4).await.expect("connect");
                (Arc::new(pg.clone()), Arc::new(pg), Some(url))
            }
            Kind::Sqlite => {
                let lite = SqliteStore::open(&dir.path().join("s.db"))
                    .await
                    .expect("open");
                (Arc::new(lite.clone()), Arc::new(lite), None)
            }
        };
        store.migrate().await.expect("migrate");
        Self {
            store,
            notifier,
            pg_url,
            _dir: dir,
        }
    }

    async fn close(self) {
        if let Some(url) = &self.pg_url {
            support::drop_database(url).await;
        }
    }

    async fn insert(&self, n: usize) -> Vec<Uuid> {
        let jobs: Vec<NewJob> = (0..n).map(|_| new_job(None)).collect();
        let ids = jobs.iter().map(|j| j.id).collect();
        self.store.insert_jobs(&jobs).await.expect("insert");
        ids
    }

    async fn claim_one(&self, id: Uuid) -> Claimed {
        let mut c = self.store.claim(&[id], "w", LEASE).await.expect("claim");
        assert_eq!(c.len(), 1, "{id} is claimable");
        c.remove(0)
    }

    async fn status(&self, id: Uuid) -> JobStatus {
        self.store
            .get_job(id)
            .await
            .expect("get")
            .expect("exists")
            .status
    }

    async fn events(&self, id: Uuid) -> Vec<(String, i32)> {
        self.store
            .job_events(id)
            .await
            .expect("events")
            .into_iter()
            .map(|e| (e.kind, e.attempt))
            .collect()
    }
}

fn new_job(key: Option<&str>) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        kind: "probe".into(),
        payload: json!({"n": 1}),
        max_attempts: 2,
        timeout_secs: 60,
        backoff: Backoff {
            base_ms: 60_000,
            max_ms: 60_000,
        },
        run_at: None,
        idempotency_key: key.map(str::to_owned),
        parent_id: None,
        webhook: None,
        priority: 0,
        tenant: "default".into(),
        scheduled: None,
        concurrency_key: None,
        traceparent: None,
    }
}

fn ended(c: &Claimed, outcome: Outcome) -> Transition {
    next(&c.state(), outcome, Utc::now()).expect("legal for a running attempt")
}

fn success(c: &Claimed, n: i64) -> Transition {
    ended(
        c,
        Outcome::Succeeded {
            result: json!({"n": n}),
            children: vec![],
        },
    )
}

/// Publishes into a list, or fails when told to.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(String, Uuid)>>,
    priorities: Mutex<Vec<i16>>,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Publisher for Recorder {
    async fn publish(&self, pool: &str, priority: i16, ids: &[Uuid]) -> anyhow::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("broker down");
        }
        let mut sent = self.sent.lock().expect("lock");
        sent.extend(ids.iter().map(|id| (pool.to_owned(), *id)));
        let mut priorities = self.priorities.lock().expect("lock");
        priorities.extend(ids.iter().map(|_| priority));
        Ok(())
    }
}

async fn inserts_with_idempotency_and_reads_back(kind: Kind) {
    let db = Db::open(kind).await;
    let first = new_job(Some("key-1"));
    let again = new_job(Some("key-1"));
    let other = new_job(None);
    let out = db
        .store
        .insert_jobs(&[first.clone(), other.clone()])
        .await
        .expect("insert");
    assert!(out
        .iter()
        .all(|i| i.created && i.status == JobStatus::Queued));
    let out = db.store.insert_jobs(&[again]).await.expect("insert");
    assert_eq!(
        (out[0].id, out[0].created),
        (first.id, false),
        "first job wins"
    );

    let job = db
        .store
        .get_job(first.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(
        (job.status, job.attempt, job.attempt_limit),
        (JobStatus::Queued, 0, 2)
    );
    assert_eq!(job.payload, json!({"n": 1}));
    assert_eq!(db.events(first.id).await, vec![("job.queued".into(), 0)]);
    assert!(db
        .store
        .get_job(Uuid::now_v7())
        .await
        .expect("get")
        .is_none());

    let page = db
        .store
        .list_jobs(&ListFilter {
            status: Some(JobStatus::Queued),
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    let ids: Vec<Uuid> = page.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![other.id, first.id], "newest first");
    let counts = db
        .store
        .counts(None, Some("probe"), None)
        .await
        .expect("counts");
    assert_eq!(counts.get("queued"), Some(&2));
    db.close().await;
}

async fn empty_batches_write_nothing(kind: Kind) {
    let db = Db::open(kind).await;
    assert!(db.store.insert_jobs(&[]).await.expect("insert").is_empty());
    assert!(db.store.apply(&[]).await.expect("apply").is_empty());
    assert!(db
        .store
        .claim(&[], "w", LEASE)
        .await
        .expect("claim")
        .is_empty());
    assert!(db.store.heartbeat(&[], LEASE).await.expect("hb").is_empty());
    assert_eq!(db.store.rescue_expired(10).await.expect("rescue"), 0);
    let recorder = Recorder::default();
    assert_eq!(
        db.store.relay_outbox(10, &recorder).await.expect("relay"),
        0
    );
    assert!(db
        .store
        .counts(None, None, None)
        .await
        .expect("counts")
        .is_empty());
    db.close().await;
}

async fn a_claim_takes_a_job_once_and_only_when_due(kind: Kind) {
    let db = Db::open(kind).await;
    let ids = db.insert(1).await;
    let mut later = new_job(None);
    later.run_at = Some(Utc::now() + chrono::Duration::hours(1));
    db.store
        .insert_jobs(&[later.clone()])
        .await
        .expect("insert");

    let both = [ids[0], ids[0], later.id];
    let claimed = db.store.claim(&both, "w", LEASE).await.expect("claim");
    assert_eq!(
        claimed.len(),
        1,
        "a duplicate id and a delayed job are left out"
    );
    assert_eq!((claimed[0].id, claimed[0].attempt), (ids[0], 1));
    assert!(db
        .store
        .claim(&ids, "w", LEASE)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(db.status(ids[0]).await, JobStatus::Running);
    assert_eq!(
        db.events(ids[0]).await,
        vec![("job.queued".into(), 0), ("job.started".into(), 1)]
    );
    let held = db
        .store
        .heartbeat(&[(ids[0], 1), (ids[0], 7)], LEASE)
        .await
        .expect("hb");
    assert_eq!(
        held.len(),
        1,
        "only the current attempt's lease is extended"
    );
    assert!(!held[0].cancel_requested);
    db.close().await;
}

async fn a_claim_returns_the_trace_context_and_when_the_job_became_due(kind: Kind) {
    let db = Db::open(kind).await;
    let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .expect("valid");
    let job = NewJob {
        traceparent: Some(tp.clone()),
        backoff: Backoff {
            base_ms: 1,
            max_ms: 1,
        },
        ..new_job(None)
    };
    db.store
        .insert_jobs(std::slice::from_ref(&job))
        .await
        .expect("insert");
    let first = db
        .store
        .claim(&[job.id], "w", Duration::ZERO)
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(first.traceparent.as_ref(), Some(&tp));
    assert!(
        (first.due_at - first.created_at).num_milliseconds().abs() < 1000,
        "a fresh job is due from its submit: {} vs {}",
        first.due_at,
        first.created_at
    );
    let before_retry = Utc::now();
    eventually(10, "the zero lease expires and is rescued", || async {
        db.store.rescue_expired(10).await.expect("rescue") == 1
    })
    .await;
    let second = Mutex::new(None);
    eventually(10, "the retry is claimed once due", || async {
        let mut c = db.store.claim(&[job.id], "w", LEASE).await.expect("claim");
        let got = !c.is_empty();
        *second.lock().expect("lock") = c.pop();
        got
    })
    .await;
    let second = second.into_inner().expect("lock").expect("claimed");
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.traceparent,
        Some(tp),
        "every attempt continues the trace"
    );
    assert!(
        second.due_at >= before_retry - chrono::Duration::milliseconds(1),
        "a retry is due from its retry time, not its submit: {} < {before_retry}",
        second.due_at
    );
    db.close().await;
}

async fn a_late_finish_of_an_older_attempt_is_refused(kind: Kind) {
    let db = Db::open(kind).await;
    let id = db.insert(1).await[0];
    let old = db
        .store
        .claim(&[id], "paused", Duration::ZERO)
        .await
        .expect("claim")
        .remove(0);
    eventually(10, "the zero lease expires and is rescued", || async {
        db.store.rescue_expired(10).await.expect("rescue") == 1
    })
    .await;
    assert_eq!(db.status(id).await, JobStatus::Retrying);
    let new = db.claim_one(id).await;
    assert_eq!(new.attempt, 2);

    assert!(db
        .store
        .heartbeat(&[(id, 1)], LEASE)
        .await
        .expect("hb")
        .is_empty());
    let refused = db.store.apply(&[success(&old, 1)]).await.expect("apply");
    assert!(refused.is_empty(), "attempt 1 is fenced off");
    let applied = db.store.apply(&[success(&new, 2)]).await.expect("apply");
    assert_eq!(applied, vec![id]);
    let job = db.store.get_job(id).await.expect("get").expect("found");
    assert_eq!(
        (job.status, job.result),
        (JobStatus::Succeeded, Some(json!({"n": 2})))
    );
    assert!(job.finished_at.is_some());
    assert_eq!(job.errors.len(), 1, "the expired lease is in the history");
    assert_eq!(
        db.events(id).await,
        vec![
            ("job.queued".into(), 0),
            ("job.started".into(), 1),
            ("job.retrying".into(), 1),
            ("job.started".into(), 2),
            ("job.succeeded".into(), 2),
        ]
    );
    db.close().await;
}

async fn a_mixed_batch_applies_each_row_on_its_own(kind: Kind) {
    let db = Db::open(kind).await;
    let ids = db.insert(5).await;
    let recorder = Recorder::default();
    assert_eq!(
        db.store.relay_outbox(100, &recorder).await.expect("relay"),
        5
    );
    let claimed = db.store.claim(&ids, "w", LEASE).await.expect("claim");
    let c: HashMap<Uuid, Claimed> = claimed.into_iter().map(|c| (c.id, c)).collect();
    let mut stale = success(&c[&ids[3]], 3);
    stale.attempt = 7;
    let batch = vec![
        success(&c[&ids[0]], 0),
        ended(
            &c[&ids[1]],
            Outcome::Failed(JobError::retry_after("429", Duration::from_secs(3600))),
        ),
        ended(&c[&ids[2]], Outcome::Failed(JobError::permanent("bad"))),
        stale,
        ended(&c[&ids[4]], Outcome::HandedBack),
    ];
    let mut applied = db.store.apply(&batch).await.expect("apply");
    applied.sort();
    let mut want = vec![ids[0], ids[1], ids[2], ids[4]];
    want.sort();
    assert_eq!(applied, want, "only the stale row is fenced");

    assert_eq!(db.status(ids[0]).await, JobStatus::Succeeded);
    let retrying = db.store.get_job(ids[1]).await.expect("get").expect("found");
    assert_eq!(retrying.status, JobStatus::Retrying);
    let (kept, asked) = (
        retrying.next_run_at.expect("set"),
        batch[1].next_run_at.expect("set"),
    );
    assert!(
        (kept - asked).abs() < chrono::Duration::milliseconds(1),
        "the retry time is kept (to the store's precision): {kept} vs {asked}"
    );
    assert_eq!(retrying.errors[0].class, "retryable");
    let dead = db.store.get_job(ids[2]).await.expect("get").expect("found");
    assert_eq!(
        (dead.status, dead.errors[0].class.as_str()),
        (JobStatus::Dead, "permanent")
    );
    assert_eq!(db.status(ids[3]).await, JobStatus::Running);
    let back = db.store.get_job(ids[4]).await.expect("get").expect("found");
    assert_eq!(
        (back.status, back.attempt_limit),
        (JobStatus::Queued, 3),
        "budget kept"
    );
    assert!(back.errors.is_empty());

    // The outbox: the handed-back job is due now, the retry in an hour.
    recorder.sent.lock().expect("lock").clear();
    let relayed = db.store.relay_outbox(100, &recorder).await.expect("relay");
    let sent: Vec<Uuid> = recorder
        .sent
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.1)
        .collect();
    assert!(
        sent.contains(&ids[4]) && !sent.contains(&ids[1]),
        "{sent:?}"
    );
    assert_eq!(relayed, sent.len());
    db.close().await;
}

async fn duplicate_ids_in_a_batch_move_a_job_once(kind: Kind) {
    let db = Db::open(kind).await;
    let id = db.insert(1).await[0];
    let c = db.claim_one(id).await;
    let applied = db
        .store
        .apply(&[success(&c, 1), success(&c, 2)])
        .await
        .expect("apply");
    assert_eq!(applied, vec![id]);
    let events = db.events(id).await;
    let done = events.iter().filter(|e| e.0 == "job.succeeded").count();
    assert_eq!(done, 1, "one transition, one event: {events:?}");
    db.close().await;
}

async fn children_are_inserted_only_with_a_success_that_applies(kind: Kind) {
    let db = Db::open(kind).await;
    let ids = db.insert(2).await;
    let c0 = db.claim_one(ids[0]).await;
    let c1 = db.claim_one(ids[1]).await;
    let child = |parent: Uuid| NewJob {
        parent_id: Some(parent),
        ..new_job(None)
    };
    let (kept, lost) = (child(ids[0]), child(ids[1]));
    let with_child = |c: &Claimed, kid: &NewJob| {
        ended(
            c,
            Outcome::Succeeded {
                result: json!({}),
                children: vec![kid.clone()],
            },
        )
    };
    let mut fenced = with_child(&c1, &lost);
    fenced.attempt = 9;
    let applied = db
        .store
        .apply(&[with_child(&c0, &kept), fenced])
        .await
        .expect("apply");
    assert_eq!(applied, vec![ids[0]]);
    let parent = db.store.get_job(ids[0]).await.expect("get").expect("found");
    assert_eq!(parent.children.len(), 1);
    assert_eq!(parent.children[0].id, kept.id);
    let kid = db
        .store
        .get_job(kept.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(
        (kid.status, kid.parent_id),
        (JobStatus::Queued, Some(ids[0]))
    );
    assert!(db.store.get_job(lost.id).await.expect("get").is_none());
    db.close().await;
}

async fn cancel_replay_and_purge_follow_the_rules(kind: Kind) {
    let db = Db::open(kind).await;
    let ids = db.insert(3).await;
    let s = &db.store;
    assert_eq!(
        s.cancel(ids[0]).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(db.status(ids[0]).await, JobStatus::Cancelled);
    assert!(s
        .claim(&ids[..1], "w", LEASE)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        s.cancel(ids[0]).await.expect("cancel"),
        CancelOutcome::AlreadyFinished(JobStatus::Cancelled)
    );
    assert_eq!(
        s.cancel(Uuid::now_v7()).await.expect("cancel"),
        CancelOutcome::NotFound
    );

    let running = db.claim_one(ids[1]).await;
    assert_eq!(
        s.cancel(ids[1]).await.expect("cancel"),
        CancelOutcome::Requested
    );
    assert_eq!(db.status(ids[1]).await, JobStatus::Running);
    let held = s.heartbeat(&[(ids[1], 1)], LEASE).await.expect("hb");
    assert!(
        held[0].cancel_requested,
        "the worker learns of it at its heartbeat"
    );
    let stop = ended(&running, Outcome::StoppedForCancel);
    assert_eq!(s.apply(&[stop]).await.expect("apply"), vec![ids[1]]);
    assert_eq!(db.status(ids[1]).await, JobStatus::Cancelled);

    let c = db.claim_one(ids[2]).await;
    let dead = ended(&c, Outcome::Failed(JobError::permanent("bad")));
    s.apply(&[dead]).await.expect("apply");
    assert_eq!(
        s.replay(ids[0]).await.expect("replay"),
        DeadLetterOutcome::NotDead(JobStatus::Cancelled)
    );
    assert_eq!(
        s.replay(ids[2]).await.expect("replay"),
        DeadLetterOutcome::Done
    );
    let job = s.get_job(ids[2]).await.expect("get").expect("found");
    assert_eq!((job.status, job.attempt_limit), (JobStatus::Queued, 1 + 2));
    let again = db.claim_one(ids[2]).await;
    let dead = ended(&again, Outcome::Failed(JobError::permanent("still bad")));
    s.apply(&[dead]).await.expect("apply");
    assert_eq!(
        s.purge(ids[1]).await.expect("purge"),
        DeadLetterOutcome::NotDead(JobStatus::Cancelled)
    );
    assert_eq!(
        s.purge(ids[2]).await.expect("purge"),
        DeadLetterOutcome::Done
    );
    assert!(s.get_job(ids[2]).await.expect("get").is_none());
    assert_eq!(
        s.purge(ids[2]).await.expect("purge"),
        DeadLetterOutcome::NotFound
    );
    db.close().await;
}

async fn expired_leases_retry_die_on_the_last_attempt_or_honour_a_cancel(kind: Kind) {
    let db = Db::open(kind).await;
    let ids = db.insert(3).await;
    let s = &db.store;
    // ids[1] on its last attempt: a first attempt already failed.
    let c = db.claim_one(ids[1]).await;
    let mut retry = ended(&c, Outcome::Failed(JobError::retryable("flaky")));
    retry.next_run_at = None;
    s.apply(&[retry]).await.expect("apply");
    s.claim(&ids, "dying", Duration::ZERO).await.expect("claim");
    assert_eq!(
        s.cancel(ids[2]).await.expect("cancel"),
        CancelOutcome::Requested
    );
    eventually(10, "all three leases rescued", || async {
        s.rescue_expired(10).await.expect("rescue");
        let st = [
            db.status(ids[0]).await,
            db.status(ids[1]).await,
            db.status(ids[2]).await,
        ];
        !st.contains(&JobStatus::Running)
    })
    .await;
    assert_eq!(db.status(ids[0]).await, JobStatus::Retrying);
    assert_eq!(db.status(ids[1]).await, JobStatus::Dead);
    assert_eq!(db.status(ids[2]).await, JobStatus::Cancelled);
    let job = s.get_job(ids[1]).await.expect("get").expect("found");
    assert!(job
        .errors
        .last()
        .is_some_and(|e| e.message.starts_with("lease expired")));
    db.close().await;
}

async fn the_outbox_is_kept_until_a_broker_takes_it_and_lost_jobs_are_resent(kind: Kind) {
    let db = Db::open(kind).await;
    let ids = db.insert(2).await;
    let s = &db.store;
    let r = Recorder::default();
    r.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(s.relay_outbox(10, &r).await.is_err());
    let waiting = |w: HashMap<String, i64>| w.get("probe").copied().unwrap_or(0);
    assert_eq!(waiting(s.published_waiting().await.expect("waiting")), 0);
    r.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        s.relay_outbox(10, &r).await.expect("relay"),
        2,
        "kept after the failure"
    );
    assert_eq!(s.relay_outbox(10, &r).await.expect("relay"), 0, "sent once");
    let mut sent: Vec<Uuid> = r.sent.lock().expect("lock").iter().map(|s| s.1).collect();
    sent.sort();
    assert_eq!(sent, ids);
    assert_eq!(waiting(s.published_waiting().await.expect("waiting")), 2);

    // A job cancelled before it was due leaves its outbox row behind; the
    // broker is not expected to hold it, and it must not hide a lost one.
    let mut later = new_job(None);
    later.run_at = Some(Utc::now() + chrono::Duration::hours(1));
    s.insert_jobs(&[later.clone()]).await.expect("insert");
    assert_eq!(
        s.cancel(later.id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(waiting(s.published_waiting().await.expect("waiting")), 2);

    // The broker forgot them: both are put back in the outbox once (the
    // loop waits out SQLite's millisecond clock).
    let repaired = std::sync::atomic::AtomicUsize::new(0);
    eventually(5, "both jobs re-sent", || async {
        let n = s
            .repair_lost("probe", Duration::ZERO, 10)
            .await
            .expect("repair");
        repaired.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n == 2
    })
    .await;
    assert_eq!(
        s.repair_lost("probe", Duration::ZERO, 10)
            .await
            .expect("repair"),
        0
    );
    assert_eq!(s.relay_outbox(10, &r).await.expect("relay"), 2);
    let depths = s.depths().await.expect("depths");
    assert_eq!(
        depths
            .by_kind_status
            .get(&("probe".into(), JobStatus::Queued)),
        Some(&2)
    );
    db.close().await;
}

async fn a_paused_pool_keeps_its_outbox_and_the_most_urgent_go_first(kind: Kind) {
    let db = Db::open(kind).await;
    let s = &db.store;
    let r = Recorder::default();
    // A job the broker already delivered when the pause came.
    let delivered = db.insert(1).await;
    assert_eq!(s.relay_outbox(10, &r).await.expect("relay"), 1);
    // SQLite's clock counts milliseconds: let "earlier" be visible.
    tokio::time::sleep(Duration::from_millis(10)).await;

    s.set_paused("probe", true).await.expect("pause");
    let job = |priority: i16| NewJob {
        priority,
        ..new_job(None)
    };
    let (low, mid, high, neg) = (job(0), job(5), job(100), job(-100));
    s.insert_jobs(&[neg.clone(), low.clone(), mid.clone(), high.clone()])
        .await
        .expect("insert");
    assert_eq!(
        s.relay_outbox(10, &r).await.expect("relay"),
        0,
        "held while paused"
    );

    // The delivered one is refused, and put back in the outbox rather than
    // lost with its message.
    let claimed = s.claim(&delivered, "w", LEASE).await.expect("claim");
    assert!(claimed.is_empty(), "claimed in a paused pool: {claimed:?}");
    let pools = s.pools(Duration::from_secs(5)).await.expect("pools");
    assert!(
        pools.iter().any(|p| p.name == "probe" && p.paused),
        "{pools:?}"
    );

    s.set_paused("probe", false).await.expect("resume");
    r.sent.lock().expect("lock").clear();
    r.priorities.lock().expect("lock").clear();
    assert_eq!(s.relay_outbox(10, &r).await.expect("relay"), 5);
    let sent: Vec<Uuid> = r.sent.lock().expect("lock").iter().map(|s| s.1).collect();
    assert_eq!(
        sent,
        vec![high.id, mid.id, delivered[0], low.id, neg.id],
        "most urgent first, FIFO within a priority"
    );
    assert_eq!(
        *r.priorities.lock().expect("lock"),
        vec![100, 5, 0, 0, -100]
    );
    let got = s.get_job(high.id).await.expect("get").expect("job");
    assert_eq!(got.priority, 100);
    assert_eq!(
        s.claim(&delivered, "w", LEASE).await.expect("claim").len(),
        1
    );

    // Workers report in; a clean stop signs off.
    assert!(!s.worker_seen("probe", "w1", 8).await.expect("seen"));
    s.worker_seen("probe", "w2", 4).await.expect("seen");
    let probe = |p: Vec<stevedore::store::PoolState>| p.into_iter().find(|p| p.name == "probe");
    let p = probe(s.pools(Duration::from_secs(5)).await.expect("pools")).expect("probe");
    assert_eq!((p.workers, p.concurrency, p.paused), (2, 12, false));
    s.worker_gone("w2").await.expect("gone");
    s.set_paused("probe", true).await.expect("pause");
    assert!(
        s.worker_seen("probe", "w1", 8).await.expect("seen"),
        "told it is paused"
    );
    let p = probe(s.pools(Duration::from_secs(5)).await.expect("pools")).expect("probe");
    assert_eq!((p.workers, p.concurrency, p.paused), (1, 8, true));
    db.close().await;
}

async fn pruning_removes_old_finished_jobs_and_their_events_and_keeps_the_rest(kind: Kind) {
    let db = Db::open(kind).await;
    let s = &db.store;
    let keyed = new_job(Some("nightly"));
    let ids = db.insert(2).await;
    s.insert_jobs(std::slice::from_ref(&keyed))
        .await
        .expect("insert");
    let (old, dead_one) = (ids[0], ids[1]);
    let done = db.claim_one(old).await;
    let keyed_claim = db.claim_one(keyed.id).await;
    let reported = s
        .record_progress(&[report(old, 1, 0.5, "half way")])
        .await
        .expect("progress");
    assert_eq!(reported.written, vec![old]);
    s.apply(&[success(&done, 1), success(&keyed_claim, 2)])
        .await
        .expect("finish");
    let c = db.claim_one(dead_one).await;
    let t = ended(&c, Outcome::Failed(JobError::permanent("no")));
    s.apply(&[t]).await.expect("die");
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // Young: ended just now, and one still waiting.
    let young = db.insert(2).await;
    let c = db.claim_one(young[0]).await;
    s.apply(&[success(&c, 3)]).await.expect("finish");

    let finished = [JobStatus::Succeeded, JobStatus::Cancelled];
    let age = Duration::from_millis(1_000);
    assert_eq!(
        s.prune_finished(&finished, Duration::from_secs(3600), 100)
            .await
            .expect("prune"),
        0
    );
    assert_eq!(
        s.prune_finished(&finished, age, 1).await.expect("prune"),
        1,
        "one per batch"
    );
    assert_eq!(
        s.prune_finished(&finished, age, 100).await.expect("prune"),
        1
    );
    assert_eq!(
        s.prune_finished(&finished, age, 100).await.expect("prune"),
        0
    );
    for gone in [old, keyed.id] {
        assert!(
            s.get_job(gone).await.expect("get").is_none(),
            "{gone} pruned"
        );
        assert!(
            s.job_events(gone).await.expect("events").is_empty(),
            "its events too"
        );
    }
    assert_eq!(
        db.status(dead_one).await,
        JobStatus::Dead,
        "dead ones keep longer"
    );
    assert_eq!(
        db.status(young[0]).await,
        JobStatus::Succeeded,
        "young kept"
    );
    assert_eq!(db.status(young[1]).await, JobStatus::Queued, "waiting kept");
    assert!(!s.job_events(young[0]).await.expect("events").is_empty());
    assert_eq!(
        s.prune_finished(&[JobStatus::Dead], age, 100)
            .await
            .expect("prune"),
        1
    );

    // The key went with its job: the same key makes a new job now.
    let again = new_job(Some("nightly"));
    let out = s
        .insert_jobs(std::slice::from_ref(&again))
        .await
        .expect("insert");
    assert_eq!((out[0].id, out[0].created), (again.id, true));
    db.close().await;
}

async fn tenants_keep_their_jobs_and_children_follow_their_parent(kind: Kind) {
    let db = Db::open(kind).await;
    let s = &db.store;
    let mine = NewJob {
        tenant: "acme".into(),
        ..new_job(None)
    };
    let theirs = NewJob {
        tenant: "other".into(),
        ..new_job(None)
    };
    s.insert_jobs(&[mine.clone(), theirs.clone()])
        .await
        .expect("insert");
    let only = |t: &str| ListFilter {
        limit: 10,
        tenant: Some(t.into()),
        ..ListFilter::default()
    };
    let ids = |jobs: Vec<stevedore::model::job::Job>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_jobs(&only("acme")).await.expect("list")),
        vec![mine.id]
    );
    assert_eq!(
        ids(s.list_jobs(&only("other")).await.expect("list")),
        vec![theirs.id]
    );
    let counts = s.counts(None, None, Some("acme")).await.expect("counts");
    assert_eq!(counts.get("queued"), Some(&1));
    let job = s.get_job(mine.id).await.expect("get").expect("found");
    assert_eq!(job.tenant, "acme");

    // A child belongs to its parent's tenant whatever it says itself.
    let c = db.claim_one(mine.id).await;
    let kid = NewJob {
        parent_id: Some(mine.id),
        tenant: "other".into(),
        ..new_job(None)
    };
    let done = ended(
        &c,
        Outcome::Succeeded {
            result: json!({}),
            children: vec![kid.clone()],
        },
    );
    assert_eq!(s.apply(&[done]).await.expect("apply"), vec![mine.id]);
    let kid = s.get_job(kid.id).await.expect("get").expect("found");
    assert_eq!(kid.tenant, "acme");
    db.close().await;
}

/// Postgres only: dev mode (SQLite) serves one tenant, so its idempotency
/// keys stay unique across the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_belongs_to_its_tenant() {
    let db = Db::open(Kind::Postgres).await;
    let a = NewJob {
        tenant: "a".into(),
        ..new_job(Some("order-1"))
    };
    let b = NewJob {
        tenant: "b".into(),
        ..new_job(Some("order-1"))
    };
    let again = NewJob {
        tenant: "a".into(),
        ..new_job(Some("order-1"))
    };
    let first = db
        .store
        .insert_jobs(std::slice::from_ref(&a))
        .await
        .expect("insert");
    let second = db
        .store
        .insert_jobs(&[b.clone(), again])
        .await
        .expect("insert");
    assert!(first[0].created);
    assert!(second[0].created, "b's key is its own: {second:?}");
    assert_eq!(second[0].id, b.id);
    assert!(!second[1].created, "a's key again returns a's job");
    assert_eq!(second[1].id, a.id);
    db.close().await;
}

fn schedule(name: &str, cron: &str, next: chrono::DateTime<Utc>) -> NewSchedule {
    NewSchedule {
        name: name.into(),
        tenant: "acme".into(),
        cron: cron.into(),
        timezone: "UTC".into(),
        jitter_secs: 0,
        job: serde_json::from_value(json!({"kind": "probe", "payload": {"n": 1}, "priority": 7}))
            .expect("submit body"),
        next_fire_at: Some(next),
    }
}

async fn fire_now(
    store: &dyn Store,
    now: chrono::DateTime<Utc>,
    pause: Duration,
) -> Vec<stevedore::store::Fired> {
    store
        .fire_schedules(now, 10, &move |s| {
            // Holds the schedule mid-fire, as a slow or dying dispatcher would.
            std::thread::sleep(pause);
            schedule::fire(s, now, chrono::Duration::zero())
        })
        .await
        .expect("fire")
}

async fn schedules_make_one_job_per_fire_time_and_only_the_latest_missed(kind: Kind) {
    let db = Db::open(kind).await;
    let s = db.store.as_ref();
    let now = Utc::now();
    // Due for an hour: a dispatcher coming back runs it once, for the
    // latest five-minute mark, and moves on to the next one.
    let hour_ago = now - chrono::Duration::hours(1);
    assert!(s
        .put_schedule(&schedule("five", "*/5 * * * *", hour_ago))
        .await
        .expect("put"));
    let fired = fire_now(s, now, Duration::ZERO).await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    let id = fired[0].job_id.expect("a job");
    let job = s.get_job(id).await.expect("get").expect("job");
    let plan = schedule::Plan::parse("*/5 * * * *", "UTC").expect("plan");
    let latest = plan.latest_due(hour_ago, now).expect("latest");
    assert!(now - latest < chrono::Duration::minutes(5));
    assert_eq!(job.schedule.as_deref(), Some("five"));
    assert_eq!(job.scheduled_for, Some(latest));
    assert_eq!(
        (job.tenant.as_str(), job.priority, job.status),
        ("acme", 7, JobStatus::Queued)
    );
    let shown = s
        .schedule("acme", "five")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(shown.last_job_id, Some(id));
    assert_eq!(shown.last_fire_at, Some(latest));
    assert!(shown.next_fire_at.is_some_and(|n| n > now), "{shown:?}");
    assert!(
        fire_now(s, now, Duration::ZERO).await.is_empty(),
        "fired once"
    );

    // Two dispatchers at once: the one that finds the schedule taken by the
    // other (locked, or already moved on) makes nothing.
    let due = now - chrono::Duration::seconds(1);
    assert!(s
        .put_schedule(&schedule("tick", "* * * * * *", due))
        .await
        .expect("put"));
    let (a, b) = tokio::join!(fire_now(s, now, Duration::from_millis(300)), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fire_now(s, now, Duration::ZERO).await
    });
    let made: Vec<_> = a.iter().chain(&b).filter_map(|f| f.job_id).collect();
    assert_eq!(made.len(), 1, "one job for one fire time: {a:?} {b:?}");

    // Pausing holds it; replacing keeps it paused; tenants see their own.
    assert!(s
        .set_schedule_paused("acme", "tick", None)
        .await
        .expect("pause"));
    assert!(!s
        .put_schedule(&schedule("tick", "*/2 * * * * *", due))
        .await
        .expect("replace"));
    let tick = s
        .schedule("acme", "tick")
        .await
        .expect("get")
        .expect("exists");
    assert!(tick.paused && tick.next_fire_at.is_none(), "{tick:?}");
    assert_eq!(tick.cron, "*/2 * * * * *");
    assert!(
        fire_now(s, now + chrono::Duration::hours(1), Duration::ZERO)
            .await
            .iter()
            .all(|f| f.name != "tick")
    );
    assert!(s.schedule("other", "tick").await.expect("get").is_none());
    assert!(s.schedules("other").await.expect("list").is_empty());
    let names: Vec<String> = s
        .schedules("acme")
        .await
        .expect("list")
        .into_iter()
        .map(|x| x.name)
        .collect();
    assert_eq!(names, ["five", "tick"]);
    assert!(!s.delete_schedule("other", "tick").await.expect("delete"));
    assert!(s.delete_schedule("acme", "tick").await.expect("delete"));
    assert!(s.schedule("acme", "tick").await.expect("get").is_none());
    assert!(
        s.get_job(made[0]).await.expect("get").is_some(),
        "its jobs stay"
    );
    db.close().await;
}

async fn concurrency_keys_cap_running_jobs_per_key_and_release_on_finish(kind: Kind) {
    let db = Db::open(kind).await;
    let s = &db.store;
    let r = Recorder::default();
    let sent = |r: &Recorder| -> Vec<Uuid> {
        let ids = r.sent.lock().expect("lock").iter().map(|s| s.1).collect();
        r.sent.lock().expect("lock").clear();
        ids
    };
    assert!(!s.set_concurrency_limit("k:", Some(2)).await.expect("limit"));
    let keyed = |key: &str, priority: i16| NewJob {
        concurrency_key: Some(key.into()),
        priority,
        ..new_job(None)
    };
    let a: Vec<NewJob> = (0..5).map(|i| keyed("k:a", i)).collect();
    let b = keyed("k:b", 0);
    let plain = new_job(None);
    let all: Vec<NewJob> = a
        .iter()
        .cloned()
        .chain([b.clone(), plain.clone()])
        .collect();
    s.insert_jobs(&all).await.expect("insert");
    assert_eq!(s.relay_outbox(100, &r).await.expect("relay"), 7);
    let ids = sent(&r);

    // Handed all seven: two of k:a (the most urgent), k:b and the plain one
    // start; three of k:a wait held on their key.
    let claimed = s.claim(&ids, "w", LEASE).await.expect("claim");
    let mut started: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    started.sort();
    let mut want = vec![a[4].id, a[3].id, b.id, plain.id];
    want.sort();
    assert_eq!(started, want);
    assert_eq!(s.relay_outbox(100, &r).await.expect("relay"), 0, "held");
    let limits = s.concurrency_limits().await.expect("limits");
    let k = limits
        .iter()
        .find(|l| l.prefix == "k:")
        .expect("k: is listed");
    assert_eq!((k.max_running, k.running, k.held), (2, 3, 3), "{limits:?}");
    assert!(
        limits
            .iter()
            .any(|l| l.prefix == "host:" && l.max_running == 4),
        "sites get a limit by default: {limits:?}"
    );
    // The safety net finds no room on k:a.
    assert_eq!(s.release_held().await.expect("release"), 0);

    // One of k:a ends: the most urgent held one goes to the relay, and may
    // start.
    let done = claimed.iter().find(|c| c.id == a[4].id).expect("a4");
    s.apply(&[success(done, 1)]).await.expect("finish");
    assert_eq!(s.relay_outbox(100, &r).await.expect("relay"), 1);
    assert_eq!(sent(&r), [a[2].id], "the most urgent held job");
    assert_eq!(
        s.claim(&[a[2].id], "w", LEASE).await.expect("claim").len(),
        1
    );

    // A cool-down on k:b: its next job waits it out, in the outbox.
    s.cool_down("k:b", Utc::now() + chrono::Duration::seconds(30))
        .await
        .expect("cool");
    let b2 = keyed("k:b", 0);
    s.insert_jobs(std::slice::from_ref(&b2))
        .await
        .expect("insert");
    assert_eq!(s.relay_outbox(100, &r).await.expect("relay"), 1);
    assert!(s
        .claim(&sent(&r), "w", LEASE)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(s.relay_outbox(100, &r).await.expect("relay"), 0, "delayed");
    assert_eq!(
        s.get_job(b2.id).await.expect("get").expect("job").status,
        JobStatus::Queued
    );

    // A raised limit lets the rest of k:a go at once.
    assert!(s
        .set_concurrency_limit("k:", Some(10))
        .await
        .expect("limit"));
    assert_eq!(s.relay_outbox(100, &r).await.expect("relay"), 2);
    let mut rest = sent(&r);
    rest.sort();
    let mut want = vec![a[0].id, a[1].id];
    want.sort();
    assert_eq!(rest, want);
    assert!(s.set_concurrency_limit("k:", None).await.expect("remove"));
    assert!(!s.set_concurrency_limit("k:", None).await.expect("remove"));
    assert!(s
        .concurrency_limits()
        .await
        .expect("limits")
        .iter()
        .all(|l| l.prefix != "k:"));
    db.close().await;
}

fn report(id: Uuid, attempt: i32, fraction: f32, message: &str) -> ProgressReport {
    ProgressReport {
        job_id: id,
        progress: JobProgress {
            fraction,
            message: message.into(),
            partial: None,
            attempt,
            at: Utc::now(),
        },
    }
}

async fn progress_is_recorded_fenced_by_attempt_and_announced(kind: Kind) {
    let db = Db::open(kind).await;
    let s = &db.store;
    let ids = db.insert(2).await;
    let (a, waiting) = (ids[0], ids[1]);
    let first = db.claim_one(a).await;
    let mut half = report(a, 1, 0.5, "two");
    half.progress.partial = Some(json!({"answer": {"question": 0, "choice": 1}}));
    let out = s
        .record_progress(&[
            report(a, 1, 0.25, "one"),
            half.clone(),
            report(waiting, 0, 0.1, "not running"),
        ])
        .await
        .expect("progress");
    assert_eq!((out.written, out.busy), (vec![a], vec![]));
    let job = s.get_job(a).await.expect("get").expect("found");
    let shown = job.progress.expect("the latest report is shown");
    assert_eq!(
        (
            shown.fraction,
            shown.message.as_str(),
            &shown.partial,
            shown.attempt
        ),
        (0.5, "two", &half.progress.partial, 1)
    );
    assert_eq!(
        (job.status, job.attempt),
        (JobStatus::Running, 1),
        "no transition"
    );
    let waiting_job = s.get_job(waiting).await.expect("get").expect("found");
    assert!(
        waiting_job.progress.is_none(),
        "a queued job reports nothing"
    );

    // Every report is an event, in order, with its own report on it.
    let page = db.notifier.read_after(0, 100).await.expect("read");
    let reports: Vec<(String, f32, Option<serde_json::Value>)> = page
        .events
        .iter()
        .filter(|e| e.job_id == a && e.event_type == "job.progress")
        .map(|e| {
            let p = e
                .progress
                .clone()
                .expect("a progress event carries its report");
            (p.message, p.fraction, p.partial)
        })
        .collect();
    assert_eq!(
        reports,
        vec![
            ("one".into(), 0.25, None),
            ("two".into(), 0.5, half.progress.partial.clone())
        ]
    );
    assert!(page
        .events
        .iter()
        .filter(|e| e.event_type != "job.progress")
        .all(|e| e.progress.is_none()));

    // Attempt 1 is handed back and the job claimed again: only attempt 2
    // may report now, and the end of the job ends its reports.
    s.apply(&[ended(&first, Outcome::HandedBack)])
        .await
        .expect("hand back");
    let second = db.claim_one(a).await;
    assert_eq!(second.attempt, 2);
    let late = s
        .record_progress(&[report(a, 1, 0.9, "stale")])
        .await
        .expect("progress");
    assert!(late.written.is_empty() && late.busy.is_empty(), "{late:?}");
    let now = s
        .record_progress(&[report(a, 2, 0.1, "again")])
        .await
        .expect("progress");
    assert_eq!(now.written, vec![a]);
    s.apply(&[success(&second, 1)]).await.expect("finish");
    let after = s
        .record_progress(&[report(a, 2, 1.0, "after the end")])
        .await
        .expect("progress");
    assert!(after.written.is_empty(), "{after:?}");
    let job = s.get_job(a).await.expect("get").expect("found");
    assert_eq!(
        job.progress.map(|p| (p.message, p.attempt)),
        Some(("again".into(), 2)),
        "the last accepted report stays with the ended job"
    );
    let kinds: Vec<(String, i32)> = db.events(a).await;
    assert_eq!(
        kinds,
        [
            ("job.queued", 0),
            ("job.started", 1),
            ("job.progress", 1),
            ("job.progress", 1),
            ("job.queued", 1),
            ("job.started", 2),
            ("job.progress", 2),
            ("job.succeeded", 2),
        ]
        .map(|(k, n)| (k.to_owned(), n))
    );

    // On Postgres a row another transaction holds is skipped, not waited
    // for, and answered busy.
    if let Some(url) = &db.pg_url {
        let b = db.insert(1).await[0];
        db.claim_one(b).await;
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(b)
            .execute(&mut *tx)
            .await
            .expect("lock");
        let held = tokio::time::timeout(
            Duration::from_secs(5),
            s.record_progress(&[report(b, 1, 0.3, "held")]),
        )
        .await
        .expect("does not wait for the lock")
        .expect("progress");
        assert_eq!((held.written, held.busy), (vec![], vec![b]));
        tx.rollback().await.expect("rollback");
        let free = s
            .record_progress(&[report(b, 1, 0.3, "free")])
            .await
            .expect("progress");
        assert_eq!(free.written, vec![b]);
        pool.close().await;
    }
    db.close().await;
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Postgres).await })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Sqlite).await })*
        }
    };
}

both_stores!(
    inserts_with_idempotency_and_reads_back,
    empty_batches_write_nothing,
    a_claim_takes_a_job_once_and_only_when_due,
    a_claim_returns_the_trace_context_and_when_the_job_became_due,
    a_late_finish_of_an_older_attempt_is_refused,
    a_mixed_batch_applies_each_row_on_its_own,
    duplicate_ids_in_a_batch_move_a_job_once,
    children_are_inserted_only_with_a_success_that_applies,
    cancel_replay_and_purge_follow_the_rules,
    expired_leases_retry_die_on_the_last_attempt_or_honour_a_cancel,
    the_outbox_is_kept_until_a_broker_takes_it_and_lost_jobs_are_resent,
    tenants_keep_their_jobs_and_children_follow_their_parent,
    a_paused_pool_keeps_its_outbox_and_the_most_urgent_go_first,
    pruning_removes_old_finished_jobs_and_their_events_and_keeps_the_rest,
    schedules_make_one_job_per_fire_time_and_only_the_latest_missed,
    concurrency_keys_cap_running_jobs_per_key_and_release_on_finish,
    progress_is_recorded_fenced_by_attempt_and_announced,
);
