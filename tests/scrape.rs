//! The scrape kind through the whole pipeline (API → broker → worker →
//! store) against a fixture server on loopback: a quiz page scraped with an
//! analyze job chained in the same transaction, a script-built page that
//! plain HTTP cannot read and headless Chromium can, a JSON-LD page with
//! its stated answers, and a refused target that is never reached in
//! either mode.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use serde_json::json;
use stevedore::config::KindsArgs;
use stevedore::fleet;
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
