//! The notifier on both stores: a job's own webhook without a secret is
//! delivered once, signed with its tenant's secret and not with the
//! deployment's `STEVEDORE_WEBHOOK_SECRET` (verified with the independent
//! `standardwebhooks` crate), and events the notifier has handled are
//! pruned by the retention setting.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use support::{eventually, fast_notify, Flavor, Opts, TestFleet};

/// 24 random-looking bytes, base64: a valid Standard Webhooks secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Receiver {
    /// The tenant's signing secret, from the API.
    secret: Mutex<String>,
    seen: Mutex<Vec<serde_json::Value>>,
    /// Requests that verified under the deployment secret itself.
    root_signed: Mutex<usize>,
}

type Seen = Arc<Receiver>;

async fn receive(State(r): State<Seen>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let root = standardwebhooks::Webhook::new(SECRET).expect("secret");
    if root.verify(&body, &headers).is_ok() {
        *r.root_signed.lock().expect("lock") += 1;
    }
    let secret = r.secret.lock().expect("lock").clone();
    let verifier = standardwebhooks::Webhook::new(&secret).expect("secret");
    if verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    r.seen.lock().expect("lock").push(v);
    StatusCode::OK
}

async fn a_jobs_own_webhook_is_delivered_and_old_events_are_pruned(flavor: Flavor) {
    let receiver: Seen = Arc::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(l, app).await });

    let mut notify = fast_notify(&format!("127.0.0.1:{port}"));
    notify.webhook_secret = Some(SECRET.into());
    let f = TestFleet::start_with(
        flavor,
        Opts {
            notify,
            ..Opts::default()
        },
    )
    .await;
    let (s, v) = f.get("/v1/webhook-signing-secret").await;
    assert_eq!(s, reqwest::StatusCode::OK, "{v}");
    let tenant_secret = v["secret"].as_str().expect("secret").to_owned();
    assert!(tenant_secret.starts_with("whsec_") && tenant_secret != SECRET);
    *receiver.secret.lock().expect("lock") = tenant_secret;
    let hook = json!({"webhook": {"url": format!("http://127.0.0.1:{port}/hook")}});
    let id = f.probe(json!({}), hook).await;
    f.wait_status(id, "succeeded", 30).await;
    eventually(
        30,
        "the job's webhook arrived, correctly signed",
        || async { !receiver.seen.lock().expect("lock").is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.seen.lock().expect("lock").clone();
    assert_eq!(
        *receiver.root_signed.lock().expect("lock"),
        0,
        "never signed with the deployment secret"
    );
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
    assert_eq!(got[0]["type"], "job.succeeded");
    assert_eq!(got[0]["data"]["job_id"], id.to_string());

    let events = f.backend.events.clone();
    let last = f.events(id).await.len();
    assert_eq!(last, 3, "queued, started, succeeded");
    eventually(30, "the notifier handled every event", || async {
        let cursor = events.cursor().await.unwrap_or(0);
        let max = f.store().job_events(id).await.map(|e| e.len()).unwrap_or(0);
        cursor > 0 && max == 3
    })
    .await;
    // Handled events older than the retention go; a zero retention prunes
    // everything the cursor has passed.
    let pruned = {
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while n == 0 && tokio::time::Instant::now() < deadline {
            n = events.prune(Duration::ZERO).await.expect("prune");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    };
    assert!(pruned >= 3, "pruned {pruned}");
    assert!(
        f.events(id).await.is_empty(),
        "the job's handled events are gone"
    );
    assert_eq!(
        f.job(id).await["status"],
        "succeeded",
        "the job itself stays"
    );
    f.shutdown().await;
}

both_flavors!(a_jobs_own_webhook_is_delivered_and_old_events_are_pruned);
