//! Monitoring as an operator sees it: the API's request metrics and request
//! ids through real HTTP requests, and a real fleet's `/metrics` on every role
//! checked against every metric the alert rules and dashboards name, its
//! traces received by a small OTLP/HTTP receiver on loopback.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::procs::{free_port, wait_port, Proc};
use support::{drop_database, fresh_pg_database, redis_url, Flavor, TestFleet};
use uuid::Uuid;

/// The value of the sample `name{labels...}` in Prometheus text, if present.
/// `labels` need only be a subset of the sample's labels.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

async fn scrape(f: &TestFleet) -> String {
    f.http
        .get(format!("{}/metrics", f.url))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_count_routes_status_classes_and_latency() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let id = f.probe(json!({}), json!({})).await;
    let route = [("route", "/v1/jobs/{id}"), ("method", "GET")];
    let ok = [route[0], route[1], ("status_class", "2xx")];
    let bad = [route[0], route[1], ("status_class", "4xx")];

    let before = scrape(&f).await;
    let ok0 = sample(&before, "stevedore_http_requests_total", &ok).unwrap_or(0.0);
    let count0 = sample(
        &before,
        "stevedore_http_request_duration_seconds_count",
        &route,
    )
    .unwrap_or(0.0);

    for _ in 0..3 {
        f.job(id).await;
    }
    let (status, body) = f.get("/v1/jobs/not-a-uuid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = f.get("/no/such/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let after = scrape(&f).await;
    let ok1 = sample(&after, "stevedore_http_requests_total", &ok).expect("2xx series");
    assert_eq!(ok1 - ok0, 3.0, "three GETs of one job by route template");
    let bad1 = sample(&after, "stevedore_http_requests_total", &bad).expect("4xx series");
    assert_eq!(bad1, 1.0, "the malformed id is a 4xx of the same template");
    let unmatched = [("route", "unmatched"), ("status_class", "4xx")];
    assert_eq!(
        sample(&after, "stevedore_http_requests_total", &unmatched),
        Some(1.0),
        "a path no route matched is one bounded label, not the raw path"
    );
    assert!(
        !after.contains("/no/such/route"),
        "raw paths must not become labels"
    );
    let count1 = sample(
        &after,
        "stevedore_http_request_duration_seconds_count",
        &route,
    )
    .expect("histogram count");
    assert_eq!(
        count1 - count0,
        4.0,
        "3 ok + 1 bad observed in the histogram"
    );
    let le = [route[0], route[1], ("le", "0.5")];
    let fast = sample(
        &after,
        "stevedore_http_request_duration_seconds_bucket",
        &le,
    )
    .expect("the 0.5 s bucket the latency objective uses");
    assert!((1.0..=count1).contains(&fast), "{fast} of {count1}");
    assert_eq!(
        sample(
            &after,
            "stevedore_dependency_up",
            &[("dependency", "database")]
        ),
        Some(1.0),
        "the API's scrape checks the database"
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_a_request_id_generated_or_kept() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let r = f
        .http
        .get(format!("{}/healthz", f.url))
        .send()
        .await
        .expect("healthz");
    let id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id on the response")
        .to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated id {id}");
    let r = f
        .http
        .post(format!("{}/v1/jobs", f.url))
        .header("x-request-id", "client-chosen-42")
        .json(&json!({"kind": "probe", "payload": {"sleep_ms": "x"}}))
        .send()
        .await
        .expect("submit");
    assert!(r.status().is_client_error(), "{}", r.status());
    assert_eq!(
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-chosen-42"),
        "a caller's id is kept so its logs and ours join"
    );
    f.shutdown().await;
}

/// Every `stevedore_*` metric name in the alert rules and dashboards
/// (recording rules, `stevedore:...`, are defined by the rules themselves).
fn names_in_monitoring() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring");
    let mut files = Vec::new();
    for dir in ["prometheus/rules", "grafana/dashboards"] {
        for e in std::fs::read_dir(root.join(dir)).expect("monitoring folder") {
            files.push(e.expect("dir entry").path());
        }
    }
    assert!(files.len() >= 6, "rules and dashboards found: {files:?}");
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("stevedore_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

/// Sample names (histograms as `_bucket`, `_count`, `_sum`) in Prometheus text.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

async fn get_text(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn fixture_server() -> u16 {
    let app = axum::Router::new().route(
        "/moodle",
        axum::routing::get(|| async {
            axum::response::Html(include_str!("../fixtures/quiz/moodle-multichoice.html"))
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

/// Waits for a job to reach `want`; on a timeout, fails with the job and
/// the tail of every role's log so a CI failure can be read afterwards.
async fn wait_done(http: &reqwest::Client, api: &str, id: &str, want: &str, procs: &[Proc]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job: Value = match http.get(format!("{api}/v1/jobs/{id}")).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        if job["status"] == want {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let logs: String = procs
                .iter()
                .map(|p| {
                    let log = p.log();
                    // Request traces would drown out the workers' own lines.
                    let tail: Vec<&str> = log
                        .lines()
                        .filter(|l| !l.contains("tower_http"))
                        .rev()
                        .take(40)
                        .collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {} ---\n{}\n", p.name, tail.join("\n"))
                })
                .collect();
            panic!("job {id} not {want} within 120 s: {job}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit(http: &reqwest::Client, api: &str, body: Value) -> String {
    submit_traced(http, api, body, None).await
}

async fn submit_traced(
    http: &reqwest::Client,
    api: &str,
    body: Value,
    traceparent: Option<&str>,
) -> String {
    let mut req = http.post(format!("{api}/v1/jobs")).json(&body);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let r = req.send().await.expect("submit");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let v: Value = r.json().await.expect("json");
    v["id"].as_str().expect("id").to_owned()
}

/// One span as the OTLP receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
}

/// An OTLP/HTTP (protobuf) trace receiver on loopback; answers its base URL.
async fn otlp_receiver(spans: Arc<Mutex<Vec<Got>>>) -> String {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message;
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| async move {
            let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                return StatusCode::BAD_REQUEST;
            };
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
                .as_ref()
                .and_then(|v| v.value.as_ref())
            {
                Some(Any::StringValue(s)) => s.clone(),
                Some(Any::IntValue(i)) => i.to_string(),
                Some(Any::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            let mut got = spans.lock().expect("lock");
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .map(|a| text(&a.value))
                    .unwrap_or_default();
                for s in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
            StatusCode::OK
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

/// Waits (with a deadline) until `ok` holds for the spans received.
async fn spans_until(spans: &Mutex<Vec<Got>>, what: &str, ok: impl Fn(&[Got]) -> bool) {
    // Generous: on a saturated machine the worker processes' batch
    // exporters were seen to need more than a minute.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    loop {
        let now: Vec<Got> = spans.lock().expect("lock").clone();
        if ok(&now) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let listed: Vec<String> = now
                .iter()
                .map(|s| {
                    format!(
                        "{} {} {} <- {} {:?}",
                        s.service, s.name, s.trace, s.parent, s.attrs
                    )
                })
                .collect();
            panic!("no {what} in the spans received:\n{}", listed.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fleet of one process per role, on Postgres and Redis, with traces on:
/// every metric named by monitoring/ is exported, a job's attempts, and a
/// chain's child job, continue the trace its submit began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_exports_every_metric_monitoring_names_and_traces_jobs_end_to_end() {
    let wanted = names_in_monitoring();
    let db = fresh_pg_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = fixture_server().await;
    let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
    let otlp = otlp_receiver(spans.clone()).await;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(stevedore_analyze::DEFAULT_LOCAL_MODEL);
    let env = vec![
        ("DATABASE_URL", db.clone()),
        ("REDIS_URL", redis_url().to_owned()),
        (
            "STEVEDORE_REDIS_PREFIX",
            format!("sdt:{}", Uuid::now_v7().simple()),
        ),
        (
            "STEVEDORE_SCRAPE_ALLOW_HOSTS",
            format!("127.0.0.1:{fixtures}"),
        ),
        ("STEVEDORE_LOCAL_MODEL", model.display().to_string()),
        ("STEVEDORE_LOG", "info,tower_http=debug".to_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ];
    let mut migrate = Proc::stevedore(&["migrate"], &env, dir.path(), "migrate");
    assert!(migrate.wait_exit(60).await.success(), "{}", migrate.log());

    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let mut procs = vec![Proc::stevedore(
        &[
            "--log-format",
            "json",
            "api",
            "--insecure-no-auth",
            "--no-dispatcher",
            "--listen",
            &listen,
        ],
        &env,
        dir.path(),
        "api",
    )];
    let mut targets = vec![(String::from("api"), api_port)];
    let roles: [(&str, &[&str]); 5] = [
        ("dispatcher", &["dispatcher"]),
        ("notifier", &["notifier"]),
        ("probe", &["worker", "--pool", "probe"]),
        ("scrape", &["worker", "--pool", "scrape"]),
        (
            "analyze",
            &["worker", "--pool", "analyze", "--concurrency", "1"],
        ),
    ];
    for (name, args) in roles {
        let port = free_port();
        let m = format!("127.0.0.1:{port}");
        let mut a = vec!["--log-format", "json"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--metrics-listen", &m]);
        procs.push(Proc::stevedore(&a, &env, dir.path(), name));
        targets.push((name.to_owned(), port));
    }
    for (_, port) in &targets {
        wait_port(*port, 60).await;
    }

    let api = format!("http://{listen}");
    let http = reqwest::Client::new();
    let (probe_trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let retried = submit_traced(
        &http,
        &api,
        json!({"kind": "probe", "payload": {"fail_attempts": 1}, "backoff": {"base_ms": 10, "max_ms": 10}}),
        Some(&format!("00-{probe_trace}-{caller_span}-01")),
    )
    .await;
    let dead = submit(
        &http,
        &api,
        json!({"kind": "probe", "payload": {"fail_attempts": 1, "failure": "permanent"}}),
    )
    .await;
    let chain_trace = "0af7651916cd43dd8448eb211c80319c";
    let scraped = submit_traced(
        &http,
        &api,
        json!({"kind": "scrape", "payload": {"url": format!("http://127.0.0.1:{fixtures}/moodle"), "then": {"kind": "analyze"}}}),
        Some(&format!("00-{chain_trace}-b7ad6b7169203331-01")),
    )
    .await;
    let analyzed = submit(
        &http,
        &api,
        json!({"kind": "analyze", "payload": {"questions": [{"text": "What is 2 + 2?", "options": ["3", "4", "5"]}]}}),
    )
    .await;
    wait_done(&http, &api, &retried, "succeeded", &procs).await;
    wait_done(&http, &api, &dead, "dead", &procs).await;
    wait_done(&http, &api, &scraped, "succeeded", &procs).await;
    wait_done(&http, &api, &analyzed, "succeeded", &procs).await;
    let r = http
        .get(format!("{api}/v1/jobs/{retried}"))
        .header("x-request-id", "monitoring-rid-7")
        .send()
        .await
        .expect("get job");
    assert_eq!(r.status(), StatusCode::OK);

    // Gauges refresh on timers (queue depth, event lag): wait for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let mut have = BTreeSet::new();
        for (_, port) in &targets {
            have.extend(exported(
                &get_text(&format!("http://127.0.0.1:{port}/metrics")).await,
            ));
        }
        let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Traces: the probe's two attempts continue the caller's trace, each
    // with a run and a finish inside; the submit is in it too.
    let job_span = |s: &Got, id: &str, attempt: &str| {
        s.name == "job"
            && s.attrs.get("job.id").map(String::as_str) == Some(id)
            && s.attrs.get("attempt").map(String::as_str) == Some(attempt)
    };
    spans_until(&spans, "probe attempts in the caller's trace", |all| {
        let in_trace: Vec<&Got> = all.iter().filter(|s| s.trace == probe_trace).collect();
        let has = |name: &str, service: &str| {
            in_trace
                .iter()
                .any(|s| s.name == name && s.service == service)
        };
        let attempts: Vec<&&Got> = in_trace
            .iter()
            .filter(|s| job_span(s, &retried, "1") || job_span(s, &retried, "2"))
            .collect();
        let inside = |name: &str, outcome: &str| {
            attempts.iter().any(|a| {
                in_trace.iter().any(|s| {
                    s.name == name
                        && s.parent == a.id
                        && (outcome.is_empty()
                            || s.attrs.get("outcome").map(String::as_str) == Some(outcome))
                })
            })
        };
        has("request", "stevedore-api")
            && has("submit", "stevedore-api")
            && attempts.len() == 2
            && attempts
                .iter()
                .all(|a| a.parent == caller_span && a.service == "stevedore-worker")
            && inside("run", "")
            && inside("finish", "retrying")
            && inside("finish", "succeeded")
    })
    .await;
    // A submit without a header: the attempt's parent is the submit span.
    spans_until(&spans, "an attempt below its submit span", |all| {
        all.iter().any(|a| {
            job_span(a, &dead, "1")
                && all
                    .iter()
                    .any(|s| s.name == "submit" && s.id == a.parent && s.trace == a.trace)
        })
    })
    .await;
    // A chain: the analyze child joins its scrape parent's trace, below the
    // scrape attempt that made it.
    let child: Value = http
        .get(format!("{api}/v1/jobs/{scraped}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let child_id = child["children"][0]["id"]
        .as_str()
        .expect("child")
        .to_owned();
    spans_until(&spans, "the chain's child in its parent's trace", |all| {
        all.iter().any(|c| {
            job_span(c, &child_id, "1")
                && c.trace == chain_trace
                && all
                    .iter()
                    .any(|p| job_span(p, &scraped, "1") && p.id == c.parent)
        })
    })
    .await;

    let api_log = procs[0].log();
    let probe_log = procs[3].log();
    drop(procs);
    drop_database(&db).await;
    assert!(
        missing.is_empty(),
        "rules or dashboards name metrics no role exports: {missing:?}"
    );
    assert!(
        wanted.contains("stevedore_http_requests_total"),
        "{wanted:?}"
    );

    // The JSON logs carry the ids the Loki pipeline extracts.
    let has = |log: &str, key: &str, value: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| {
                v["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|span| span[key] == value))
            })
    };
    assert!(
        has(&api_log, "request_id", "monitoring-rid-7"),
        "the request's span carries its id:\n{api_log}"
    );
    assert!(
        has(&probe_log, "job.id", &retried),
        "the failed attempt's log line carries the job id:\n{probe_log}"
    );
}
