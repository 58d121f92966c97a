//! The HTTP API's contract for bad input and its service routes: every
//! client mistake is a 4xx with a JSON body naming the field, never a 500.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::{Flavor, TestFleet};
use uuid::Uuid;

async fn assert_error(
    f: &TestFleet,
    body: serde_json::Value,
    status: StatusCode,
    code: &str,
    field: Option<&str>,
) {
    let (s, v) = f.post("/v1/jobs", body.clone()).await;
    assert_eq!(s, status, "{body} -> {v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["field"].as_str(), field, "{v}");
    assert!(!v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
}

async fn bad_input_gets_a_clear_4xx(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        support::Opts {
            workers: vec![],
            ..Default::default()
        },
    )
    .await;
    let (s, v) = f.post_raw("/v1/jobs", b"{\"kind\": ".to_vec()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let (s, v) = f.post_raw("/v1/jobs", vec![b' '; 1024 * 1024 + 10]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );

    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    assert_error(
        &f,
        json!({"kind": "nope", "payload": {}}),
        unprocessable,
        "invalid_job",
        Some("kind"),
    )
    .await;
    assert_error(
        &f,
        json!({"payload": {}}),
        unprocessable,
        "invalid_job",
        None,
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {"sleep_ms": -1}}),
        unprocessable,
        "invalid_job",
        Some("payload.sleep_ms"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {"bogus": 1}}),
        unprocessable,
        "invalid_job",
        Some("payload.bogus"),
    )
    .await;
    // A model the deployment does not offer (it could cost the operator
    // money) is refused at submit, not at run.
    assert_error(
        &f,
        json!({"kind": "analyze", "payload": {
            "questions": [{"text": "Which?", "options": ["a", "b"]}],
            "model": "gpt-4-32k"}}),
        unprocessable,
        "invalid_job",
        Some("payload.model"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {"failure": "sometimes"}}),
        unprocessable,
        "invalid_job",
        Some("payload.failure"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "extra": 1}),
        unprocessable,
        "invalid_job",
        Some("extra"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "max_attempts": 26}),
        unprocessable,
        "invalid_job",
        Some("max_attempts"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "max_attempts": 0}),
        unprocessable,
        "invalid_job",
        Some("max_attempts"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "timeout_secs": 0}),
        unprocessable,
        "invalid_job",
        Some("timeout_secs"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "backoff": {"base_ms": 10, "max_ms": 5}}),
        unprocessable,
        "invalid_job",
        Some("backoff.max_ms"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "run_at": "tomorrow"}),
        unprocessable,
        "invalid_job",
        Some("run_at"),
    )
    .await;
    assert_error(
        &f,
        json!({"kind": "probe", "payload": {}, "idempotency_key": ""}),
        unprocessable,
        "invalid_job",
        Some("idempotency_key"),
    )
    .await;

    let (s, v) = f.post("/v1/jobs/batch", json!({"jobs": [{"kind": "probe", "payload": {}}, {"kind": "probe", "payload": {"sleep_ms": "x"}}]})).await;
    assert_eq!(s, unprocessable);
    assert_eq!(v["error"]["field"], "jobs[1].payload.sleep_ms");
    let (s, v) = f.post("/v1/jobs/batch", json!({"jobs": []})).await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (unprocessable, Some("jobs"))
    );
    let too_many: Vec<_> = (0..1001)
        .map(|_| json!({"kind": "probe", "payload": {}}))
        .collect();
    let (s, _) = f.post("/v1/jobs/batch", json!({"jobs": too_many})).await;
    assert_eq!(s, unprocessable);
    // A rejected batch is all or nothing: its valid first job is not there.
    let (s, v) = f.get("/v1/jobs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["jobs"],
        json!([]),
        "rejected submits inserted nothing: {v}"
    );
    let (s, v) = f
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "probe", "payload": {}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (_, v) = f.get("/v1/jobs").await;
    assert_eq!(
        v["jobs"].as_array().map(Vec::len),
        Some(1),
        "the list does show jobs: {v}"
    );

    let (s, v) = f.get(&format!("/v1/jobs/{}", Uuid::now_v7())).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, v) = f.get("/v1/jobs/not-a-uuid").await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("id"))
    );
    let (s, v) = f.get("/v1/jobs?status=done").await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("status"))
    );
    let (s, v) = f.get("/v1/jobs?limit=100000").await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("limit"))
    );
    let (s, v) = f.get("/v1/nowhere").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, v) = f.get(&format!("/v1/dead-letters/{}", Uuid::now_v7())).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    // Postgres text cannot hold NUL: refused by name on every store, in a
    // query, a path segment and anywhere in a body (these were 500s).
    for (path, field) in [
        ("/v1/jobs?kind=%00", "kind"),
        ("/v1/schedules/a%00b", "name"),
    ] {
        let (s, v) = f.get(path).await;
        assert_eq!(
            (s, v["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{path}: {v}"
        );
    }
    for (path, body, field) in [
        (
            "/v1/jobs",
            r#"{"kind": "scrape", "payload": {"url": "https://example.com/", "wait_for": "a\u0000"}}"#,
            "payload.wait_for",
        ),
        (
            "/v1/jobs/batch",
            r#"{"jobs": [{"kind": "probe", "payload": {}, "idempotency_key": "\u0000"}]}"#,
            "jobs[0].idempotency_key",
        ),
        (
            "/v1/dead-letters/purge",
            r#"{"error_contains": "a\u0000"}"#,
            "error_contains",
        ),
    ] {
        let (s, v) = f.post_raw(path, body.as_bytes().to_vec()).await;
        assert_eq!(
            (s, v["error"]["field"].as_str()),
            (unprocessable, Some(field)),
            "{path}: {v}"
        );
    }
    f.shutdown().await;
}

async fn service_routes_answer(flavor: Flavor) {
    let f = TestFleet::start(flavor).await;
    let id = f.probe(json!({}), json!({})).await;
    f.wait_status(id, "succeeded", 20).await;
    let (s, v) = f.get("/healthz").await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = f.get("/readyz").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["database"], "ok");
    let (s, doc) = f.get("/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/dead-letters",
        "/v1/dead-letters/{id}/replay",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI documents {path}");
    }
    let metrics = f
        .http
        .get(format!("{}/metrics", f.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "stevedore_jobs_submitted_total",
        "stevedore_jobs_finished_total",
        "stevedore_job_run_seconds",
        "stevedore_job_wait_seconds",
    ] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
    let (s, v) = f.get(&format!("/v1/stats?since={id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["counts"]["succeeded"], 1, "{v}");
    f.shutdown().await;
}

both_flavors!(bad_input_gets_a_clear_4xx, service_routes_answer);

/// With Postgres unreachable the API answers 503 with a JSON error, fast.
#[tokio::test]
async fn database_down_is_a_503_not_a_hang() {
    let store =
        stevedore::store::postgres::PgStore::connect("postgres://postgres@127.0.0.1:1/none", 2)
            .await
            .expect("lazy pool");
    let redis = stevedore::broker::redis::RedisBroker::connect(
        redis::Client::open(support::redis_url()).expect("Redis URL"),
        "sdt:down",
        std::time::Duration::from_secs(2),
    )
    .await
    .expect("redis");
    let store = std::sync::Arc::new(store);
    let backend = stevedore::fleet::Backend::on_postgres(
        store,
        stevedore::broker::Brokers::new(std::sync::Arc::new(redis)),
    );
    let roles = stevedore::fleet::Roles::new(support::fast_timing()).with_api(
        stevedore::fleet::ApiRole::open("127.0.0.1:0".parse().expect("addr")),
    );
    let running = stevedore::fleet::start(backend, stevedore::fleet::default_kinds(), roles)
        .await
        .expect("start");
    let url = format!("http://{}", running.addr.expect("addr"));
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"kind": "probe", "payload": {}}))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "unavailable");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let r = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = r.json().await.expect("json");
    // Which dependency, never the driver's error text (host, port, user).
    assert_eq!(v["database"], "unreachable", "{v}");
    assert!(!v.to_string().contains("127.0.0.1:1"), "{v}");
    running.shutdown().await;
}

