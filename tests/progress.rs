//! Progress through the whole pipeline on both stores: a probe job that
//! reports steps shows the latest on `GET /v1/jobs/{id}` while it runs and
//! after, the stream carries its `job.progress` events in order, a webhook
//! subscribed to `job.progress` receives them and one that is not gets none;
//! a scrape job over a loopback fixture reports its stages, and the analyze
//! job it chains reports each answered question as a partial result (an
//! OpenAI-shaped double answers).

mod support;

#[allow(dead_code)]
#[path = "../workers/analyze/tests/support/fake_openai.rs"]
mod fake_openai;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use fake_openai::{FakeOpenAi, Reply};
use serde_json::{json, Value};
use stevedore::config::KindsArgs;
use stevedore::fleet;
use support::{eventually, fast_notify, Flavor, Opts, Sse, SseClient, TestFleet};
use uuid::Uuid;

/// Webhook bodies by receiving path, in arrival order.
type Received = Arc<Mutex<HashMap<String, Vec<Value>>>>;

async fn receiver() -> (std::net::SocketAddr, Received) {
    let got = Received::default();
    let app = axum::Router::new()
        .route(
            "/{path}",
            post(
                |State(got): State<Received>, Path(path): Path<String>, body: String| async move {
                    let v: Value = serde_json::from_str(&body).expect("JSON body");
                    got.lock().expect("lock").entry(path).or_default().push(v);
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(got.clone());
    (support::serve(app).await, got)
}

fn of_job(events: &[Sse], id: Uuid, kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.data["job_id"] == id.to_string() && e.data["type"] == kind)
        .map(|e| e.data.clone())
        .collect()
}

fn fractions(events: &[Value]) -> Vec<f64> {
    events
        .iter()
        .map(|e| e["progress"]["fraction"].as_f64().expect("fraction"))
        .collect()
}

async fn a_job_reports_progress_to_get_the_stream_and_webhooks_that_ask(flavor: Flavor) {
    let (addr, received) = receiver().await;
    let f = TestFleet::start_with(
        flavor,
        Opts {
            notify: fast_notify(&addr.to_string()),
            ..Opts::default()
        },
    )
    .await;
    let mut hooks = HashMap::new();
    for (path, events) in [("progress", json!(["job.progress"])), ("ends", Value::Null)] {
        let mut body = json!({"url": format!("http://{addr}/{path}")});
        if !events.is_null() {
            body["events"] = events;
        }
        let (s, v) = f.post("/v1/webhooks", body).await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
        hooks.insert(path, v["id"].as_str().expect("id").to_owned());
    }
    let mut stream = SseClient::connect(
        &format!("{}/v1/events?types=job.progress,job.succeeded", f.url),
        None,
    )
    .await;

    // Four steps 300 ms apart: more than the write interval, so each can
    // be written on its own.
    let id = f
        .probe(json!({"sleep_ms": 1200, "progress_steps": 4}), json!({}))
        .await;
    eventually(10, "GET shows how far the running job got", || async {
        let job = f.job(id).await;
        job["status"] == "running"
            && job["progress"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("step "))
    })
    .await;
    let job = f.wait_status(id, "succeeded", 20).await;
    assert_eq!(job["progress"]["fraction"], 1.0, "{job}");
    assert_eq!(job["progress"]["message"], "step 4 of 4", "{job}");
    assert_eq!(job["progress"]["attempt"], 1, "{job}");
    assert!(job["progress"]["at"].is_string(), "{job}");
    assert!(job["progress"].get("partial").is_none(), "{job}");

    let events = stream
        .read_until(|e| e.data["job_id"] == id.to_string() && e.data["type"] == "job.succeeded")
        .await;
    let progress = of_job(&events, id, "job.progress");
    assert!(progress.len() >= 2, "{progress:?}");
    let ids: Vec<i64> = progress
        .iter()
        .map(|e| e["id"].as_i64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let fr = fractions(&progress);
    assert!(fr.windows(2).all(|w| w[0] < w[1]), "in order: {fr:?}");
    let last = progress.last().expect("one at least");
    assert_eq!(last["progress"]["message"], "step 4 of 4");
    assert!(progress
        .iter()
        .all(|e| e["status"] == "running" && e["attempt"] == 1));

    // The subscribed webhook gets every report; the other one only the end.
    let want: BTreeSet<String> = progress
        .iter()
        .map(|e| e["progress"]["message"].to_string())
        .collect();
    let bodies = |path: &str| {
        received
            .lock()
            .expect("lock")
            .get(path)
            .cloned()
            .unwrap_or_default()
    };
    eventually(20, "webhooks delivered", || async {
        bodies("progress").len() >= want.len() && !bodies("ends").is_empty()
    })
    .await;
    let got: BTreeSet<String> = bodies("progress")
        .iter()
        .map(|b| {
            assert_eq!(b["type"], "job.progress", "{b}");
            b["data"]["progress"]["message"].to_string()
        })
        .collect();
    assert_eq!(got, want);
    let (_, ds) = f.get("/v1/webhook-deliveries?limit=100").await;
    let to_ends: Vec<&Value> = ds["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .filter(|d| d["webhook_id"] == hooks["ends"].as_str())
        .collect();
    assert_eq!(to_ends.len(), 1, "{ds}");
    assert_eq!(to_ends[0]["event_type"], "job.succeeded");

    // The document describes it.
    let (_, doc) = f.get("/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    assert!(
        schemas["Job"]["properties"]["progress"].is_object(),
        "{doc}"
    );
    assert!(schemas["JobProgress"]["properties"]["fraction"].is_object());
    f.shutdown().await;
}

/// The Moodle quiz (5 questions), after a pause long enough for the
/// scrape's first stage to be written on its own.
async fn slow_quiz_server() -> u16 {
    let app = axum::Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            axum::response::Html(include_str!("../fixtures/quiz/moodle-multichoice.html"))
        }),
    );
    support::serve(app).await.port()
}

async fn scrape_reports_its_stages_and_analyze_each_answer(flavor: Flavor) {
    let port = slow_quiz_server().await;
    let model = FakeOpenAi::start(vec![], Reply::Answer { choice: 1 }).await;
    // Kinds are built once per process: configured here, before the fleet.
    fleet::kinds(
        &KindsArgs {
            scrape_allow_hosts: format!("127.0.0.1:{port}"),
            openai_base_url: Some(model.base_url.clone()),
            openai_api_key: Some("sk-test".into()),
            ..KindsArgs::default()
        },
        fleet::Shared::InProcess,
    )
    .expect("kinds");
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![("scrape".into(), 1), ("analyze".into(), 1)],
            ..Opts::default()
        },
    )
    .await;
    let (status, v) = f
        .post(
            "/v1/jobs",
            json!({"kind": "scrape", "payload": {
                "url": format!("http://127.0.0.1:{port}/slow"), "render": "http",
                "then": {"kind": "analyze"}}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{v}");
    let parent: Uuid = v["id"].as_str().expect("id").parse().expect("uuid");
    let scraped = f.wait_status(parent, "succeeded", 30).await;
    assert_eq!(scraped["progress"]["message"], "found 5 questions");
    assert_eq!(scraped["progress"]["fraction"], 1.0);
    let child: Uuid = scraped["children"][0]["id"]
        .as_str()
        .expect("a chained child")
        .parse()
        .expect("uuid");
    let analyzed = f.wait_status(child, "succeeded", 30).await;
    let answers = analyzed["result"]["answers"].as_array().expect("answers");
    assert_eq!(answers.len(), 5);

    // From the first event on, the parent's and its child's reports.
    let mut stream = SseClient::connect(
        &format!("{}/v1/events?types=job.progress&job={parent}", f.url),
        Some(0),
    )
    .await;
    let mut events = Vec::new();
    while of_job(&events, child, "job.progress")
        .iter()
        .filter(|e| e["progress"].get("partial").is_some())
        .count()
        < 5
    {
        events.push(stream.next(30).await.expect("the child's partials arrive"));
    }
    let stages = of_job(&events, parent, "job.progress");
    let messages: Vec<&str> = stages
        .iter()
        .map(|e| e["progress"]["message"].as_str().expect("message"))
        .collect();
    assert_eq!(messages.first(), Some(&"loading over HTTP"), "{messages:?}");
    assert_eq!(messages.last(), Some(&"found 5 questions"), "{messages:?}");
    let fr = fractions(&stages);
    assert!(fr.windows(2).all(|w| w[0] < w[1]), "{fr:?}");

    let partials: Vec<Value> = of_job(&events, child, "job.progress")
        .into_iter()
        .filter(|e| e["progress"].get("partial").is_some())
        .collect();
    let mut asked = BTreeSet::new();
    for p in &partials {
        let answer = &p["progress"]["partial"]["answer"];
        let q = answer["question"].as_u64().expect("question") as usize;
        assert_eq!(answer, &answers[q], "a partial is the result's answer");
        asked.insert(q);
    }
    assert_eq!(asked, (0..5).collect(), "one partial per question");
    assert_eq!(fractions(&partials), [0.2, 0.4, 0.6, 0.8, 1.0]);
    assert_eq!(analyzed["progress"]["fraction"], 1.0, "{analyzed}");
    f.shutdown().await;
}

both_flavors!(
    a_job_reports_progress_to_get_the_stream_and_webhooks_that_ask,
    scrape_reports_its_stages_and_analyze_each_answer,
);

/// `stevedore submit … --wait`, typed as in the README, prints the reports
/// it sees under the states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_prints_the_progress_it_sees() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let out = support::procs::run_stevedore(
        &[
            "submit",
            "probe",
            "--payload",
            r#"{"sleep_ms": 2000, "progress_steps": 4}"#,
            "--wait",
        ],
        &[("STEVEDORE_URL", f.url.clone())],
    )
    .await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let steps: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("% step "))
        .collect();
    assert!(steps.len() >= 2, "{}", out.stderr);
    assert!(
        steps
            .last()
            .is_some_and(|l| l.ends_with("100% step 4 of 4")),
        "{}",
        out.stderr
    );
    f.shutdown().await;
}
