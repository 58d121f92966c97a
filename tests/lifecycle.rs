//! The job lifecycle end to end through the HTTP API, on Postgres + Redis
//! and on the embedded SQLite mode: success, retries with backoff, dead
//! letters, cancel, idempotency, duplicates, lease recovery and fencing,
//! delayed jobs and a broker that forgets everything.

mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::json;
use stevedore::model::lifecycle::{next, Outcome};
use support::{eventually, Flavor, Opts, TestFleet};
use uuid::Uuid;

fn ts(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str().expect("timestamp").parse().expect("RFC 3339")
}

async fn successful_job_records_its_result_and_events(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f.probe(json!({"sleep_ms": 10}), json!({})).await;
    let job = f.wait_status(id, "succeeded", 20).await;
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["result"]["attempt"], 1);
    assert!(job["errors"].as_array().expect("errors").is_empty());
    assert!(ts(&job["finished_at"]) >= ts(&job["started_at"]));
    let events = f.events(id).await;
    assert_eq!(
        events,
        vec![
            ("job.queued".into(), 0),
            ("job.started".into(), 1),
            ("job.succeeded".into(), 1)
        ]
    );
    f.shutdown().await;
}

async fn retryable_failure_is_retried_with_backoff_then_succeeds(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"fail_attempts": 2}),
            json!({"backoff": {"base_ms": 300, "max_ms": 600}}),
        )
        .await;
    let job = f.wait_status(id, "succeeded", 30).await;
    assert_eq!(job["attempt"], 3);
    let errors = job["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2);
    let started: Vec<DateTime<Utc>> = f
        .store()
        .job_events(id)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "job.started")
        .map(|e| e.at)
        .collect();
    assert_eq!(started.len(), 3);
    for (n, e) in errors.iter().enumerate() {
        assert_eq!(e["class"], "retryable");
        let failed_at = ts(&e["at"]);
        let retry_at = ts(&e["retry_at"]);
        let ceiling = chrono::Duration::milliseconds(300 << n);
        assert!(
            retry_at >= failed_at && retry_at <= failed_at + ceiling,
            "delay within the jittered ceiling: {e}"
        );
        // Millisecond slack: SQLite stores milliseconds.
        assert!(
            started[n + 1] + chrono::Duration::milliseconds(1) >= retry_at,
            "attempt {} started at {} before its retry time {retry_at}",
            n + 2,
            started[n + 1]
        );
    }
    f.shutdown().await;
}

async fn permanent_failure_goes_straight_to_dead(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"fail_attempts": 3, "failure": "permanent"}),
            json!({}),
        )
        .await;
    let job = f.wait_status(id, "dead", 20).await;
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["errors"][0]["class"], "permanent");
    f.shutdown().await;
}

