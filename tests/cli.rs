//! The client CLI run as the README types it (`stevedore submit … --wait`,
//! `status`, `dlq list|show|replay|purge`, `watch --kind`, `webhooks
//! add|list|deliveries|retry`), against a dev-mode fleet whose address it
//! gets from `STEVEDORE_URL`, and `bench-analyze` against the bundled model
//! and an OpenAI-shaped test server: what a person reads in the terminal
//! and the exit code are what is checked.

// The analyze crate's OpenAI double, for bench-analyze's scoring.
#[allow(dead_code)]
#[path = "../workers/analyze/tests/support/fake_openai.rs"]
mod fake_openai;
mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use support::procs::{run_stevedore, Out};
use support::{eventually, fast_notify, Flavor, Opts, TestFleet};
use tokio::io::AsyncBufReadExt;

/// Runs `stevedore ARGS` against the fleet, as typed in a second terminal.
async fn cli(f: &TestFleet, args: &[&str]) -> Out {
    run_stevedore(args, &[("STEVEDORE_URL", f.url.clone())]).await
}

/// The value of a `key   value` line of `status`/`submit --wait` output.
fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_status_and_the_dead_letter_commands() {
    let f = TestFleet::start(Flavor::Sqlite).await;

    let out = cli(
        &f,
        &[
            "submit",
            "probe",
            "--payload",
            r#"{"sleep_ms": 200}"#,
            "--wait",
        ],
    )
    .await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        field(&out.stdout, "status"),
        Some("succeeded"),
        "{}",
        out.stdout
    );
    assert_eq!(field(&out.stdout, "kind"), Some("probe"));
    let result = field(&out.stdout, "result").expect("a result line");
    assert!(result.contains(r#""attempt":1"#), "{result}");
    // The states it went through, as they happened.
    assert!(
        out.stderr.contains("succeeded (attempt 1)"),
        "{}",
        out.stderr
    );

    // --timeout gives up waiting (exit 2) and says the job goes on.
    let slow = tokio::process::Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .args([
            "submit",
            "probe",
            "--payload",
            r#"{"sleep_ms": 20000}"#,
            "--wait",
            "--timeout",
            "1",
        ])
        .env("STEVEDORE_URL", &f.url)
        .env("STEVEDORE_LOG", "warn")
        .output()
        .await
        .expect("run");
    let err = String::from_utf8_lossy(&slow.stderr);
    assert_eq!(slow.status.code(), Some(2), "{err}");
    assert!(err.contains("after 1s; it goes on"), "{err}");
    let id = field(&out.stdout, "id").expect("id line").to_owned();
    let status = cli(&f, &["status", &id]).await;
    assert!(status.ok, "{}", status.stderr);
    assert_eq!(field(&status.stdout, "id"), Some(id.as_str()));
    assert_eq!(field(&status.stdout, "status"), Some("succeeded"));

    // Bad input is refused with the field named, and a non-zero exit.
    let bad = cli(
        &f,
        &["submit", "probe", "--payload", r#"{"sleep_ms": "x"}"#],
    )
    .await;
    assert!(!bad.ok);
    assert!(bad.stderr.contains("422"), "{}", bad.stderr);
    assert!(bad.stderr.contains("payload.sleep_ms"), "{}", bad.stderr);

    // A job that dies: --wait says so and exits non-zero.
    let dies = r#"{"fail_attempts": 1, "failure": "permanent"}"#;
    let dead = cli(&f, &["submit", "probe", "--payload", dies, "--wait"]).await;
    assert!(!dead.ok, "{}", dead.stdout);
    assert!(dead.stderr.contains("job ended dead"), "{}", dead.stderr);
    assert_eq!(field(&dead.stdout, "status"), Some("dead"));
    let dead_id = field(&dead.stdout, "id").expect("id").to_owned();
    let other = cli(&f, &["submit", "probe", "--payload", dies, "--wait"]).await;
    let other_id = field(&other.stdout, "id").expect("id").to_owned();

    let list = cli(&f, &["dlq", "list"]).await;
    assert!(list.ok, "{}", list.stderr);
    let rows: Vec<&str> = list.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "two dead letters: {}", list.stdout);
    assert!(
        rows[0].starts_with(&other_id),
        "newest first: {}",
        list.stdout
    );
    assert!(rows[1].starts_with(&dead_id) && rows[1].contains("dead"));
    assert!(
        !list.stdout.contains(&id),
        "a succeeded job is no dead letter"
    );

    let show = cli(&f, &["dlq", "show", &dead_id]).await;
    assert!(show.ok, "{}", show.stderr);
    let error = field(&show.stdout, "error").expect("the error history");
    assert!(
        error.starts_with("#1") && error.contains("permanent"),
        "{error}"
    );

    // Replay: a fresh budget, and attempt 2 is past fail_attempts.
    let replay = cli(&f, &["dlq", "replay", &dead_id]).await;
    assert!(replay.ok, "{}", replay.stderr);
    assert!(replay.stdout.starts_with(&dead_id), "{}", replay.stdout);
    f.wait_status(dead_id.parse().expect("uuid"), "succeeded", 20)
        .await;
    let status = cli(&f, &["status", &dead_id]).await;
    assert_eq!(field(&status.stdout, "status"), Some("succeeded"));
    assert_eq!(field(&status.stdout, "attempt"), Some("2"));

    let purge = cli(&f, &["dlq", "purge", &other_id]).await;
    assert!(purge.ok, "{}", purge.stderr);
    assert_eq!(purge.stdout.trim(), format!("{other_id} purged"));
    let gone = cli(&f, &["status", &other_id]).await;
    assert!(!gone.ok && gone.stderr.contains("404"), "{}", gone.stderr);
    let list = cli(&f, &["dlq", "list"]).await;
    assert_eq!(list.stdout.lines().count(), 1, "empty: {}", list.stdout);
    f.shutdown().await;
}

/// `pools list|pause|resume`, `submit --priority`, `cancel --kind --status`
/// and `dlq replay --error-contains`, as the README types them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_pause_and_resume_and_submit_with_a_priority() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let paused = cli(&f, &["pools", "pause", "probe"]).await;
    assert!(paused.ok, "{}", paused.stderr);
    let row = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("probe "))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        row(&paused.stdout).get(1).map(String::as_str),
        Some("paused"),
        "{}",
        paused.stdout
    );

    let submit = cli(&f, &["submit", "probe", "--priority", "-7", "--json"]).await;
    assert!(submit.ok, "{}", submit.stderr);
    let accepted: serde_json::Value = serde_json::from_str(submit.stdout.trim()).expect("JSON");
    let id: uuid::Uuid = accepted["id"].as_str().expect("id").parse().expect("uuid");
    assert_eq!(f.job(id).await["priority"], -7);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let list = cli(&f, &["pools", "list"]).await;
    assert!(list.ok, "{}", list.stderr);
    let probe = row(&list.stdout);
    // POOL STATE QUEUED RUNNING RETRYING DEAD WORKERS CONCURRENCY
    assert_eq!(
        probe.get(1).map(String::as_str),
        Some("paused"),
        "{}",
        list.stdout
    );
    assert_eq!(
        probe.get(2).map(String::as_str),
        Some("1"),
        "one job waits: {}",
        list.stdout
    );
    assert_eq!(
        probe.get(6).map(String::as_str),
        Some("1"),
        "one worker process: {}",
        list.stdout
    );
    assert_eq!(
        f.job(id).await["status"],
        "queued",
        "nothing starts while paused"
    );

    let resumed = cli(&f, &["pools", "resume", "probe"]).await;
    assert!(resumed.ok, "{}", resumed.stderr);
    assert_eq!(
        row(&resumed.stdout).get(1).map(String::as_str),
        Some("running")
    );
    f.wait_status(id, "succeeded", 20).await;

    let bad = cli(&f, &["pools", "pause", "nosuchpool"]).await;
    assert!(!bad.ok && bad.stderr.contains("404"), "{}", bad.stderr);

    // Bulk actions by filter, from the terminal.
    assert!(cli(&f, &["pools", "pause", "probe"]).await.ok);
    let held = cli(&f, &["submit", "probe", "--json"]).await;
    let held: serde_json::Value = serde_json::from_str(held.stdout.trim()).expect("JSON");
    let held: uuid::Uuid = held["id"].as_str().expect("id").parse().expect("uuid");
    let cancel = cli(&f, &["cancel", "--kind", "probe", "--status", "queued"]).await;
    assert!(cancel.ok, "{}", cancel.stderr);
    assert_eq!(cancel.stdout.trim(), "1 cancelled, 0 running told to stop");
    assert_eq!(f.job(held).await["status"], "cancelled");
    let none = cli(&f, &["dlq", "replay", "--error-contains", "no such error"]).await;
    assert!(none.ok, "{}", none.stderr);
    assert_eq!(none.stdout.trim(), "0 replayed");
    let neither = cli(&f, &["dlq", "purge"]).await;
    assert!(
        !neither.ok && neither.stderr.contains("--error-contains"),
        "{}",
        neither.stderr
    );
    f.shutdown().await;
}

