//! The OpenAPI document: whole, and true of the running API.
//!
//! One test reads the document as a client generator would and checks the
//! routes people use most, with their answers and the key they need. The
//! other runs schemathesis (PyPI; `scripts/test.sh` installs it) against a
//! real `stevedore api` on Postgres + Redis with an admin key: every
//! operation of the document but the endless SSE one, generated requests
//! valid and invalid for 45 s, and every answer must be no 5xx, a status
//! the document lists for that operation, a documented content type and
//! headers, a body matching the documented schema, 405 for undocumented
//! methods and 401 without the key. Not checked: that every schema-valid
//! request is accepted (a job's payload, a cron pattern and a kind are
//! checked by code the schema cannot express) and schemathesis' negative
//! data check (it flags query values that reach the wire as nothing).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::procs::{free_port, run_stevedore, wait_port, Proc};
use support::{drop_database, fresh_pg_database, redis_url, TEST_WEBHOOK_KEY};
use uuid::Uuid;

fn document() -> Value {
    serde_json::to_value(stevedore::api::openapi_document()).expect("the document is JSON")
}

fn statuses(doc: &Value, path: &str, method: &str) -> Vec<String> {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is in the document");
    op["responses"]
        .as_object()
        .expect("responses")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn the_document_lists_every_route_with_its_answers_and_its_key() {
    let doc = document();
    // Every /v1 route of the router, by method (the router and the document
    // come from one registration; this list catches one dropped from both).
    let routes = [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/batch", "post"),
        ("/v1/jobs/cancel", "post"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/v1/jobs/{id}/events", "get"),
        ("/v1/dead-letters", "get"),
        ("/v1/dead-letters/replay", "post"),
        ("/v1/dead-letters/purge", "post"),
        ("/v1/dead-letters/{id}", "get"),
        ("/v1/dead-letters/{id}", "delete"),
        ("/v1/dead-letters/{id}/replay", "post"),
        ("/v1/stats", "get"),
        ("/v1/pools", "get"),
        ("/v1/pools/{pool}/pause", "post"),
        ("/v1/pools/{pool}/resume", "post"),
        ("/v1/concurrency-limits", "get"),
        ("/v1/concurrency-limits/{prefix}", "put"),
        ("/v1/concurrency-limits/{prefix}", "delete"),
        ("/v1/schedules", "post"),
        ("/v1/schedules", "get"),
        ("/v1/schedules/{name}", "get"),
        ("/v1/schedules/{name}", "delete"),
        ("/v1/schedules/{name}/pause", "post"),
        ("/v1/schedules/{name}/resume", "post"),
        ("/v1/events", "get"),
        ("/v1/stream", "get"),
        ("/v1/stream-tickets", "post"),
        ("/v1/webhooks", "post"),
        ("/v1/webhooks", "get"),
        ("/v1/webhooks/{id}", "delete"),
        ("/v1/webhook-deliveries", "get"),
        ("/v1/webhook-deliveries/{id}/retry", "post"),
        ("/v1/webhook-signing-secret", "get"),
    ];
    let documented: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .filter(|(p, _)| p.starts_with("/v1/"))
        .map(|(_, item)| item.as_object().map_or(0, |m| m.len()))
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document has exactly the /v1 operations listed here"
    );
    for (path, method) in routes {
        let got = statuses(&doc, path, method);
        for shared in ["401", "403", "429", "503"] {
            assert!(got.iter().any(|s| s == shared), "{method} {path}: {shared}");
        }
        if matches!(method, "post" | "put" | "delete") {
            assert!(got.iter().any(|s| s == "415"), "{method} {path}: 415");
        }
        // Every error answer names the error body.
        for (status, r) in doc["paths"][path][method]["responses"]
            .as_object()
            .expect("responses")
        {
            if status.starts_with('4') || status == "503" {
                let schema = &r["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
    }
    let has = |path: &str, method: &str, want: &[&str]| {
        let got = statuses(&doc, path, method);
        for w in want {
            assert!(
                got.iter().any(|s| s == w),
                "{method} {path} lists {w}: {got:?}"
            );
        }
    };
    has(
        "/v1/jobs",
        "post",
        &["202", "200", "400", "413", "422", "429"],
    );
    has("/v1/jobs/{id}", "get", &["200", "400", "404"]);
    has(
        "/v1/jobs/{id}/cancel",
        "post",
        &["200", "202", "404", "409"],
    );
    has("/v1/webhooks", "post", &["201", "409", "422"]);
    has("/v1/schedules", "post", &["201", "200", "409", "422"]);
    has("/v1/stream", "get", &["101", "400", "426"]);
    has(
        "/v1/concurrency-limits/{prefix}",
        "put",
        &["200", "403", "422"],
    );

    // The constraints the handlers enforce are in the schemas.
    let submit = &doc["components"]["schemas"]["SubmitRequest"]["properties"];
    assert_eq!(submit["priority"]["minimum"], -100, "{submit}");
    assert_eq!(submit["max_attempts"]["maximum"], 25, "{submit}");
    assert_eq!(submit["idempotency_key"]["maxLength"], 200, "{submit}");
    let batch = &doc["components"]["schemas"]["BatchRequest"]["properties"]["jobs"];
    assert_eq!(batch["maxItems"], 1000, "{batch}");

    // A key on /v1, none on the health routes.
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    assert_eq!(doc["security"][0]["api_key"], serde_json::json!([]));
    assert_eq!(
        doc["paths"]["/healthz"]["get"]["security"],
        serde_json::json!([])
    );
}

const SECRET: &str = "test-openapi-secret-0123456789abcdef012345";

/// Where schemathesis runs from: `python3 -m schemathesis.cli`, so it is
/// found without the install's scripts directory on `PATH`.
fn schemathesis_installed() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import schemathesis.cli"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_wrong_with_a_running_api() {
    assert!(
        schemathesis_installed(),
        "schemathesis is not installed for python3: scripts/test.sh installs it \
         (python3 -m pip install -r tests/schemathesis/requirements.txt)"
    );
    let db = fresh_pg_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = vec![
        ("DATABASE_URL", db.clone()),
        ("REDIS_URL", redis_url().to_owned()),
        (
            "STEVEDORE_REDIS_PREFIX",
            format!("sdt:{}", Uuid::now_v7().simple()),
        ),
        ("STEVEDORE_AUTH_SECRET", SECRET.to_owned()),
        ("STEVEDORE_WEBHOOK_KEY", TEST_WEBHOOK_KEY.to_owned()),
        (
            "STEVEDORE_WEBHOOK_SECRET",
            "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0".to_owned(),
        ),
        // The one webhook receiver the hooks give generated URLs.
        ("STEVEDORE_WEBHOOK_ALLOW_HOSTS", "127.0.0.1:9".to_owned()),
    ];
    // An admin key of the default tenant may call every route.
    let out = run_stevedore(
        &[
            "keys", "create", "--tenant", "default", "--scope", "admin", "--json",
        ],
        &env,
    )
    .await;
    assert!(out.ok, "keys create: {}", out.stderr);
    let created: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let key = created["key"].as_str().expect("key").to_owned();

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = Proc::stevedore(&["api", "--listen", &listen], &env, dir.path(), "api");
    wait_port(port, 60).await;

    let report = dir.path().join("schemathesis.txt");
    let status = schemathesis(port, &key, &report).await;
    let output = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(
        status,
        "schemathesis found problems:\n{output}\n--- api log ---\n{}",
        api.log()
    );
    // It ran: every documented operation but the SSE one was called.
    assert!(
        output.contains("API Operations:") && !output.contains("0 tested"),
        "{output}"
    );
    drop(api);
    drop_database(&db).await;
}

/// Runs schemathesis against the API on `port`; true when it found nothing.
async fn schemathesis(port: u16, key: &str, report: &Path) -> bool {
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let out = std::fs::File::create(report).expect("report file");
    let err = out.try_clone().expect("report file");
    let mut child = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("http://127.0.0.1:{port}/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance,response_headers_conformance,unsupported_method,\
             missing_required_header,ignored_auth",
            // A few cases per operation, valid and invalid ones, within a
            // bounded time (the whole test stays near a minute).
            "--max-examples",
            "8",
            "--max-time",
            "45",
            "--workers",
            "2",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "13",
            // An SSE answer never ends by itself; the stream's filters are
            // tested on the WebSocket route, which parses the same query.
            "--exclude-path",
            "/v1/events",
            "--request-timeout",
            "10",
            "--no-color",
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {key}"))
        // POST and DELETE without a body still need the JSON media type.
        .args(["-H", "Content-Type: application/json"])
        // Its cache and reports go to the test's directory, not the repo.
        .current_dir(report.parent().expect("report directory"))
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", &hooks)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("start python3 -m schemathesis.cli");
    match tokio::time::timeout(Duration::from_secs(150), child.wait()).await {
        Ok(status) => status.expect("schemathesis exit status").success(),
        Err(_) => panic!("schemathesis did not finish within 150 s"),
    }
}