async fn last_attempt_goes_to_dead_then_replay_gets_a_fresh_budget(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"fail_attempts": 2}),
            json!({"max_attempts": 2, "backoff": {"base_ms": 50, "max_ms": 50}}),
        )
        .await;
    let job = f.wait_status(id, "dead", 20).await;
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["errors"].as_array().expect("errors").len(), 2);

    let (status, page) = f.get("/v1/dead-letters").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .any(|j| j["id"] == id.to_string()));
    let (status, shown) = f.get(&format!("/v1/dead-letters/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["errors"].as_array().expect("errors").len(), 2);

    let (status, v) = f
        .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let job = f.wait_status(id, "succeeded", 20).await;
    assert_eq!(
        job["attempt"], 3,
        "attempt numbers keep counting across a replay"
    );
    assert_eq!(
        job["errors"].as_array().expect("errors").len(),
        2,
        "history is kept"
    );
    let (status, _) = f
        .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "only dead jobs can be replayed"
    );

    let other = f
        .probe(
            json!({"fail_attempts": 1, "failure": "permanent"}),
            json!({}),
        )
        .await;
    f.wait_status(other, "dead", 20).await;
    assert_eq!(
        f.delete(&format!("/v1/dead-letters/{other}")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.get(&format!("/v1/dead-letters/{other}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.get(&format!("/v1/jobs/{other}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.delete(&format!("/v1/dead-letters/{id}")).await,
        StatusCode::CONFLICT
    );
    f.shutdown().await;
}

async fn cancel_works_in_each_state(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    // queued: held back by run_at
    let later = (Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    let queued = f.probe(json!({}), json!({"run_at": later})).await;
    let (status, v) = f
        .post(&format!("/v1/jobs/{queued}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );

    // retrying: failed once, waiting out a long backoff
    let retrying = f
        .probe(
            json!({"fail_attempts": 1}),
            json!({"backoff": {"base_ms": 60000, "max_ms": 60000}}),
        )
        .await;
    f.wait_status(retrying, "retrying", 20).await;
    let (status, _) = f
        .post(&format!("/v1/jobs/{retrying}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    f.wait_status(retrying, "cancelled", 5).await;

    // running: cancelled at the next lease check, long before its sleep ends
    let running = f.probe(json!({"sleep_ms": 30000}), json!({})).await;
    f.wait_status(running, "running", 20).await;
    let (status, v) = f
        .post(&format!("/v1/jobs/{running}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["cancel_requested"], true);
    let job = f.wait_status(running, "cancelled", 10).await;
    assert!(job["result"].is_null());

    // finished: conflict; unknown: not found
    let (status, v) = f
        .post(&format!("/v1/jobs/{running}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "conflict");
    let (status, _) = f
        .post(&format!("/v1/jobs/{}/cancel", Uuid::now_v7()), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    f.shutdown().await;
}

async fn idempotency_key_returns_the_first_job(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let body = json!({"kind": "probe", "payload": {}, "idempotency_key": "order-1"});
    let (s1, first) = f.post("/v1/jobs", body.clone()).await;
    let (s2, again) = f.post("/v1/jobs", body).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::OK));
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["created"], false);

    let body = json!({"kind": "probe", "payload": {}, "idempotency_key": "burst"});
    let answers =
        futures::future::join_all((0..20).map(|_| f.post("/v1/jobs", body.clone()))).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(s, v)| {
            assert!(s.is_success(), "{v}");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "20 concurrent submits with one key make one job"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|(s, _)| *s == StatusCode::ACCEPTED)
            .count(),
        1
    );
    f.shutdown().await;
}

async fn a_job_delivered_twice_runs_once(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f.probe(json!({"sleep_ms": 300}), json!({})).await;
    let broker = f.backend.brokers.for_pool("probe").clone();
    broker
        .publish("probe", 0, &[id, id])
        .await
        .expect("publish duplicates");
    f.wait_status(id, "succeeded", 20).await;
    // Late duplicates after success are dropped as well: once the broker
    // holds nothing unacked, every copy has been received and handled.
    broker.publish("probe", 0, &[id]).await.expect("publish");
    eventually(20, "every copy received and acked", || {
        let broker = broker.clone();
        async move { broker.depth("probe").await.is_ok_and(|d| d == 0) }
    })
    .await;
    let started = f
        .events(id)
        .await
        .into_iter()
        .filter(|e| e.0 == "job.started")
        .count();
    assert_eq!(started, 1, "one attempt ran");
    assert_eq!(f.job(id).await["attempt"], 1);
    f.shutdown().await;
}

async fn a_worker_that_dies_mid_job_is_recovered_after_its_lease(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![],
            ..Opts::default()
        },
    )
    .await;
    let id = f.probe(json!({}), json!({})).await;
    // A "worker" claims the job and dies without finishing or heartbeating.
    let claimed = f
        .store()
        .claim(&[id], "doomed", Duration::from_millis(500))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let workers = f.start_workers("probe", 4).await;
    let job = f.wait_status(id, "succeeded", 20).await;
    assert_eq!(job["attempt"], 2);
    assert!(job["errors"][0]["message"]
        .as_str()
        .expect("message")
        .contains("lease expired"));
    workers.shutdown().await;
    f.shutdown().await;
}

async fn a_paused_worker_cannot_overwrite_the_newer_attempt(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![],
            ..Opts::default()
        },
    )
    .await;
    let id = f.probe(json!({}), json!({})).await;
    let paused = f
        .store()
        .claim(&[id], "paused", Duration::from_millis(300))
        .await
        .expect("claim");
    assert_eq!(paused[0].attempt, 1);
    let workers = f.start_workers("probe", 4).await;
    let job = f.wait_status(id, "succeeded", 20).await;
    assert_eq!(job["attempt"], 2);
    // The paused worker wakes up and tries to heartbeat and to finish.
    let held = f
        .store()
        .heartbeat(&[(id, 1)], Duration::from_secs(30))
        .await
        .expect("heartbeat");
    assert!(held.is_empty(), "the stale lease is not extended");
    let stale = next(
        &paused[0].state(),
        Outcome::Succeeded {
            result: json!({"stale": true}),
            children: vec![],
        },
        Utc::now(),
    )
    .expect("a running attempt may succeed");
    let applied = f.store().apply(&[stale]).await.expect("apply");
    assert!(applied.is_empty(), "the late write is refused");
    let job = f.job(id).await;
    assert_eq!(
        job["result"]["attempt"], 2,
        "the newer result is kept: {job}"
    );
    assert_eq!(job["status"], "succeeded");
    workers.shutdown().await;
    f.shutdown().await;
}

async fn a_delayed_job_does_not_start_early(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let run_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let id = f
        .probe(json!({}), json!({"run_at": run_at.to_rfc3339()}))
        .await;
    // Watch it the whole way: every look before run_at finds it queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut early_looks = 0;
    let job = loop {
        let looked_at = Utc::now();
        let job = f.job(id).await;
        if looked_at < run_at - chrono::Duration::milliseconds(50) {
            assert_eq!(job["status"], "queued", "started before its run_at: {job}");
            early_looks += 1;
        }
        if job["status"] == "succeeded" {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ran: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(early_looks > 0, "the job was looked at before its run_at");
    assert!(ts(&job["started_at"]) + chrono::Duration::milliseconds(1) >= run_at);
    f.shutdown().await;
}

async fn batch_submit_and_pagination(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let jobs: Vec<_> = (0..5)
        .map(|_| json!({"kind": "probe", "payload": {}}))
        .collect();
    let (status, v) = f.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let ids: Vec<Uuid> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").parse().expect("uuid"))
        .collect();
    assert_eq!(ids.len(), 5);
    for id in &ids {
        f.wait_status(*id, "succeeded", 20).await;
    }
    let (_, p1) = f.get("/v1/jobs?limit=3&status=succeeded").await;
    let cursor = p1["next_cursor"].as_str().expect("cursor");
    let (_, p2) = f
        .get(&format!(
            "/v1/jobs?limit=3&status=succeeded&cursor={cursor}"
        ))
        .await;
    let mut seen: Vec<String> = p1["jobs"]
        .as_array()
        .into_iter()
        .chain(p2["jobs"].as_array())
        .flatten()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();
    assert!(p2["next_cursor"].is_null());
    let newest_first = seen.clone();
    seen.sort();
    seen.reverse();
    assert_eq!(newest_first, seen, "newest first");
    assert_eq!(seen.len(), 5);
    f.shutdown().await;
}

async fn stopping_a_worker_finishes_short_jobs_and_hands_back_long_ones(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![],
            ..Opts::default()
        },
    )
    .await;
    let short = f.probe(json!({"sleep_ms": 300}), json!({})).await;
    let long = f.probe(json!({"sleep_ms": 60000}), json!({})).await;
    let timing = stevedore::config::TimingArgs {
        grace_secs: 1.5,
        ..support::fast_timing()
    };
    let workers = f.start_workers_with("probe", 4, timing).await;
    f.wait_status(short, "running", 20).await;
    f.wait_status(long, "running", 20).await;
    workers.shutdown().await;
    assert_eq!(
        f.job(short).await["status"],
        "succeeded",
        "in-flight work finishes within the grace period"
    );
    let handed_back = f.job(long).await;
    assert_eq!(handed_back["status"], "queued", "{handed_back}");
    assert_eq!(
        handed_back["attempt_limit"], 6,
        "an interrupted attempt does not use up the budget"
    );
    assert!(handed_back["errors"].as_array().expect("errors").is_empty());
    f.shutdown().await;
}

/// A handler that snoozes runs again after the delay it asked for, as often
/// as it asks, without coming closer to the dead letters: one allowed
/// attempt, two snoozes, then success.
async fn a_snoozed_job_runs_again_later_without_using_its_attempts(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"snooze_attempts": 2, "snooze_ms": 400}),
            json!({"max_attempts": 1}),
        )
        .await;
    let job = f.wait_status(id, "succeeded", 30).await;
    assert_eq!(
        (&job["attempt"], &job["attempt_limit"]),
        (&json!(3), &json!(3)),
        "{job}"
    );
    let errors = job["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2, "{job}");
    let started: Vec<DateTime<Utc>> = f
        .store()
        .job_events(id)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "job.started")
        .map(|e| e.at)
        .collect();
    for (n, e) in errors.iter().enumerate() {
        assert_eq!(e["class"], "snoozed", "{e}");
        let at = ts(&e["at"]);
        let retry_at = ts(&e["retry_at"]);
        assert_eq!(retry_at - at, chrono::Duration::milliseconds(400), "{e}");
        assert!(
            started[n + 1] + chrono::Duration::milliseconds(1) >= retry_at,
            "not started before its snooze ended: {e}"
        );
    }
    f.shutdown().await;
}

both_flavors!(
    stopping_a_worker_finishes_short_jobs_and_hands_back_long_ones,
    successful_job_records_its_result_and_events,
    retryable_failure_is_retried_with_backoff_then_succeeds,
    permanent_failure_goes_straight_to_dead,
    last_attempt_goes_to_dead_then_replay_gets_a_fresh_budget,
    cancel_works_in_each_state,
    idempotency_key_returns_the_first_job,
    a_job_delivered_twice_runs_once,
    a_worker_that_dies_mid_job_is_recovered_after_its_lease,
    a_paused_worker_cannot_overwrite_the_newer_attempt,
    a_delayed_job_does_not_start_early,
    batch_submit_and_pagination,
    a_snoozed_job_runs_again_later_without_using_its_attempts,
);

/// Postgres + Redis only: Redis forgets every queued message; the
/// dispatcher re-sends them from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiping_redis_loses_no_queued_job() {
    let f = TestFleet::start_with(
        Flavor::Postgres,
        Opts {
            workers: vec![],
            ..Opts::default()
        },
    )
    .await;
    let jobs: Vec<_> = (0..50)
        .map(|_| json!({"kind": "probe", "payload": {}}))
        .collect();
    let (_, v) = f.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    let ids: Vec<Uuid> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").parse().expect("uuid"))
        .collect();
    let mut redis = redis::Client::open(support::redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("{}:stream:probe", f.redis_prefix);
    eventually(10, "the relay published the jobs", || {
        let mut r = redis.clone();
        let key = key.clone();
        async move {
            redis::cmd("XLEN")
                .arg(&key)
                .query_async::<i64>(&mut r)
                .await
                .unwrap_or(0)
                >= 50
        }
    })
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("wipe");
    let workers = f.start_workers("probe", 8).await;
    for id in ids {
        f.wait_status(id, "succeeded", 30).await;
    }
    workers.shutdown().await;
    f.shutdown().await;
}