/// `stevedore schedules ...` as the README types them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_create_list_pause_resume_and_delete() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let created = cli(
        &f,
        &[
            "schedules",
            "create",
            "heartbeat",
            "--cron",
            "* * * * * *",
            "--kind",
            "probe",
            "--jitter",
            "0",
        ],
    )
    .await;
    assert!(created.ok, "{}", created.stderr);
    assert!(
        created.stdout.contains("heartbeat") && created.stdout.contains("active"),
        "{}",
        created.stdout
    );
    eventually(10, "the schedule made a job", || async {
        let (_, v) = f.get("/v1/jobs?kind=probe").await;
        v["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["schedule"] == "heartbeat"))
    })
    .await;
    let list = cli(&f, &["schedules", "list"]).await;
    assert!(list.ok, "{}", list.stderr);
    assert!(list.stdout.contains("active"), "{}", list.stdout);

    let paused = cli(&f, &["schedules", "pause", "heartbeat"]).await;
    assert!(
        paused.ok && paused.stdout.contains("paused"),
        "{}{}",
        paused.stdout,
        paused.stderr
    );
    let shown = cli(&f, &["schedules", "show", "heartbeat"]).await;
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).expect("JSON");
    assert_eq!(
        (&v["paused"], &v["cron"]),
        (&json!(true), &json!("* * * * * *")),
        "{v}"
    );
    assert!(v["last_job_id"].is_string(), "{v}");
    let resumed = cli(&f, &["schedules", "resume", "heartbeat"]).await;
    assert!(
        resumed.ok && resumed.stdout.contains("active"),
        "{}",
        resumed.stdout
    );

    let bad = cli(
        &f,
        &[
            "schedules",
            "create",
            "x",
            "--cron",
            "nope",
            "--kind",
            "probe",
        ],
    )
    .await;
    assert!(
        !bad.ok && bad.stderr.contains("(field cron)"),
        "{}",
        bad.stderr
    );
    let deleted = cli(&f, &["schedules", "delete", "heartbeat"]).await;
    assert_eq!(
        deleted.stdout.trim(),
        "deleted heartbeat",
        "{}",
        deleted.stderr
    );
    let gone = cli(&f, &["schedules", "show", "heartbeat"]).await;
    assert!(!gone.ok && gone.stderr.contains("404"), "{}", gone.stderr);
    f.shutdown().await;
}

