//! Submit options a user sets per job, on both stores: `timeout_secs` ends
//! an attempt that runs past it (and retries it as the README says), and
//! `max_attempts` bounds how often that happens.

mod support;

use chrono::{DateTime, Utc};
use serde_json::json;
use support::{Flavor, TestFleet};

fn ts(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str().expect("timestamp").parse().expect("RFC 3339")
}

async fn an_attempt_past_its_timeout_is_ended_and_retried(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f
        .probe(
            json!({"sleep_ms": 30000}),
            json!({"timeout_secs": 1, "max_attempts": 2, "backoff": {"base_ms": 100, "max_ms": 100}}),
        )
        .await;
    let job = f.wait_status(id, "dead", 20).await;
    assert_eq!(job["attempt"], 2, "both attempts ran: {job}");
    let errors = job["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2, "{job}");
    for e in errors {
        let msg = e["message"].as_str().expect("message");
        assert!(msg.contains("timed out after 1s"), "{job}");
    }
    // The last attempt was cut at about a second, not after its 30 s sleep.
    let ran = ts(&job["finished_at"]) - ts(&job["started_at"]);
    assert!(
        ran < chrono::Duration::seconds(5),
        "the attempt ran {ran} despite timeout_secs 1: {job}"
    );
    f.shutdown().await;
}

both_flavors!(an_attempt_past_its_timeout_is_ended_and_retried);