/// Past the in-flight cap requests are turned away at once with 503 and
/// Retry-After, and a request past its deadline is answered 503 too; the
/// jobs of the requests that were let in are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503_and_retry_after() {
    use stevedore::api::limits::Limits;
    let shed = |max: usize, secs: f64| support::Opts {
        workers: vec![],
        api: stevedore::fleet::ApiRole {
            limits: Limits::new(std::time::Duration::from_secs_f64(secs), max),
            ..stevedore::fleet::ApiRole::open("127.0.0.1:0".parse().expect("addr"))
        },
        ..Default::default()
    };
    let batch: Vec<serde_json::Value> = (0..1000)
        .map(|_| json!({"kind": "probe", "payload": {}}))
        .collect();
    let body = json!({"jobs": batch});

    let f = TestFleet::start_with(Flavor::Postgres, shed(1, 30.0)).await;
    let answers =
        futures::future::join_all((0..12).map(|_| f.post("/v1/jobs/batch", body.clone()))).await;
    let accepted = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    let refused: Vec<&serde_json::Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(accepted + refused.len(), 12, "{answers:?}");
    assert!(accepted >= 1 && !refused.is_empty(), "accepted {accepted}");
    assert!(
        refused.iter().all(|v| v["error"]["code"] == "overloaded"),
        "{refused:?}"
    );
    let (_, stats) = f.get("/v1/stats").await;
    assert_eq!(stats["counts"]["queued"], accepted * 1000, "{stats}");
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", f.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), StatusCode::OK, "the cap frees up again");
    f.shutdown().await;

    let f = TestFleet::start_with(Flavor::Postgres, shed(64, 0.001)).await;
    let (s, v) = f.post("/v1/jobs/batch", body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("timeout")),
        "{v}"
    );
    f.shutdown().await;
}
