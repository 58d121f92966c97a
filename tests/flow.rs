//! Flow control as an operator uses it, on each store and broker: pausing a
//! pool holds its jobs (across restarts of every role) while submits go
//! on, and on resume the most urgent start first; bulk actions by filter
//! take exactly the jobs the filter names; cron schedules submit one job
//! per fire time, hold while paused and say which fire made each job.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use stevedore::fleet::{self, Roles};
use stevedore::store::ListFilter;
use support::{eventually, fast_dispatcher, fast_timing, kinds_for, Flavor, TestFleet};
use uuid::Uuid;

async fn set_paused(f: &TestFleet, pool: &str, paused: bool) -> Value {
    let action = if paused { "pause" } else { "resume" };
    let (status, v) = f
        .post(&format!("/v1/pools/{pool}/{action}"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{action} {pool}: {v}");
    assert_eq!(v["paused"], paused, "{v}");
    v
}

async fn pool(f: &TestFleet, name: &str) -> Value {
    let (status, v) = f.get("/v1/pools").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["pools"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no pool {name} in {v}"))
}

async fn submit(f: &TestFleet, n: usize, priority: i32) -> Vec<Uuid> {
    support::submit_probes_at(f, n, priority).await
}

/// Restarts the API, dispatcher, notifier and workers on the same
/// database: whatever a process held in memory is gone.
async fn restart_roles(f: &mut TestFleet) {
    if let Some(r) = f.running.take() {
        r.shutdown().await;
    }
    let roles = Roles::new(fast_timing())
        .with_api(fleet::ApiRole::open("127.0.0.1:0".parse().expect("addr")))
        .with_dispatcher(fast_dispatcher())
        .with_workers(vec![("probe".into(), 4)]);
    let kinds = kinds_for(f.flavor, &f.backend, &f.redis_prefix).await;
    let running = fleet::start(f.backend.clone(), kinds, roles)
        .await
        .expect("fleet starts again");
    f.url = format!("http://{}", running.addr.expect("api address"));
    f.running = Some(running);
}

async fn started_at(f: &TestFleet) -> HashMap<Uuid, DateTime<Utc>> {
    let jobs = f
        .store()
        .list_jobs(&ListFilter {
            limit: 10_000,
            ..ListFilter::default()
        })
        .await
        .expect("list jobs");
    jobs.into_iter()
        .filter_map(|j| Some((j.id, j.started_at?)))
        .collect()
}

async fn a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first(flavor: Flavor) {
    let mut f = TestFleet::start_with(
        flavor,
        support::Opts {
            workers: vec![("probe".into(), 4)],
            ..support::Opts::default()
        },
    )
    .await;

    // A pool nobody can submit to cannot be paused, and bad names say so.
    let (status, v) = f.post("/v1/pools/nosuchpool/pause", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    set_paused(&f, "probe", true).await;
    let low = submit(&f, 500, 0).await;
    // The pause and the jobs it holds are in the database: they outlast a
    // restart of every role.
    restart_roles(&mut f).await;
    eventually(10, "the restarted worker to report in", || async {
        let p = pool(&f, "probe").await;
        p["paused"] == true && p["workers"].as_i64() >= Some(1) && p["concurrency"] == 4
    })
    .await;
    let high = submit(&f, 20, 10).await;
    // Submits are accepted and wait: nothing starts while paused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = pool(&f, "probe").await;
    assert_eq!(p["queued"], 520, "{p}");
    assert_eq!(p["running"], 0, "{p}");
    assert!(
        started_at(&f).await.is_empty(),
        "a job started in a paused pool"
    );

    let (status, job) = f.get(&format!("/v1/jobs/{}", high[0])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["priority"], 10, "{job}");

    set_paused(&f, "probe", false).await;
    eventually(60, "all 520 jobs to finish after the resume", || async {
        let p = pool(&f, "probe").await;
        p["queued"] == 0 && p["running"] == 0 && p["retrying"] == 0
    })
    .await;
    // The broker hands the 20 out first. A worker claims each batch it
    // receives in a task of its own, so two batches in flight at once may
    // commit in either order: at the boundary, up to one worker's
    // concurrency (4) of the 500 may start beside the last of the 20.
    let started = started_at(&f).await;
    let mut order: Vec<(DateTime<Utc>, bool)> = low
        .iter()
        .map(|id| (started.get(id).copied().expect("job started"), false))
        .chain(
            high.iter()
                .map(|id| (started.get(id).copied().expect("job started"), true)),
        )
        .collect();
    order.sort();
    let firsts: Vec<bool> = order.iter().map(|(_, h)| *h).collect();
    assert!(
        firsts[..16].iter().all(|h| *h),
        "the first 16 to start are all priority 10: {:?}",
        &firsts[..30]
    );
    assert!(
        firsts[24..].iter().all(|h| !*h),
        "every priority-10 job is among the first 24 to start: {:?}",
        &firsts[..30]
    );
    f.shutdown().await;
}

async fn priority_outside_the_range_is_refused(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    for bad in [json!(101), json!(-101), json!("high"), json!(1.5)] {
        let (status, v) = f
            .post(
                "/v1/jobs",
                json!({"kind": "probe", "payload": {}, "priority": bad}),
            )
            .await;
        assert!(status.is_client_error(), "priority {bad}: {status} {v}");
        let text = v.to_string();
        assert!(text.contains("priority"), "the error names the field: {v}");
    }
    f.shutdown().await;
}

async fn bulk_actions_take_exactly_the_jobs_their_filter_names(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let fast = json!({"backoff": {"base_ms": 10, "max_ms": 10}});
    // Three die on attempt 1 ("... fails while attempt <= 1"), two on
    // attempt 2 ("... <= 2"); a replay of those two succeeds on attempt 3.
    let mut once = Vec::new();
    for _ in 0..3 {
        let extra = json!({"max_attempts": 1, "backoff": fast["backoff"]});
        once.push(f.probe(json!({"fail_attempts": 1}), extra).await);
    }
    let mut twice = Vec::new();
    for _ in 0..2 {
        let extra = json!({"max_attempts": 2, "backoff": fast["backoff"]});
        twice.push(f.probe(json!({"fail_attempts": 2}), extra).await);
    }
    for id in once.iter().chain(&twice) {
        f.wait_status(*id, "dead", 30).await;
    }

    // A filter that names a field the API does not know is refused whole.
    let (status, v) = f
        .post("/v1/dead-letters/replay", json!({"error": "x"}))
        .await;
    assert!(status.is_client_error(), "{status} {v}");
    assert!(v.to_string().contains("error"), "{v}");

    let (status, v) = f
        .post(
            "/v1/dead-letters/replay",
            json!({"kind": "probe", "error_contains": "ATTEMPT <= 2"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 2, "exactly the matching dead letters: {v}");
    for id in &twice {
        f.wait_status(*id, "succeeded", 30).await;
    }
    for id in &once {
        assert_eq!(
            f.job(*id).await["status"],
            "dead",
            "not matched, not replayed"
        );
    }

    // Purge by time: nothing died in the future; everything before now.
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (_, v) = f
        .post("/v1/dead-letters/purge", json!({"since": later}))
        .await;
    assert_eq!(v["count"], 0, "{v}");
    let (status, v) = f
        .post("/v1/dead-letters/purge", json!({"until": later}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 3, "{v}");
    let (_, dead) = f.get("/v1/dead-letters").await;
    assert_eq!(dead["jobs"], json!([]), "{dead}");

    // Cancel by status: with the pool paused, five wait and one runs.
    set_paused(&f, "probe", false).await;
    let running = f.probe(json!({"sleep_ms": 30_000}), json!({})).await;
    f.wait_status(running, "running", 20).await;
    set_paused(&f, "probe", true).await;
    let waiting: Vec<Uuid> = submit(&f, 5, 0).await;
    let (status, v) = f
        .post(
            "/v1/jobs/cancel",
            json!({"kind": "probe", "status": "queued"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["cancelled"].as_u64(), v["cancel_requested"].as_u64()),
        (Some(5), Some(0)),
        "{v}"
    );
    for id in &waiting {
        assert_eq!(f.job(*id).await["status"], "cancelled");
    }
    let (_, v) = f.post("/v1/jobs/cancel", json!({"kind": "probe"})).await;
    assert_eq!(
        v["cancel_requested"], 1,
        "the running one is told to stop: {v}"
    );
    f.wait_status(running, "cancelled", 20).await;
    let (status, v) = f.post("/v1/jobs/cancel", json!({"status": "dead"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    f.shutdown().await;
}

async fn the_dispatcher_prunes_what_is_past_its_retention(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let done = f.probe(json!({}), json!({})).await;
    let dead = f
        .probe(json!({"fail_attempts": 1}), json!({"max_attempts": 1}))
        .await;
    f.wait_status(done, "succeeded", 20).await;
    f.wait_status(dead, "dead", 20).await;
    let keep_all = stevedore::dispatcher::Dispatcher::new(
        f.store().clone(),
        f.backend.brokers.clone(),
        fast_dispatcher(),
    );
    assert_eq!(
        keep_all.prune_once().await.expect("prune"),
        0,
        "7 and 30 days"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let short = stevedore::dispatcher::Dispatcher::new(
        f.store().clone(),
        f.backend.brokers.clone(),
        stevedore::dispatcher::DispatcherConfig {
            retain_succeeded: Duration::from_secs(1),
            ..fast_dispatcher()
        },
    );
    assert_eq!(
        short.prune_once().await.expect("prune"),
        1,
        "the succeeded one"
    );
    let (status, _) = f.get(&format!("/v1/jobs/{done}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        f.job(dead).await["status"],
        "dead",
        "dead ones are kept 30 days"
    );
    f.shutdown().await;
}

/// Jobs the schedule `name` made so far, by the API's job list.
async fn scheduled_jobs(f: &TestFleet, name: &str) -> Vec<Value> {
    let (status, v) = f.get("/v1/jobs?kind=probe&limit=500").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["schedule"] == name)
        .cloned()
        .collect()
}

async fn a_schedule_submits_jobs_on_its_timetable(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let job = json!({"kind": "probe", "payload": {}, "priority": 5});
    for (body, field) in [
        (json!({"name": "tick", "cron": "* * *", "job": job}), "cron"),
        (
            json!({"name": "tick", "cron": "* * * * *", "timezone": "Mars/Base", "job": job}),
            "timezone",
        ),
        (
            json!({"name": "a/b", "cron": "* * * * *", "job": job}),
            "name",
        ),
        (
            json!({"name": "tick", "cron": "* * * * *", "jitter_secs": 100000, "job": job}),
            "jitter_secs",
        ),
        (
            json!({"name": "tick", "cron": "* * * * *", "job": {"kind": "nope", "payload": {}}}),
            "job.kind",
        ),
        (
            json!({"name": "tick", "cron": "* * * * *",
                   "job": {"kind": "probe", "payload": {}, "run_at": "2030-01-01T00:00:00Z"}}),
            "job.run_at",
        ),
    ] {
        let (status, v) = f.post("/v1/schedules", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }

    let body =
        json!({"name": "tick", "cron": "* * * * * *", "timezone": "Europe/Berlin", "job": job});
    let (status, v) = f.post("/v1/schedules", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!(v["next_fire_at"].is_string(), "{v}");
    let (status, _) = f.post("/v1/schedules", body).await;
    assert_eq!(status, StatusCode::OK, "the same name replaces it");

    // It fires every second; its jobs run and say where they came from.
    eventually(10, "the schedule makes a job", || async {
        !scheduled_jobs(&f, "tick").await.is_empty()
    })
    .await;
    let first = scheduled_jobs(&f, "tick")
        .await
        .pop()
        .expect("a scheduled job");
    let id: Uuid = first["id"].as_str().expect("id").parse().expect("uuid");
    let done = f.wait_status(id, "succeeded", 10).await;
    assert_eq!(done["priority"], 5, "{done}");
    let fired: DateTime<Utc> = done["scheduled_for"]
        .as_str()
        .expect("fire time")
        .parse()
        .expect("time");
    assert_eq!(
        fired.timestamp_subsec_nanos(),
        0,
        "fire times are whole seconds: {fired}"
    );

    let (_, paused) = f.post("/v1/schedules/tick/pause", json!({})).await;
    assert_eq!(
        (&paused["paused"], &paused["next_fire_at"]),
        (&json!(true), &Value::Null),
        "{paused}"
    );
    let made = scheduled_jobs(&f, "tick").await;
    let times: std::collections::HashSet<&str> = made
        .iter()
        .filter_map(|j| j["scheduled_for"].as_str())
        .collect();
    assert_eq!(times.len(), made.len(), "one job per fire time: {made:?}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        scheduled_jobs(&f, "tick").await.len(),
        made.len(),
        "nothing fires while paused"
    );

    let (status, resumed) = f.post("/v1/schedules/tick/resume", json!({})).await;
    assert_eq!(
        (status, &resumed["paused"]),
        (StatusCode::OK, &json!(false)),
        "{resumed}"
    );
    eventually(10, "it fires again after resume", || async {
        scheduled_jobs(&f, "tick").await.len() > made.len()
    })
    .await;
    let (_, list) = f.get("/v1/schedules").await;
    assert_eq!(list["schedules"][0]["name"], "tick", "{list}");
    assert_eq!(list["schedules"][0]["timezone"], "Europe/Berlin", "{list}");

    assert_eq!(f.delete("/v1/schedules/tick").await, StatusCode::NO_CONTENT);
    assert_eq!(f.get("/v1/schedules/tick").await.0, StatusCode::NOT_FOUND);
    assert_eq!(f.delete("/v1/schedules/tick").await, StatusCode::NOT_FOUND);
    assert_eq!(f.job(id).await["schedule"], "tick", "its jobs stay");
    f.shutdown().await;
}

/// The most jobs of one key that were running at any instant, from their
/// start and finish times (a finish at the same instant as a start counts
/// first).
fn most_at_once(jobs: &[Value]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for j in jobs {
        let at = |k: &str| -> DateTime<Utc> { j[k].as_str().expect(k).parse().expect("time") };
        edges.push((at("started_at"), 1));
        edges.push((at("finished_at"), -1));
    }
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

async fn a_concurrency_key_caps_its_jobs_across_workers_while_others_flow(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let _w2 = f.start_workers("probe", 8).await;
    let _w3 = f.start_workers("probe", 8).await;
    let r = f
        .http
        .put(format!("{}/v1/concurrency-limits/tenant:", f.url))
        .json(&json!({"max_running": 2}))
        .send()
        .await
        .expect("limit");
    assert_eq!(r.status(), StatusCode::OK);
    let keyed =
        |key: &str| json!({"kind": "probe", "payload": {"sleep_ms": 200}, "concurrency_key": key});
    let busy: Vec<Value> = (0..10).map(|_| keyed("tenant:busy")).collect();
    let calm: Vec<Value> = (0..4).map(|_| keyed("tenant:calm")).collect();
    let mut ids = Vec::new();
    for batch in [busy, calm] {
        let (status, v) = f.post("/v1/jobs/batch", json!({"jobs": batch})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        ids.push(
            v["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .map(|j| j["id"].as_str().expect("id").parse::<Uuid>().expect("uuid"))
                .collect::<Vec<_>>(),
        );
    }
    let mut done: Vec<Vec<Value>> = Vec::new();
    for group in &ids {
        let mut jobs = Vec::new();
        for id in group {
            jobs.push(f.wait_status(*id, "succeeded", 30).await);
        }
        done.push(jobs);
    }
    let (busy, calm) = (&done[0], &done[1]);
    assert_eq!(
        most_at_once(busy),
        2,
        "tenant:busy ran at most 2 at once, and did run 2"
    );
    assert!(most_at_once(calm) <= 2);
    let last = |jobs: &[Value], k: &str| -> DateTime<Utc> {
        jobs.iter()
            .map(|j| {
                j[k].as_str()
                    .expect(k)
                    .parse::<DateTime<Utc>>()
                    .expect("time")
            })
            .max()
            .expect("jobs")
    };
    assert!(
        last(calm, "finished_at") < last(busy, "started_at"),
        "tenant:calm did not wait behind tenant:busy's backlog"
    );
    let (_, limits) = f.get("/v1/concurrency-limits").await;
    let tenant = limits["limits"]
        .as_array()
        .expect("limits")
        .iter()
        .find(|l| l["prefix"] == "tenant:")
        .cloned()
        .expect("the limit is listed");
    assert_eq!(
        (&tenant["running"], &tenant["held"]),
        (&json!(0), &json!(0)),
        "{limits}"
    );
    let (status, v) = f
        .post(
            "/v1/jobs",
            json!({"kind": "probe", "payload": {}, "concurrency_key": ""}),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("concurrency_key")),
        "{v}"
    );
    f.shutdown().await;
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrency_key_caps_its_jobs_across_workers_while_others_flow() {
        super::a_concurrency_key_caps_its_jobs_across_workers_while_others_flow(Flavor::Postgres)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schedule_submits_jobs_on_its_timetable() {
        super::a_schedule_submits_jobs_on_its_timetable(Flavor::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dispatcher_prunes_what_is_past_its_retention() {
        super::the_dispatcher_prunes_what_is_past_its_retention(Flavor::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_actions_take_exactly_the_jobs_their_filter_names() {
        super::bulk_actions_take_exactly_the_jobs_their_filter_names(Flavor::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first() {
        super::a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first(Flavor::Postgres)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn priority_outside_the_range_is_refused() {
        super::priority_outside_the_range_is_refused(Flavor::Postgres).await
    }
}

mod amqp {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first() {
        super::a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first(Flavor::Amqp).await
    }
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrency_key_caps_its_jobs_across_workers_while_others_flow() {
        super::a_concurrency_key_caps_its_jobs_across_workers_while_others_flow(Flavor::Sqlite)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schedule_submits_jobs_on_its_timetable() {
        super::a_schedule_submits_jobs_on_its_timetable(Flavor::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dispatcher_prunes_what_is_past_its_retention() {
        super::the_dispatcher_prunes_what_is_past_its_retention(Flavor::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_actions_take_exactly_the_jobs_their_filter_names() {
        super::bulk_actions_take_exactly_the_jobs_their_filter_names(Flavor::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first() {
        super::a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first(Flavor::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn priority_outside_the_range_is_refused() {
        super::priority_outside_the_range_is_refused(Flavor::Sqlite).await
    }
}