/// `stevedore limits ...` and `stevedore cancel --concurrency-key` as typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_set_list_remove_and_cancel_by_key() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let set = cli(&f, &["limits", "set", "tenant:", "1"]).await;
    assert!(set.ok, "{}", set.stderr);
    assert!(set.stdout.contains("tenant:"), "{}", set.stdout);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, v) = f
            .post(
                "/v1/jobs",
                json!({"kind": "probe", "payload": {"sleep_ms": 30000}, "concurrency_key": "tenant:x"}),
            )
            .await;
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    eventually(10, "one runs, the other waits for room", || async {
        let list = cli(&f, &["limits", "list"]).await;
        list.stdout
            .lines()
            .find(|l| l.starts_with("tenant:"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .is_some_and(|row| row[1..] == ["1", "1", "1"])
    })
    .await;
    let cancel = cli(&f, &["cancel", "--concurrency-key", "tenant:x"]).await;
    assert_eq!(
        cancel.stdout.trim(),
        "1 cancelled, 1 running told to stop",
        "{}",
        cancel.stderr
    );
    let removed = cli(&f, &["limits", "remove", "tenant:"]).await;
    assert_eq!(
        removed.stdout.trim(),
        "removed tenant:",
        "{}",
        removed.stderr
    );
    let again = cli(&f, &["limits", "remove", "tenant:"]).await;
    assert!(
        !again.ok && again.stderr.contains("404"),
        "{}",
        again.stderr
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_one_kind() {
    let f = TestFleet::start_with(
        Flavor::Sqlite,
        Opts {
            workers: vec![("probe".into(), 4), ("scrape".into(), 1)],
            ..Default::default()
        },
    )
    .await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .args(["watch", "--kind", "probe"])
        .env("STEVEDORE_URL", &f.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("stevedore watch");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut reader = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = reader.next_line().await {
            sink.lock().expect("lock").push(l);
        }
    });
    let has = |needle: String| {
        let lines = lines.clone();
        move || {
            let found = lines
                .lock()
                .expect("lock")
                .iter()
                .any(|l| l.contains(&needle));
            async move { found }
        }
    };
    // Watch connects on its own schedule and shows only what happens after:
    // probes until one shows up prove it is live.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut warmup = Vec::new();
    'live: loop {
        warmup.push(f.probe(json!({}), json!({})).await.to_string());
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let seen = lines.lock().expect("lock");
            if seen.iter().any(|l| warmup.iter().any(|id| l.contains(id))) {
                break 'live;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch printed none of {warmup:?}"
        );
    }
    // A scrape of a refused address dies at once; watch --kind probe never
    // shows it.
    let (s, v) = f
        .post(
            "/v1/jobs",
            json!({"kind": "scrape", "payload": {"url": "http://127.0.0.1:1/"}, "max_attempts": 1}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    let scrape: uuid::Uuid = v["id"].as_str().expect("id").parse().expect("uuid");
    f.wait_status(scrape, "dead", 20).await;
    let probe = f
        .probe(
            json!({"fail_attempts": 1}),
            json!({"backoff": {"base_ms": 100, "max_ms": 100}}),
        )
        .await;
    let line = format!("job.succeeded  {probe} probe");
    eventually(20, "watch prints the probe's success", has(line)).await;
    let seen = lines.lock().expect("lock").clone();
    let of_probe: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains(&probe.to_string()))
        .collect();
    let types: Vec<&str> = of_probe
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        types,
        [
            "job.queued",
            "job.started",
            "job.retrying",
            "job.started",
            "job.succeeded"
        ],
        "{seen:#?}"
    );
    assert!(of_probe[4].contains("attempt 2 result="), "{}", of_probe[4]);
    assert!(
        !seen.iter().any(|l| l.contains(&scrape.to_string())),
        "--kind probe shows no scrape: {seen:#?}"
    );
    child.kill().await.expect("stop watch");
    f.shutdown().await;
}

#[derive(Default)]
struct Hook {
    up: Mutex<bool>,
    /// Bodies of verified requests.
    got: Mutex<Vec<serde_json::Value>>,
    secret: Mutex<String>,
}

async fn hook(State(h): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let secret = h.secret.lock().expect("lock").clone();
    let Ok(verifier) = standardwebhooks::Webhook::new(&secret) else {
        return StatusCode::UNAUTHORIZED;
    };
    if verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let v = serde_json::from_slice(&body).unwrap_or_default();
    h.got.lock().expect("lock").push(v);
    if *h.up.lock().expect("lock") {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_add_list_deliveries_and_retry() {
    let h = Arc::new(Hook::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(h.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let f = TestFleet::start_with(
        Flavor::Sqlite,
        Opts {
            notify: fast_notify(&addr.to_string()),
            ..Default::default()
        },
    )
    .await;
    // User-info is sent to the receiver but never listed.
    let target = format!("http://ops:hunter2@{addr}/hook");
    let shown = format!("http://***@{addr}/hook");
    let add = cli(
        &f,
        &[
            "webhooks",
            "add",
            &target,
            "--events",
            "job.succeeded,job.dead",
        ],
    )
    .await;
    assert!(add.ok, "{}", add.stderr);
    let hook_id = field(&add.stdout, "id").expect("id line").to_owned();
    let secret = field(&add.stdout, "secret")
        .and_then(|s| s.split_whitespace().next())
        .expect("secret line");
    assert!(secret.starts_with("whsec_"), "{}", add.stdout);
    *h.secret.lock().expect("lock") = secret.to_owned();

    let list = cli(&f, &["webhooks", "list"]).await;
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&hook_id))
        .unwrap_or_else(|| panic!("{hook_id} listed: {}", list.stdout));
    assert!(row.contains(&shown) && row.contains("active"), "{row}");
    assert!(!list.stdout.contains("hunter2"), "{}", list.stdout);
    assert!(
        row.contains("job.dead") && !row.contains("job.cancelled"),
        "{row}"
    );
    assert!(!list.stdout.contains(secret), "the secret is shown once");

    // The receiver is down through the whole (1s,1s,2s) schedule.
    let job = f.probe(json!({}), json!({})).await;
    let failed = || async {
        let out = cli(&f, &["webhooks", "deliveries", "--failed"]).await;
        out.stdout
            .lines()
            .skip(1)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    eventually(30, "the delivery is a webhook dead letter", || async {
        !failed().await.is_empty()
    })
    .await;
    let rows = failed().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let cols: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(&cols[1..4], ["job.succeeded", "failed", "4"], "{}", rows[0]);
    assert_eq!(
        h.got.lock().expect("lock").len(),
        4,
        "1 + 3 retries, all signed"
    );

    *h.up.lock().expect("lock") = true;
    let retry = cli(&f, &["webhooks", "retry", cols[0]]).await;
    assert!(retry.ok, "{}", retry.stderr);
    eventually(10, "the retried delivery is delivered", || async {
        let out = cli(&f, &["webhooks", "deliveries"]).await;
        out.stdout
            .lines()
            .any(|l| l.starts_with(cols[0]) && l.contains("delivered"))
    })
    .await;
    assert!(failed().await.is_empty());
    let got = h.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 5);
    assert_eq!(got[4]["type"], "job.succeeded");
    assert_eq!(got[4]["data"]["job_id"], job.to_string());
    f.shutdown().await;
}

/// Settings that would send analyze elsewhere, emptied: empty is unset.
fn local_only() -> Vec<(&'static str, String)> {
    ["OPENAI_API_KEY", "OPENAI_BASE_URL", "STEVEDORE_LOCAL_MODEL"]
        .map(|k| (k, String::new()))
        .to_vec()
}

/// `accuracy C/T = P%  (chance Q%)  S s/question`, parsed.
fn accuracy_line(out: &str) -> (usize, usize, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("accuracy "))
        .unwrap_or_else(|| panic!("no accuracy line: {out}"));
    let mut words = line.split_whitespace();
    let (c, t) = words
        .nth(1)
        .and_then(|f| f.split_once('/'))
        .unwrap_or_else(|| panic!("{line}"));
    let secs = line
        .split("  ")
        .find_map(|part| part.trim().strip_suffix(" s/question"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (
        c.parse().unwrap_or_else(|_| panic!("{line}")),
        t.parse().unwrap_or_else(|_| panic!("{line}")),
        secs,
    )
}

#[tokio::test]
async fn bench_analyze_scores_the_bundled_model_and_says_it_is_tiny() {
    let out = run_stevedore(&["bench-analyze", "--limit", "3"], &local_only()).await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let (correct, total, secs) = accuracy_line(&out.stdout);
    assert_eq!(total, 3, "{}", out.stdout);
    assert!(correct <= total && secs > 0.0, "{}", out.stdout);
    assert!(
        out.stdout
            .contains("provider local  model SmolLM2-135M-Instruct"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("by language: en ")
            && out
                .stdout
                .contains("note: answered by SmolLM2-135M-Instruct"),
        "{}",
        out.stdout
    );
}

/// The scoring, against answers the test chooses: an OpenAI-shaped server
/// answers every question right except every third, which it answers with
/// the next option.
#[tokio::test]
async fn bench_analyze_counts_what_the_provider_got_right() {
    use fake_openai::{FakeOpenAi, Reply};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/analyze/labelled.json"
    );
    let set: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the set")).expect("json");
    let set = set["questions"].as_array().expect("questions").clone();
    let mut script = Vec::new();
    let mut expected: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (i, q) in set.iter().enumerate() {
        let n = q["options"].as_array().map_or(0, Vec::len);
        let answer = q["answer"].as_u64().expect("answer") as usize;
        let right = i % 3 != 2;
        let choice = if right { answer } else { (answer + 1) % n };
        let reply = json!({"answers": [{"question": 0, "choice": choice, "confidence": 0.8, "reason": "Known."}]});
        script.push(Reply::Content(reply.to_string()));
        let lang = expected
            .entry(q["language"].as_str().expect("language").to_owned())
            .or_default();
        lang.0 += usize::from(right);
        lang.1 += 1;
    }
    let server = FakeOpenAi::start(script, Reply::Answer { choice: 0 }).await;
    let env = [
        ("OPENAI_BASE_URL", server.base_url.clone()),
        ("OPENAI_API_KEY", "sk-test".to_owned()),
    ];
    let out = run_stevedore(&["bench-analyze", "--json"], &env).await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("--json is JSON");
    let right = set.len() - set.len() / 3;
    assert_eq!(report["total"], set.len(), "{report}");
    assert_eq!(report["correct"], right, "{report}");
    assert_eq!(report["provider"], "openai");
    assert_eq!(report["model"], "gpt-4o-mini");
    assert!(report.get("notice").is_none(), "{report}");
    for (lang, (c, t)) in &expected {
        assert_eq!(
            report["by_language"][lang]["correct"], *c,
            "{lang}: {report}"
        );
        assert_eq!(report["by_language"][lang]["total"], *t, "{lang}: {report}");
    }
    assert_eq!(server.requests(), set.len(), "one call per question");
    // The answer key never reaches the model.
    for body in server.bodies() {
        let user = body["messages"][1]["content"].as_str().unwrap_or_default();
        let sent: serde_json::Value = serde_json::from_str(user).expect("questions as JSON");
        let q = &sent["questions"][0];
        assert!(q["text"].is_string(), "{sent}");
        assert!(
            q.get("answer").is_none() && q.get("correct").is_none(),
            "{sent}"
        );
    }

    // The same run as text, its first questions only.
    let out = run_stevedore(&["bench-analyze", "--limit", "3"], &env).await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let (correct, total, _) = accuracy_line(&out.stdout);
    assert_eq!(total, 3, "{}", out.stdout);
    // The server's script is spent: every answer is option 0 now.
    let zeros = set[..3].iter().filter(|q| q["answer"] == 0).count();
    assert_eq!(correct, zeros, "{}", out.stdout);
}
