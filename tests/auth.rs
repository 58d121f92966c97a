//! Who may do what, from outside: keys made with `stevedore keys` as the
//! README types it, two real `stevedore api` processes on Postgres + Redis,
//! and every answer a client gets: 401 without a key, with a wrong one and
//! with a revoked one (on both processes within seconds), 403 when a key's
//! scope is too small, 415 for a non-JSON POST, the stream refused to a
//! foreign web page, security headers, and no key or secret in the logs.
//! Also the refusals at start: `stevedore api` without a secret or without
//! a key, and `stevedore dev` on a non-loopback address.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::procs::{free_port, run_stevedore, wait_port, Out, Proc};
use support::{drop_database, eventually, fresh_pg_database, redis_url};
use uuid::Uuid;

const SECRET: &str = "test-auth-secret-0123456789abcdef0123456789";

async fn stevedore(args: &[&str], env: &[(&str, String)]) -> Out {
    run_stevedore(args, env).await
}

/// `stevedore keys create`; returns (id, key) from its `--json` output and
/// checks the text form prints the key alone on stdout.
async fn create_key(env: &[(&str, String)], tenant: &str, scope: &str) -> (String, String) {
    let out = stevedore(
        &[
            "keys", "create", "--tenant", tenant, "--scope", scope, "--json",
        ],
        env,
    )
    .await;
    assert!(out.ok, "keys create: {}", out.stderr);
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let key = v["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("sk_") && key.len() >= 46, "{key}");
    (v["id"].as_str().expect("id").to_owned(), key)
}

fn base_env(db: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.to_owned()),
        ("REDIS_URL", redis_url().to_owned()),
        (
            "STEVEDORE_REDIS_PREFIX",
            format!("sdt:{}", Uuid::now_v7().simple()),
        ),
    ]
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method, url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scopes_and_revocation_hold_on_every_api_process() {
    let db = fresh_pg_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = base_env(&db);
    env.push(("STEVEDORE_AUTH_SECRET", SECRET.to_owned()));

    let (read_id, read) = create_key(&env, "acme", "read").await;
    let (_, submit) = create_key(&env, "acme", "submit").await;
    let (_, admin) = create_key(&env, "acme", "admin").await;
    // The text form shows the key once, on stdout, and nothing else there.
    let out = stevedore(
        &[
            "keys", "create", "--tenant", "acme", "--scope", "read", "--name", "ci",
        ],
        &env,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.trim().starts_with("sk_") && out.stdout.trim().lines().count() == 1);
    assert!(out.stderr.contains("shown once"), "{}", out.stderr);

    let ports = [free_port(), free_port()];
    let mut env_api = env.clone();
    env_api.push(("STEVEDORE_LOG", "debug".to_owned()));
    env_api.push(("STEVEDORE_METRICS_TOKEN", "scrape-token-1".to_owned()));
    let apis: Vec<Proc> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let listen = format!("127.0.0.1:{p}");
            Proc::stevedore(
                &["api", "--listen", &listen],
                &env_api,
                dir.path(),
                &format!("api-{i}"),
            )
        })
        .collect();
    for p in ports {
        wait_port(p, 60).await;
    }
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let url = &urls[0];
    let http = reqwest::Client::new();
    use reqwest::Method as M;

    // No key, a made-up key, a key that is not a bearer token: 401 JSON.
    let (s, v) = call(&http, M::GET, &format!("{url}/v1/jobs"), None, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized")),
        "{v}"
    );
    let fake = format!("sk_{}", "A".repeat(43));
    let (s, _) = call(&http, M::GET, &format!("{url}/v1/jobs"), Some(&fake), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let r = http
        .get(format!("{url}/v1/stats"))
        .header("authorization", format!("Basic {read}"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    // Health and the pages need no key.
    let (s, _) = call(&http, M::GET, &format!("{url}/healthz"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    // /metrics takes its scrape token, not an API key.
    let metrics = format!("{url}/metrics");
    let (s, v) = call(&http, M::GET, &metrics, None, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, _) = call(&http, M::GET, &metrics, Some(&read), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "an API key is not the token");
    let r = http
        .get(&metrics)
        .bearer_auth("scrape-token-1")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r
        .text()
        .await
        .unwrap_or_default()
        .contains("stevedore_http_requests_total"));

    // Scopes: read reads, submit submits and cancels, admin administers.
    let job = json!({"kind": "probe", "payload": {}, "run_at": "2099-01-01T00:00:00Z"});
    let (s, v) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs"),
        Some(&read),
        Some(job.clone()),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("submit"),
        "{v}"
    );
    let (s, v) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs"),
        Some(&submit),
        Some(job),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    let (s, v) = call(
        &http,
        M::GET,
        &format!("{url}/v1/jobs/{id}"),
        Some(&read),
        None,
    )
    .await;
    assert_eq!((s, v["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
    let (s, _) = call(
        &http,
        M::GET,
        &format!("{url}/v1/webhooks"),
        Some(&submit),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(
        &http,
        M::GET,
        &format!("{url}/v1/webhooks"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &http,
        M::GET,
        &format!("{url}/v1/dead-letters"),
        Some(&read),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "reading dead letters is a read");
    let replay = format!("{url}/v1/dead-letters/{id}/replay");
    let (s, _) = call(&http, M::POST, &replay, Some(&submit), Some(json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "replaying is an admin's");
    let (s, v) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs/{id}/cancel"),
        Some(&submit),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );

    // A POST that is not JSON is refused before anything else, with a key
    // or without: a form on another site cannot send JSON.
    for key in [Some(&submit), None] {
        let mut req = http
            .post(format!("{url}/v1/jobs"))
            .header("content-type", "text/plain")
            .body(r#"{"kind": "probe", "payload": {}}"#);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.expect("request");
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    // The streams: a foreign web page is refused, the API's own page and
    // clients that are not browsers (no Origin) are let in.
    for path in ["/v1/events", "/v1/stream"] {
        let r = http
            .get(format!("{url}{path}"))
            .bearer_auth(&read)
            .header("origin", "https://evil.example")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let r = http
        .get(format!("{url}/v1/events"))
        .bearer_auth(&read)
        .header("origin", url.as_str())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);

    // A browser page opens the stream with a ticket its read key bought.
    let (s, t) = call(
        &http,
        M::POST,
        &format!("{url}/v1/stream-tickets"),
        Some(&read),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let ticket = t["ticket"].as_str().expect("ticket").to_owned();
    assert!(
        !ticket.contains(&read[3..]),
        "a ticket does not carry the key"
    );
    let r = http
        .get(format!("{url}/v1/events"))
        .query(&[("ticket", ticket.as_str())])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK, "ticket opens the stream");
    drop(r);
    let r = http
        .get(format!("{}/v1/events", urls[1]))
        .query(&[("ticket", ticket.as_str())])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK, "on every API process");
    drop(r);
    let forged = ticket.replacen("tk_", "tk_0", 1);
    for (path, t) in [
        ("/v1/events", forged.as_str()),
        ("/v1/jobs", ticket.as_str()),
    ] {
        let r = http
            .get(format!("{url}{path}"))
            .query(&[("ticket", t)])
            .send()
            .await
            .expect("request");
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path}: forged, or not a stream"
        );
    }

    // Security headers on the page and on the API's answers.
    for path in ["/", "/v1/stats"] {
        let r = http
            .get(format!("{url}{path}"))
            .bearer_auth(&read)
            .send()
            .await
            .expect("request");
        let h = r.headers();
        let csp = h
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok());
        assert!(
            csp.is_some_and(
                |c| c.contains("default-src 'self'") && c.contains("frame-ancestors 'none'")
            ),
            "{path}: {h:?}"
        );
        assert_eq!(
            h.get("x-content-type-options")
                .and_then(|v| v.to_str().ok()),
            Some("nosniff")
        );
        assert!(h.get("referrer-policy").is_some());
    }

    // A key with a rate: 5 requests an hour across both processes, then
    // 429 with Retry-After and the RateLimit headers.
    let out = stevedore(
        &[
            "keys", "create", "--tenant", "acme", "--scope", "read", "--rate", "5/h", "--json",
        ],
        &env,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let slow = v["key"].as_str().expect("key").to_owned();
    let mut answers = Vec::new();
    for i in 0..8 {
        let r = http
            .get(format!("{}/v1/stats", urls[i % 2]))
            .bearer_auth(&slow)
            .send()
            .await
            .expect("request");
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        answers.push((
            r.status(),
            h("retry-after"),
            h("ratelimit-policy"),
            h("ratelimit"),
        ));
    }
    let ok = answers.iter().filter(|a| a.0 == StatusCode::OK).count();
    assert_eq!(ok, 5, "shared by both processes: {answers:?}");
    for a in &answers {
        assert_eq!(a.2.as_deref(), Some("5;w=3600"), "{a:?}");
        if a.0 == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                a.1.as_deref()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| (1..=3600).contains(&s)),
                "{a:?}"
            );
            assert!(
                a.3.as_deref().is_some_and(|s| s.contains("remaining=0")),
                "{a:?}"
            );
        }
    }
    assert_eq!(answers[7].0, StatusCode::TOO_MANY_REQUESTS);
    let (s, _) = call(&http, M::GET, &format!("{url}/v1/stats"), Some(&read), None).await;
    assert_eq!(s, StatusCode::OK, "other keys are not limited by it");

    // A key capped at 3 waiting jobs in its tenant: a batch that would
    // pass the cap is refused whole, with 429 and Retry-After.
    let out = stevedore(
        &[
            "keys",
            "create",
            "--tenant",
            "capped",
            "--scope",
            "submit",
            "--max-queued",
            "3",
            "--json",
        ],
        &env,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let capped = v["key"].as_str().expect("key").to_owned();
    let later = json!({"kind": "probe", "payload": {}, "run_at": "2099-01-01T00:00:00Z"});
    let two = json!({"jobs": [later.clone(), later.clone()]});
    let (s, v) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs/batch"),
        Some(&capped),
        Some(two.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let r = http
        .post(format!("{url}/v1/jobs/batch"))
        .bearer_auth(&capped)
        .json(&two)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "queue_full", "{v}");
    let (s, _) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs"),
        Some(&capped),
        Some(later.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "the third fits");
    let (s, _) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs"),
        Some(&capped),
        Some(later),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "the fourth does not");
    let (_, stats) = call(
        &http,
        M::GET,
        &format!("{url}/v1/stats"),
        Some(&capped),
        None,
    )
    .await;
    assert_eq!(
        stats["counts"]["queued"], 3,
        "nothing of a refused batch was kept: {stats}"
    );

    // Revoked with the CLI: refused by both processes within seconds.
    for u in &urls {
        let (s, _) = call(&http, M::GET, &format!("{u}/v1/stats"), Some(&read), None).await;
        assert_eq!(s, StatusCode::OK, "warm the cache first");
    }
    let out = stevedore(&["keys", "revoke", &read_id], &env).await;
    assert!(out.ok, "{}", out.stderr);
    let out = stevedore(&["keys", "revoke", &read_id], &env).await;
    assert!(
        !out.ok && out.stderr.contains("no live key"),
        "revoking twice: {}",
        out.stderr
    );
    for u in &urls {
        eventually(10, "revoked key refused", || async {
            call(&http, M::GET, &format!("{u}/v1/stats"), Some(&read), None)
                .await
                .0
                == StatusCode::UNAUTHORIZED
        })
        .await;
    }
    let (s, _) = call(
        &http,
        M::GET,
        &format!("{url}/v1/stats"),
        Some(&submit),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "other keys go on working");

    // The list shows keys apart without showing them.
    let out = stevedore(&["keys", "list"], &env).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains(&read_id) && out.stdout.contains("revoked"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&read[..9]),
        "prefix shown: {}",
        out.stdout
    );

    // Neither a key nor the secret is ever logged, even at debug.
    let logs: String = apis.iter().map(Proc::log).collect();
    assert!(logs.contains("/v1/stats"), "the logs were captured: {logs}");
    for secret in [
        read.as_str(),
        submit.as_str(),
        admin.as_str(),
        &read[3..],
        SECRET,
    ] {
        assert!(!logs.contains(secret), "a secret is in the logs");
    }
    drop(apis);
    drop_database(&db).await;
}

/// Reads an SSE stream for `secs` and returns what arrived.
async fn sse_text(http: &reqwest::Client, url: &str, key: &str, secs: u64) -> String {
    let mut r = http.get(url).bearer_auth(key).send().await.expect("stream");
    assert_eq!(r.status(), StatusCode::OK);
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, r.chunk()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_none_of_another_tenants_jobs_events_or_webhooks() {
    let db = fresh_pg_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = base_env(&db);
    env.push(("STEVEDORE_AUTH_SECRET", SECRET.to_owned()));
    let (_, a) = create_key(&env, "tenant-a", "admin").await;
    let (_, b) = create_key(&env, "tenant-b", "admin").await;
    // Registering a loopback receiver needs it allowed; nothing is sent.
    env.push(("STEVEDORE_WEBHOOK_ALLOW_HOSTS", "127.0.0.1:9".to_owned()));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let api = Proc::stevedore(
        &["api", "--listen", &format!("127.0.0.1:{port}")],
        &env,
        dir.path(),
        "api",
    );
    // The streams follow the notifier's cursor.
    let notifier = Proc::stevedore(&["notifier"], &env, dir.path(), "notifier");
    wait_port(port, 60).await;
    let http = reqwest::Client::new();
    use reqwest::Method as M;

    let later = json!({"kind": "probe", "payload": {}, "run_at": "2099-01-01T00:00:00Z", "idempotency_key": "k-1"});
    let (s, v) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs"),
        Some(&a),
        Some(later.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    // The same idempotency key is B's own: a new job, not A's.
    let (s, v) = call(
        &http,
        M::POST,
        &format!("{url}/v1/jobs"),
        Some(&b),
        Some(later),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_ne!(v["id"].as_str(), Some(id.as_str()));
    let b_job = v["id"].as_str().expect("id").to_owned();

    // Every route answers B as if A's job did not exist.
    for (method, path, body) in [
        (M::GET, format!("/v1/jobs/{id}"), None),
        (M::GET, format!("/v1/jobs/{id}/events"), None),
        (M::POST, format!("/v1/jobs/{id}/cancel"), Some(json!({}))),
        (M::GET, format!("/v1/dead-letters/{id}"), None),
        (
            M::POST,
            format!("/v1/dead-letters/{id}/replay"),
            Some(json!({})),
        ),
        (M::DELETE, format!("/v1/dead-letters/{id}"), None),
    ] {
        let mut req = http
            .request(method.clone(), format!("{url}{path}"))
            .bearer_auth(&b);
        req = match body {
            Some(b) => req.json(&b),
            None => req.header("content-type", "application/json"),
        };
        let r = req.send().await.expect("request");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {path}");
    }
    let (s, v) = call(
        &http,
        M::GET,
        &format!("{url}/v1/jobs/{id}"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(
        (s, v["tenant"].as_str()),
        (StatusCode::OK, Some("tenant-a")),
        "{v}"
    );
    let (_, page) = call(&http, M::GET, &format!("{url}/v1/jobs"), Some(&b), None).await;
    let listed: Vec<&str> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(listed, vec![b_job.as_str()], "B lists only its own job");
    let (_, stats) = call(&http, M::GET, &format!("{url}/v1/stats"), Some(&b), None).await;
    assert_eq!(stats["counts"]["queued"], 1, "{stats}");

    // Webhooks: B neither sees nor removes A's.
    let (s, hook) = call(
        &http,
        M::POST,
        &format!("{url}/v1/webhooks"),
        Some(&a),
        Some(json!({"url": "http://127.0.0.1:9/hook"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{hook}");
    let hook_id = hook["id"].as_str().expect("id").to_owned();
    let (_, list) = call(&http, M::GET, &format!("{url}/v1/webhooks"), Some(&b), None).await;
    assert_eq!(list["webhooks"].as_array().map(Vec::len), Some(0), "{list}");
    let (s, _) = call(
        &http,
        M::DELETE,
        &format!("{url}/v1/webhooks/{hook_id}"),
        Some(&b),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list) = call(&http, M::GET, &format!("{url}/v1/webhooks"), Some(&a), None).await;
    assert_eq!(list["webhooks"].as_array().map(Vec::len), Some(1), "{list}");

    // Streams: each tenant's history holds its own job only.
    let a_seen = sse_text(&http, &format!("{url}/v1/events?recent=100"), &a, 2).await;
    let b_seen = sse_text(&http, &format!("{url}/v1/events?recent=100"), &b, 2).await;
    assert!(a_seen.contains(&id) && !a_seen.contains(&b_job), "{a_seen}");
    assert!(b_seen.contains(&b_job) && !b_seen.contains(&id), "{b_seen}");
    drop(notifier);
    drop(api);
    drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_will_not_serve_without_keys_unless_told_to() {
    let db = fresh_pg_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = base_env(&db);
    let listen = format!("127.0.0.1:{}", free_port());

    let mut p = Proc::stevedore(&["api", "--listen", &listen], &env, dir.path(), "no-secret");
    assert!(!p.wait_exit(60).await.success());
    let log = p.log();
    assert!(
        log.contains("STEVEDORE_AUTH_SECRET") && log.contains("--insecure-no-auth"),
        "{log}"
    );

    let mut with_secret = env.clone();
    with_secret.push(("STEVEDORE_AUTH_SECRET", SECRET.to_owned()));
    let mut p = Proc::stevedore(
        &["api", "--listen", &listen],
        &with_secret,
        dir.path(),
        "no-key",
    );
    assert!(!p.wait_exit(60).await.success());
    let log = p.log();
    assert!(
        log.contains("no API key exists") && log.contains("stevedore keys create"),
        "{log}"
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let p = Proc::stevedore(
        &["api", "--insecure-no-auth", "--listen", &listen],
        &env,
        dir.path(),
        "insecure",
    );
    wait_port(port, 60).await;
    let r = reqwest::Client::new()
        .get(format!("http://{listen}/v1/stats"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK, "open without keys when told");
    eventually(10, "the warning is logged", || async {
        p.log().contains("Serving without API keys")
    })
    .await;
    drop(p);

    // Dev mode has no keys, so it stays on loopback.
    let out = stevedore(
        &[
            "dev",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            &dir.path().join("dev").display().to_string(),
        ],
        &[],
    )
    .await;
    assert!(!out.ok && out.stderr.contains("loopback"), "{}", out.stderr);
    drop_database(&db).await;
}
