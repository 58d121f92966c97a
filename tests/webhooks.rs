//! Webhooks on Postgres against real receivers on 127.0.0.1 that verify
//! every signature with the independent `standardwebhooks` crate: retries
//! keep the `webhook-id`, 410 disables the endpoint, a hanging receiver is
//! timed out and retried, redirects are not followed, internal URLs are
//! refused, and a delivery that used up its schedule can be retried.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use support::{eventually, fast_notify, Flavor, Opts, TestFleet};

#[derive(Default)]
struct Receiver {
    /// Path → secret, to verify signatures.
    secrets: Mutex<HashMap<String, String>>,
    /// Path → webhook-ids of the requests it got, in order.
    hits: Mutex<HashMap<String, Vec<String>>>,
    down_is_up: Mutex<bool>,
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let secret = r
        .secrets
        .lock()
        .expect("lock")
        .get(&path)
        .cloned()
        .expect("known path");
    let verifier = standardwebhooks::Webhook::new(&secret).expect("secret");
    verifier
        .verify(&body, &headers)
        .expect("valid Standard Webhooks signature");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(v["type"], "job.succeeded");
    assert!(v["data"]["job_id"].is_string() && v["timestamp"].is_string());
    let id = headers["webhook-id"].to_str().expect("id").to_owned();
    let n = {
        let mut hits = r.hits.lock().expect("lock");
        let h = hits.entry(path.clone()).or_default();
        h.push(id);
        h.len()
    };
    match (path.as_str(), n) {
        ("flaky", 1 | 2) => StatusCode::INTERNAL_SERVER_ERROR,
        ("gone", _) => StatusCode::GONE,
        ("hang", 1) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK
        }
        ("redirect", _) => StatusCode::FOUND,
        ("down", _) if !*r.down_is_up.lock().expect("lock") => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_disabled_and_dead_lettered() {
    let receiver = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut notify = fast_notify(&addr.to_string());
    notify.webhook_timeout_secs = 1.0;
    let f = TestFleet::start_with(
        Flavor::Postgres,
        Opts {
            notify,
            ..Default::default()
        },
    )
    .await;

    for refused in [
        "http://127.0.0.1:1/",
        "http://2130706433:1/",
        "http://[::ffff:127.0.0.1]:1/",
    ] {
        let (s, v) = f.post("/v1/webhooks", json!({"url": refused})).await;
        assert_eq!(
            s,
            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            "{refused}: {v}"
        );
        assert_eq!(v["error"]["field"], "url");
    }
    let mut hooks = HashMap::new();
    for path in ["flaky", "gone", "hang", "redirect", "down"] {
        let (s, v) = f
            .post(
                "/v1/webhooks",
                json!({"url": format!("http://{addr}/{path}"), "events": ["job.succeeded"]}),
            )
            .await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
        let secret = v["secret"].as_str().expect("secret");
        assert!(secret.starts_with("whsec_"));
        receiver
            .secrets
            .lock()
            .expect("lock")
            .insert(path.into(), secret.into());
        hooks.insert(path, v["id"].as_str().expect("id").to_owned());
    }
    let (_, list) = f.get("/v1/webhooks").await;
    assert!(
        list["webhooks"][0].get("secret").is_none(),
        "secrets are shown once"
    );

    let job = f.probe(json!({}), json!({})).await;
    f.wait_status(job, "succeeded", 20).await;
    let hits = |p: &'static str| {
        let r = receiver.clone();
        move || {
            let r = r.clone();
            async move { r.hits.lock().expect("lock").get(p).map_or(0, Vec::len) }
        }
    };
    let deliveries = |status: &'static str| {
        let f = &f;
        async move {
            let (_, v) = f
                .get(&format!("/v1/webhook-deliveries?status={status}"))
                .await;
            v["deliveries"].as_array().cloned().unwrap_or_default()
        }
    };
    let by_url = |ds: &[serde_json::Value], path: &str| {
        ds.iter()
            .find(|d| d["url"].as_str().is_some_and(|u| u.ends_with(path)))
            .cloned()
    };

    let flaky = hits("flaky");
    eventually(20, "flaky delivered on the third try", || async {
        flaky().await >= 3
    })
    .await;
    eventually(10, "flaky recorded as delivered", || async {
        by_url(&deliveries("delivered").await, "/flaky").is_some_and(|d| d["attempts"] == 3)
    })
    .await;
    let ids = receiver.hits.lock().expect("lock")["flaky"].clone();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one webhook-id for every retry: {ids:?}"
    );

    eventually(10, "410 disables the endpoint", || async {
        let (_, v) = f.get("/v1/webhooks").await;
        v["webhooks"]
            .as_array()
            .expect("list")
            .iter()
            .any(|w| w["id"] == hooks["gone"] && !w["disabled_at"].is_null())
    })
    .await;
    let hang = hits("hang");
    eventually(
        20,
        "the hanging receiver is retried after its timeout",
        || async { hang().await >= 2 && by_url(&deliveries("delivered").await, "/hang").is_some() },
    )
    .await;
    eventually(10, "a 302 fails at once", || async {
        by_url(&deliveries("failed").await, "/redirect")
            .is_some_and(|d| d["last_status"] == 302 && d["attempts"] == 1)
    })
    .await;
    assert_eq!(hits("redirect")().await, 1, "the redirect is not followed");

    eventually(30, "the down receiver uses up the schedule", || async {
        by_url(&deliveries("failed").await, "/down").is_some()
    })
    .await;
    let failed = by_url(&deliveries("failed").await, "/down").expect("failed delivery");
    assert_eq!(failed["attempts"], 4, "1 + 3 retries of 1s,1s,2s");
    *receiver.down_is_up.lock().expect("lock") = true;
    let (s, v) = f
        .post(
            &format!(
                "/v1/webhook-deliveries/{}/retry",
                failed["id"].as_str().expect("id")
            ),
            json!({}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    eventually(10, "the retried delivery arrives", || async {
        by_url(&deliveries("delivered").await, "/down").is_some()
    })
    .await;
    f.shutdown().await;
}
