//! The scrape kind through the whole pipeline (API → broker → worker →
//! store) against a fixture server on loopback: a quiz page scraped with an
//! analyze job chained in the same transaction, a script-built page that
//! plain HTTP cannot read and headless Chromium can, a JSON-LD page with
//! its stated answers, and a refused target that is never reached in
//! either mode. `stevedore dev` configured the old way: the deprecated
//! `STEVEDORE_ALLOW_HOSTS` still counts for scraping and webhooks (and says
//! so), and the API's own address is never scraped, listed or not.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use stevedore::config::KindsArgs;
use stevedore::fleet;
use support::procs::{free_port, wait_port, Proc};
use support::{Flavor, Opts, TestFleet};
use uuid::Uuid;

async fn serve_fixtures() -> u16 {
    let app = axum::Router::new()
        .route(
            "/moodle",
            get(|| async {
                axum::response::Html(include_str!("../fixtures/quiz/moodle-multichoice.html"))
            }),
        )
        .route(
            "/jsonld",
            get(|| async {
                axum::response::Html(include_str!("../fixtures/quiz/jsonld-quiz.html"))
            }),
        )
        .route(
            "/spa",
            get(|| async {
                axum::response::Html(include_str!("../fixtures/quiz/spa-rendered.html"))
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

async fn canary() -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok(_conn) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, hits)
}

async fn submit(f: &TestFleet, payload: serde_json::Value) -> Uuid {
    let (status, v) = f
        .post("/v1/jobs", json!({"kind": "scrape", "payload": payload}))
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{v}");
    v["id"].as_str().expect("id").parse().expect("uuid")
}

async fn quiz_pages_are_scraped_chained_and_refused_targets_never_reached(flavor: Flavor) {
    let port = serve_fixtures().await;
    let (cport, hits) = canary().await;
    // Kinds are built once per process: configure them before the fleet
    // asks, so the fixture server (and only it) is allowlisted.
    let args = KindsArgs {
        scrape_allow_hosts: format!("127.0.0.1:{port}"),
        ..KindsArgs::default()
    };
    fleet::kinds(&args, fleet::Shared::InProcess).expect("kinds");
    let workers = vec![("scrape".into(), 4), ("analyze".into(), 1)];
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers,
            ..Opts::default()
        },
    )
    .await;

    let parent = submit(
        &f,
        json!({"url": format!("http://127.0.0.1:{port}/moodle"), "then": {"kind": "analyze"}}),
    )
    .await;
    let job = f.wait_status(parent, "succeeded", 60).await;
    let questions = job["result"]["questions"].as_array().expect("questions");
    assert_eq!(questions.len(), 5);
    assert_eq!(questions[1]["options"], json!(["2", "4", "8", "256"]));
    assert_eq!(job["result"]["rendered_with"], "http");
    let child = job["children"][0]["id"]
        .as_str()
        .expect("a chained child")
        .parse()
        .expect("uuid");
    assert_eq!(job["children"][0]["kind"], "analyze");
    let analyzed = f.wait_status(child, "succeeded", 120).await;
    assert_eq!(analyzed["parent_id"], parent.to_string());
    assert_eq!(
        analyzed["result"]["answers"].as_array().map(Vec::len),
        Some(5)
    );
    assert_eq!(
        f.job(parent).await["children"][0]["status"],
        "succeeded",
        "the parent shows its child's status"
    );

    let spa = submit(
        &f,
        json!({"url": format!("http://127.0.0.1:{port}/spa"), "render": "http"}),
    )
    .await;
    let dead = f.wait_status(spa, "dead", 30).await;
    assert_eq!(dead["attempt"], 1, "no questions is permanent, not retried");
    assert!(dead["errors"][0]["message"]
        .as_str()
        .expect("message")
        .contains("no questions"));

    // The same page in headless Chromium, asked for or fallen back to.
    for render in ["browser", "auto"] {
        let spa = submit(
            &f,
            json!({"url": format!("http://127.0.0.1:{port}/spa"), "render": render}),
        )
        .await;
        let done = f.wait_status(spa, "succeeded", 60).await;
        assert_eq!(done["result"]["rendered_with"], "browser", "{render}");
        assert_eq!(
            done["result"]["questions"].as_array().map(Vec::len),
            Some(3)
        );
    }
    let jsonld = submit(
        &f,
        json!({"url": format!("http://127.0.0.1:{port}/jsonld")}),
    )
    .await;
    let done = f.wait_status(jsonld, "succeeded", 30).await;
    assert_eq!(done["result"]["rendered_with"], "http");
    let expected: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/quiz/expected.json")).expect("json");
    assert_eq!(
        done["result"]["questions"], expected["jsonld-quiz.html"]["questions"],
        "the page states its answers, so `correct` is there"
    );

    for render in ["http", "browser", "auto"] {
        let refused = submit(
            &f,
            json!({"url": format!("http://127.0.0.1:{cport}/"), "render": render}),
        )
        .await;
        let dead = f.wait_status(refused, "dead", 30).await;
        assert!(dead["errors"][0]["message"]
            .as_str()
            .expect("message")
            .contains("refused"));
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the canary was never reached"
    );
    f.shutdown().await;
}

