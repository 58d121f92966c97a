//! Flow control as an operator uses it, on each store and broker: pausing a
//! pool holds its jobs (across restarts of every role) while submits go
//! on, and on resume the most urgent start first.

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
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let jobs: Vec<Value> = chunk
            .iter()
            .map(|_| json!({"kind": "probe", "payload": {}, "priority": priority}))
            .collect();
        let (status, v) = f.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        for j in v["jobs"].as_array().expect("jobs") {
            ids.push(j["id"].as_str().expect("id").parse().expect("uuid"));
        }
    }
    ids
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
    let started = started_at(&f).await;
    let last_high = high
        .iter()
        .map(|id| started.get(id).copied().expect("high-priority job started"))
        .max()
        .expect("20 jobs");
    let first_low = low
        .iter()
        .map(|id| started.get(id).copied().expect("job started"))
        .min()
        .expect("500 jobs");
    assert!(
        last_high <= first_low,
        "a priority-0 job started at {first_low}, before the last priority-10 one at {last_high}"
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

mod postgres {
    use super::*;

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
    async fn a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first() {
        super::a_paused_pool_holds_its_jobs_and_resumes_the_most_urgent_first(Flavor::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn priority_outside_the_range_is_refused() {
        super::priority_outside_the_range_is_refused(Flavor::Sqlite).await
    }
}
