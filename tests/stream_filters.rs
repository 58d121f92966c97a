//! The event stream's filters and terminal events on both stores: `kind`
//! and `types` narrow a live SSE stream to exactly the matching events,
//! `job` follows a job and its chained child, and `job.dead` and
//! `job.cancelled` carry what a client needs (the last error; no result).

mod support;

use std::collections::HashSet;

use axum::routing::get;
use chrono::Utc;
use serde_json::json;
use stevedore::config::KindsArgs;
use stevedore::fleet;
use support::{Flavor, Opts, Sse, SseClient, TestFleet};
use uuid::Uuid;

async fn quiz_server() -> u16 {
    let app = axum::Router::new().route(
        "/jsonld",
        get(|| async { axum::response::Html(include_str!("../fixtures/quiz/jsonld-quiz.html")) }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

fn job_of(e: &Sse) -> Uuid {
    e.data["job_id"]
        .as_str()
        .expect("job_id")
        .parse()
        .expect("uuid")
}

async fn filters_narrow_the_stream_to_what_was_asked(flavor: Flavor) {
    let port = quiz_server().await;
    let args = KindsArgs {
        scrape_allow_hosts: format!("127.0.0.1:{port}"),
        ..KindsArgs::default()
    };
    fleet::kinds(&args, fleet::Shared::InProcess).expect("kinds");
    // No analyze pool: the chained child stays queued, which is enough to
    // see it in its parent's stream.
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![("probe".into(), 4), ("scrape".into(), 2)],
            ..Opts::default()
        },
    )
    .await;
    let mut ended = SseClient::connect(
        &format!(
            "{}/v1/events?kind=probe&types=job.dead,job.cancelled",
            f.url
        ),
        None,
    )
    .await;
    // The scrape waits 1.5 s, long enough to subscribe to it by id.
    let at = (Utc::now() + chrono::Duration::milliseconds(1500)).to_rfc3339();
    let payload =
        json!({"url": format!("http://127.0.0.1:{port}/jsonld"), "then": {"kind": "analyze"}});
    let (s, v) = f
        .post(
            "/v1/jobs",
            json!({"kind": "scrape", "payload": payload, "run_at": at}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    let scrape: Uuid = v["id"].as_str().expect("id").parse().expect("uuid");
    let mut family = SseClient::connect(&format!("{}/v1/events?job={scrape}", f.url), None).await;

    let ok = f
        .probe(
            json!({"fail_attempts": 1}),
            json!({"backoff": {"base_ms": 100, "max_ms": 100}}),
        )
        .await;
    let dead = f
        .probe(
            json!({"fail_attempts": 1, "failure": "permanent"}),
            json!({}),
        )
        .await;
    let later = (Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    let cancelled = f.probe(json!({}), json!({"run_at": later})).await;
    f.wait_status(ok, "succeeded", 20).await;
    f.wait_status(dead, "dead", 20).await;
    let (s, _) = f
        .post(&format!("/v1/jobs/{cancelled}/cancel"), json!({}))
        .await;
    assert_eq!(s, reqwest::StatusCode::OK);

    let got = ended.read_until(|e| job_of(e) == cancelled).await;
    let seen: Vec<(String, Uuid)> = got.iter().map(|e| (e.event.clone(), job_of(e))).collect();
    assert_eq!(
        seen,
        [
            ("job.dead".to_owned(), dead),
            ("job.cancelled".to_owned(), cancelled)
        ],
        "only the probe's dead and cancelled events"
    );
    let d = &got[0].data;
    assert_eq!(d["type"], "job.dead");
    assert_eq!(d["kind"], "probe");
    assert!(
        d["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "job.dead carries the last error: {d}"
    );
    assert!(got[1].data["result"].is_null(), "{}", got[1].data);

    let scraped = f.wait_status(scrape, "succeeded", 30).await;
    let child: Uuid = scraped["children"][0]["id"]
        .as_str()
        .expect("a chained child")
        .parse()
        .expect("uuid");
    let got = family.read_until(|e| job_of(e) == child).await;
    let jobs: HashSet<Uuid> = got.iter().map(job_of).collect();
    assert_eq!(
        jobs,
        HashSet::from([scrape, child]),
        "the job and its child only"
    );
    let types: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert!(types.contains(&"job.succeeded"), "{types:?}");
    let last = got.last().expect("the child's event");
    assert_eq!(last.event, "job.queued");
    assert_eq!(last.data["parent_id"], scrape.to_string());
    assert_eq!(last.data["kind"], "analyze");
    let done = got
        .iter()
        .find(|e| e.event == "job.succeeded")
        .expect("success");
    assert!(
        done.data["result"]["questions"]
            .as_array()
            .is_some_and(|q| !q.is_empty()),
        "the terminal event carries the result: {}",
        done.data
    );

    // The same filters on a replay from the start give the same answer.
    let mut replay = SseClient::connect(
        &format!(
            "{}/v1/events?kind=probe&types=job.dead,job.cancelled",
            f.url
        ),
        Some(0),
    )
    .await;
    let again = replay.read_until(|e| job_of(e) == cancelled).await;
    assert_eq!(again.len(), 2, "{again:?}");
    f.shutdown().await;
}

async fn bad_filters_are_a_4xx_naming_the_parameter(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![],
            ..Opts::default()
        },
    )
    .await;
    for (query, field) in [
        ("job=nope", "job"),
        ("since=x", "since"),
        ("recent=5000", "recent"),
        ("colour=red", "colour"),
    ] {
        let (s, v) = f.get(&format!("/v1/events?{query}")).await;
        assert_eq!(s, reqwest::StatusCode::BAD_REQUEST, "{query}: {v}");
        assert_eq!(v["error"]["field"], field, "{query}: {v}");
    }
    f.shutdown().await;
}

both_flavors!(
    filters_narrow_the_stream_to_what_was_asked,
    bad_filters_are_a_4xx_naming_the_parameter,
);