both_flavors!(quiz_pages_are_scraped_chained_and_refused_targets_never_reached);

/// Polls a job of a `stevedore dev` process until it is finished.
async fn finished(http: &reqwest::Client, api: &str, id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let job: serde_json::Value = match http.get(format!("{api}/v1/jobs/{id}")).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if matches!(job["status"].as_str(), Some("succeeded" | "dead")) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not finish: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_allowlist_counts_for_both_with_a_warning_and_never_admits_the_api() {
    let fixtures = serve_fixtures().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let env = [(
        "STEVEDORE_ALLOW_HOSTS",
        format!("127.0.0.1:{fixtures},{listen}"),
    )];
    let args = [
        "dev",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ];
    let dev = Proc::stevedore(&args, &env, dir.path(), "dev");
    wait_port(port, 60).await;
    let api = format!("http://{listen}");
    let http = reqwest::Client::new();

    // Webhooks: a loopback receiver is accepted only because it is listed.
    let r = http
        .post(format!("{api}/v1/webhooks"))
        .json(&json!({"url": format!("http://127.0.0.1:{fixtures}/hook"), "events": ["job.cancelled"]}))
        .send()
        .await
        .expect("register a webhook");
    assert_eq!(r.status(), reqwest::StatusCode::CREATED, "{}", dev.log());

    let mut ids = vec![];
    for url in [
        format!("http://127.0.0.1:{fixtures}/moodle"),
        format!("{api}/v1/jobs"),
    ] {
        let r = http
            .post(format!("{api}/v1/jobs"))
            .json(&json!({"kind": "scrape", "payload": {"url": url, "render": "http"}}))
            .send()
            .await
            .expect("submit");
        let v: serde_json::Value = r.json().await.expect("json");
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    let scraped = finished(&http, &api, &ids[0]).await;
    assert_eq!(scraped["status"], "succeeded", "{scraped}");
    let refused = finished(&http, &api, &ids[1]).await;
    assert_eq!(refused["status"], "dead", "{refused}");
    let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("own listener"),
        "the API's address is refused although listed: {refused}"
    );
    let log = dev.log();
    assert!(
        log.contains("STEVEDORE_ALLOW_HOSTS is deprecated"),
        "the old setting is warned about: {log}"
    );
}

/// A site that answers 429 with `Retry-After: 5` gets no request from any
/// worker for those 5 s: its jobs share the key `host:127.0.0.1`, limited to
/// one at a time here, and the 429 cools the key down for the whole fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_answers_429_is_left_alone_for_its_retry_after() {
    let seen: Arc<std::sync::Mutex<Vec<std::time::Instant>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/busy",
        get(move || {
            let s = s.clone();
            async move {
                let mut seen = s.lock().expect("lock");
                seen.push(std::time::Instant::now());
                if seen.len() == 1 {
                    axum::response::Response::builder()
                        .status(429)
                        .header("retry-after", "5")
                        .body(axum::body::Body::from("slow down"))
                        .expect("response")
                } else {
                    axum::response::Html(include_str!("../fixtures/quiz/moodle-multichoice.html"))
                        .into_response()
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(l, app).await });
    let args = KindsArgs {
        scrape_allow_hosts: format!("127.0.0.1:{port}"),
        ..KindsArgs::default()
    };
    fleet::kinds(&args, fleet::Shared::InProcess).expect("kinds");
    let f = TestFleet::start_with(
        Flavor::Sqlite,
        Opts {
            workers: vec![("scrape".into(), 4)],
            ..Opts::default()
        },
    )
    .await;
    let _second = f.start_workers("scrape", 4).await;
    let r = f
        .http
        .put(format!("{}/v1/concurrency-limits/host:", f.url))
        .json(&json!({"max_running": 1}))
        .send()
        .await
        .expect("limit");
    assert_eq!(r.status(), reqwest::StatusCode::OK);

    let url = format!("http://127.0.0.1:{port}/busy");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&f, json!({"url": url, "render": "http"})).await);
    }
    for id in &ids {
        let job = f.wait_status(*id, "succeeded", 30).await;
        assert_eq!(job["concurrency_key"], "host:127.0.0.1", "{job}");
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 4, "one 429, its retry and two more pages");
    for later in &seen[1..] {
        let waited = later.duration_since(seen[0]);
        assert!(
            waited >= std::time::Duration::from_millis(4_950),
            "a request came {waited:?} after the 429 asked for 5 s"
        );
    }
    f.shutdown().await;
}
