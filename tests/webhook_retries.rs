//! Webhook delivery rules on both stores, against receivers on 127.0.0.1:
//! a 429 is retried on the schedule (gaps within its ±10 % jitter), a
//! refused connection is retried until the schedule is used up, a plain 4xx
//! fails at once, a 410'd endpoint receives nothing afterwards, and an
//! endpoint gets only the event types it asked for.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use support::{eventually, fast_notify, Flavor, Opts, TestFleet};
use uuid::Uuid;

/// Delays after the 1st, 2nd and 3rd failed attempt.
const SCHEDULE: [f64; 3] = [1.0, 2.0, 1.0];

/// One verified request: event type, job id, when it arrived.
type Hit = (String, String, Instant);

#[derive(Default)]
struct Receiver {
    secrets: Mutex<HashMap<String, String>>,
    /// Path → (event type, job id, when) of each verified request.
    hits: Mutex<HashMap<String, Vec<Hit>>>,
}

impl Receiver {
    fn hits(&self, path: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .expect("lock")
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Some(secret) = r.secrets.lock().expect("lock").get(&path).cloned() else {
        return StatusCode::NOT_FOUND;
    };
    let verified = standardwebhooks::Webhook::new(&secret)
        .map(|w| w.verify(&body, &headers).is_ok())
        .unwrap_or(false);
    if !verified {
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let hit = (
        v["type"].as_str().unwrap_or_default().to_owned(),
        v["data"]["job_id"].as_str().unwrap_or_default().to_owned(),
        Instant::now(),
    );
    let n = {
        let mut hits = r.hits.lock().expect("lock");
        let h = hits.entry(path.clone()).or_default();
        h.push(hit);
        h.len()
    };
    match (path.as_str(), n) {
        ("busy", 1 | 2) => StatusCode::TOO_MANY_REQUESTS,
        ("teapot", _) => StatusCode::IM_A_TEAPOT,
        ("gone", _) => StatusCode::GONE,
        _ => StatusCode::OK,
    }
}

async fn deliveries(f: &TestFleet) -> Vec<Value> {
    let (_, v) = f.get("/v1/webhook-deliveries?limit=200").await;
    v["deliveries"].as_array().cloned().unwrap_or_default()
}

fn to<'a>(ds: &'a [Value], url: &str) -> Vec<&'a Value> {
    ds.iter().filter(|d| d["url"] == url).collect()
}

async fn delivery_rules_hold(flavor: Flavor) {
    let receiver = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    // A loopback port with nothing listening: every connection is refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut notify = fast_notify(&format!("{addr},{closed}"));
    notify.webhook_schedule = SCHEDULE.map(|s| format!("{s}s")).join(",");
    let f = TestFleet::start_with(
        flavor,
        Opts {
            notify,
            ..Default::default()
        },
    )
    .await;

    let mut urls = HashMap::new();
    for (path, events) in [
        ("busy", "job.succeeded"),
        ("teapot", "job.succeeded"),
        ("gone", "job.succeeded"),
        ("refused", "job.succeeded"),
        ("deadonly", "job.dead"),
    ] {
        let url = if path == "refused" {
            format!("http://{closed}/refused")
        } else {
            format!("http://{addr}/{path}")
        };
        let (s, v) = f
            .post("/v1/webhooks", json!({"url": url, "events": [events]}))
            .await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
        let secret = v["secret"].as_str().expect("secret").to_owned();
        receiver
            .secrets
            .lock()
            .expect("lock")
            .insert(path.into(), secret);
        urls.insert(path, url);
    }
    let (s, v) = f
        .post(
            "/v1/webhooks",
            json!({"url": urls["busy"], "events": ["job.finished"]}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "events", "{v}");

    let first = f.probe(json!({}), json!({})).await;
    f.wait_status(first, "succeeded", 20).await;

    eventually(20, "the 429s are retried until delivered", || async {
        to(&deliveries(&f).await, &urls["busy"])
            .iter()
            .any(|d| d["status"] == "delivered" && d["attempts"] == 3)
    })
    .await;
    let times: Vec<Instant> = receiver.hits("busy").iter().map(|h| h.2).collect();
    for (i, pair) in times.windows(2).enumerate() {
        let gap = (pair[1] - pair[0]).as_secs_f64();
        // ±10 % jitter, plus the notifier's poll and a loaded machine.
        let (lo, hi) = (SCHEDULE[i] * 0.9, SCHEDULE[i] * 1.1 + 0.6);
        assert!(
            (lo..hi).contains(&gap),
            "retry {} came {gap:.2}s after the previous try, expected {lo:.2}..{hi:.2}",
            i + 1
        );
    }

    eventually(10, "a 418 fails at once", || async {
        to(&deliveries(&f).await, &urls["teapot"])
            .iter()
            .any(|d| d["status"] == "failed" && d["attempts"] == 1 && d["last_status"] == 418)
    })
    .await;
    eventually(10, "410 disables the endpoint", || async {
        let (_, v) = f.get("/v1/webhooks").await;
        v["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["url"] == urls["gone"] && !w["disabled_at"].is_null())
    })
    .await;
    eventually(20, "refused connections use up the schedule", || async {
        to(&deliveries(&f).await, &urls["refused"]).iter().any(|d| {
            d["status"] == "failed"
                && d["attempts"] == SCHEDULE.len() + 1
                && d["last_status"].is_null()
                && d["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("schedule exhausted"))
        })
    })
    .await;

    // More events: a dead job (only `deadonly` wants it) and a success.
    let dead = f
        .probe(
            json!({"fail_attempts": 1, "failure": "permanent"}),
            json!({}),
        )
        .await;
    f.wait_status(dead, "dead", 20).await;
    let second = f.probe(json!({}), json!({})).await;
    f.wait_status(second, "succeeded", 20).await;
    eventually(20, "every delivery settled", || async {
        let ds = deliveries(&f).await;
        let second_done = to(&ds, &urls["busy"])
            .iter()
            .filter(|d| d["status"] == "delivered")
            .count()
            == 2;
        second_done
            && !to(&ds, &urls["deadonly"]).is_empty()
            && ds
                .iter()
                .all(|d| d["status"] == "delivered" || d["status"] == "failed")
    })
    .await;
    assert_eq!(receiver.hits("gone").len(), 1, "nothing after the 410");
    assert_eq!(receiver.hits("teapot").len(), 2, "one try per event");
    let dead_hits: Vec<(String, String)> = receiver
        .hits("deadonly")
        .into_iter()
        .map(|h| (h.0, h.1))
        .collect();
    assert_eq!(dead_hits, [("job.dead".to_owned(), dead.to_string())]);
    let busy_jobs: Vec<Uuid> = receiver
        .hits("busy")
        .iter()
        .map(|h| h.1.parse().expect("uuid"))
        .collect();
    assert_eq!(
        busy_jobs,
        [first, first, first, second],
        "no job.dead to busy"
    );
    f.shutdown().await;
}

both_flavors!(delivery_rules_hold);
