//! Webhooks against real receivers on 127.0.0.1 that verify every
//! signature with the independent `standardwebhooks` crate. On Postgres:
//! retries keep the `webhook-id`, 410 disables the endpoint, a hanging
//! receiver is timed out and retried, redirects are not followed, internal
//! URLs are refused, and a delivery that used up its schedule can be
//! retried. On both stores: secrets are sealed at rest (plain rows from
//! before still work) and a rotation re-encrypts them; endpoints are capped
//! per tenant, listed with user-info redacted and delivered to at most
//! `STEVEDORE_WEBHOOK_CONCURRENCY` at a time per host. A receiver's endless
//! answer is read only up to 64 KiB.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use stevedore::model::secret::Secret;
use stevedore::notifier::keyring::{self, Keyring, OpenError, ResealReport};
use stevedore::store::events::SecretOwner;
use support::{eventually, fast_notify, Flavor, Opts, TestFleet, TEST_WEBHOOK_KEY};

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

/// A receiver that counts requests verified under each path's secret and
/// how many were in flight at once; `slow` paths take 300 ms to answer.
#[derive(Default)]
struct Counting {
    secrets: Mutex<HashMap<String, String>>,
    verified: Mutex<HashMap<String, usize>>,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
}

impl Counting {
    fn expect(&self, path: &str, secret: &str) {
        let mut g = self.secrets.lock().expect("lock");
        g.insert(path.to_owned(), secret.to_owned());
    }
    fn verified(&self, path: &str) -> usize {
        self.verified
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

async fn count(
    State(r): State<Arc<Counting>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = r.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    r.max_inflight.fetch_max(now, Ordering::SeqCst);
    if path.starts_with("slow") {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    r.inflight.fetch_sub(1, Ordering::SeqCst);
    let secret = r.secrets.lock().expect("lock").get(&path).cloned();
    let ok = secret.is_some_and(|s| {
        standardwebhooks::Webhook::new(&s).is_ok_and(|w| w.verify(&body, &headers).is_ok())
    });
    if !ok {
        return StatusCode::UNAUTHORIZED;
    }
    *r.verified.lock().expect("lock").entry(path).or_default() += 1;
    StatusCode::OK
}

async fn counting_receiver() -> (Arc<Counting>, std::net::SocketAddr) {
    let r = Arc::new(Counting::default());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(count))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, addr)
}

async fn create(f: &TestFleet, url: &str) -> (reqwest::StatusCode, Value) {
    f.post(
        "/v1/webhooks",
        json!({"url": url, "events": ["job.succeeded"]}),
    )
    .await
}

async fn secrets_are_sealed_at_rest_and_a_rotation_reencrypts_them(flavor: Flavor) {
    let (r, addr) = counting_receiver().await;
    let f = TestFleet::start_with(
        flavor,
        Opts {
            notify: fast_notify(&addr.to_string()),
            ..Default::default()
        },
    )
    .await;
    let events = f.backend.events.clone();
    // A row written before secrets were sealed: plain text.
    let legacy = Secret::generate();
    events
        .create_webhook(
            "default",
            &format!("http://{addr}/legacy"),
            &legacy,
            &["job.succeeded".to_owned()],
            None,
            100,
        )
        .await
        .expect("legacy row")
        .expect("under the cap");
    r.expect("legacy", &legacy);
    let (s, v) = create(&f, &format!("http://{addr}/endpoint")).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
    let endpoint = v["secret"].as_str().expect("secret").to_owned();
    r.expect("endpoint", &endpoint);
    let own = Secret::generate();
    r.expect("job", &own);
    let hook = json!({"webhook": {"url": format!("http://{addr}/job"), "secret": own}});
    let job = f.probe(json!({}), hook).await;

    let stored = |owner| {
        let events = events.clone();
        async move {
            events
                .stored_secrets(owner, uuid::Uuid::nil(), 100)
                .await
                .expect("stored secrets")
                .into_iter()
                .map(|(_, s)| s)
                .collect::<Vec<_>>()
        }
    };
    let mut at_rest = stored(SecretOwner::Webhook).await;
    at_rest.extend(stored(SecretOwner::Job).await);
    assert_eq!(at_rest.len(), 3, "{at_rest:?}");
    for plain in [&endpoint, &own] {
        assert!(
            !at_rest.iter().any(|s| s.contains(plain.as_str())),
            "a new secret is not stored in plain text"
        );
    }
    assert!(at_rest.contains(&legacy), "the old row is as it was");
    assert_eq!(
        at_rest.iter().filter(|s| s.starts_with("enc:v1:")).count(),
        2
    );

    f.wait_status(job, "succeeded", 20).await;
    eventually(15, "each receiver got a verified delivery", || async {
        ["legacy", "endpoint", "job"]
            .iter()
            .all(|p| r.verified(p) == 1)
    })
    .await;

    // Rotation: a new key, the test fleet's as the previous one.
    let new_key = keyring::generate_key();
    let rotating =
        Keyring::from_settings(Some(new_key.as_str()), None, Some(TEST_WEBHOOK_KEY), None)
            .expect("keys");
    let report = keyring::reseal_all(events.as_ref(), &rotating)
        .await
        .expect("rotation");
    assert_eq!(
        report,
        ResealReport {
            resealed: 3,
            current: 0,
            unreadable: 0
        }
    );
    let again = keyring::reseal_all(events.as_ref(), &rotating)
        .await
        .expect("second pass");
    assert_eq!(
        (again.resealed, again.current),
        (0, 3),
        "nothing left to do"
    );
    let new_only = Keyring::from_settings(Some(new_key.as_str()), None, None, None).expect("key");
    let old_only = Keyring::from_settings(Some(TEST_WEBHOOK_KEY), None, None, None).expect("key");
    let mut opened: Vec<String> = Vec::new();
    for owner in [SecretOwner::Webhook, SecretOwner::Job] {
        for s in stored(owner).await {
            assert!(matches!(old_only.open(&s), Err(OpenError::UnknownKey(_))));
            opened.push(new_only.open(&s).expect("opens under the new key alone"));
        }
    }
    opened.sort();
    let mut want = vec![legacy, endpoint, own];
    want.sort();
    assert_eq!(opened, want);
    f.shutdown().await;
}

async fn endpoints_are_capped_listed_redacted_and_limited_per_host(flavor: Flavor) {
    let (r, addr) = counting_receiver().await;
    let mut notify = fast_notify(&addr.to_string());
    notify.webhook_concurrency = 1;
    notify.webhook_max_per_tenant = 3;
    let f = TestFleet::start_with(
        flavor,
        Opts {
            notify,
            ..Default::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for (path, url) in [
        ("slow-a", format!("http://{addr}/slow-a")),
        ("slow-b", format!("http://user:hunter2@{addr}/slow-b")),
        ("slow-c", format!("http://{addr}/slow-c")),
    ] {
        let (s, v) = create(&f, &url).await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
        assert!(!v["url"].as_str().expect("url").contains("hunter2"), "{v}");
        r.expect(path, v["secret"].as_str().expect("secret"));
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    let (s, v) = create(&f, &format!("http://{addr}/d")).await;
    assert_eq!(s, reqwest::StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "webhook_limit", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("STEVEDORE_WEBHOOK_MAX_PER_TENANT")),
        "{v}"
    );

    let (_, list) = f.get("/v1/webhooks").await;
    let urls: Vec<&str> = list["webhooks"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["url"].as_str())
        .collect();
    assert!(
        urls.contains(&format!("http://***@{addr}/slow-b").as_str()),
        "{urls:?}"
    );
    assert!(!list.to_string().contains("hunter2"), "{list}");

    // One event, three URLs on one host: with a limit of one per host the
    // receiver never sees two requests at once.
    let job = f.probe(json!({}), json!({})).await;
    f.wait_status(job, "succeeded", 20).await;
    eventually(15, "all three delivered", || async {
        ["slow-a", "slow-b", "slow-c"]
            .iter()
            .all(|p| r.verified(p) == 1)
    })
    .await;
    assert_eq!(
        r.max_inflight.load(Ordering::SeqCst),
        1,
        "the host's limit is shared by its URLs"
    );
    let (_, ds) = f.get("/v1/webhook-deliveries").await;
    assert!(!ds.to_string().contains("hunter2"), "{ds}");

    assert_eq!(
        f.delete(&format!("/v1/webhooks/{}", ids[2])).await,
        reqwest::StatusCode::NO_CONTENT
    );
    let (s, v) = create(&f, &format!("http://{addr}/d")).await;
    assert_eq!(
        s,
        reqwest::StatusCode::CREATED,
        "a freed place can be taken: {v}"
    );
    f.shutdown().await;
}

both_flavors!(
    secrets_are_sealed_at_rest_and_a_rotation_reencrypts_them,
    endpoints_are_capped_listed_redacted_and_limited_per_host
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_read_only_up_to_64_kib() {
    static CHUNK: [u8; 16 * 1024] = [b'x'; 16 * 1024];
    let sent = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/endless",
        axum::routing::post({
            let sent = sent.clone();
            move || {
                let sent = sent.clone();
                async move {
                    let body = futures::stream::repeat_with(move || {
                        sent.fetch_add(CHUNK.len(), Ordering::SeqCst);
                        Ok::<_, std::io::Error>(Bytes::from_static(&CHUNK))
                    });
                    axum::body::Body::from_stream(body)
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut notify = fast_notify(&addr.to_string());
    // Far longer than the test waits: reading to the end would hit it.
    notify.webhook_timeout_secs = 60.0;
    let f = TestFleet::start_with(
        Flavor::Sqlite,
        Opts {
            notify,
            ..Default::default()
        },
    )
    .await;
    let (s, v) = create(&f, &format!("http://{addr}/endless")).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
    let job = f.probe(json!({}), json!({})).await;
    f.wait_status(job, "succeeded", 20).await;
    eventually(
        10,
        "delivered without reading the answer to its end",
        || async {
            let (_, v) = f.get("/v1/webhook-deliveries?status=delivered").await;
            v["deliveries"].as_array().is_some_and(|d| d.len() == 1)
        },
    )
    .await;
    // What the receiver got written before the connection closed: the 64
    // KiB read plus what the loopback socket buffers held, never more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = sent.load(Ordering::SeqCst);
    assert!(n < 32 << 20, "the receiver wrote {n} bytes");
    f.shutdown().await;
}

/// `stevedore webhooks rotate-key` on the dev-mode SQLite file, as an
/// operator runs it: with the new key and the old one as previous it
/// re-encrypts; with a key that opens nothing it says so and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_reencrypts_the_dev_file_from_the_command_line() {
    // Nothing listens there: only the stored secret matters.
    let f = TestFleet::start_with(
        Flavor::Sqlite,
        Opts {
            notify: fast_notify("127.0.0.1:9"),
            ..Default::default()
        },
    )
    .await;
    let (s, v) = create(&f, "http://127.0.0.1:9/x").await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");
    let dir = f.data_dir().to_string_lossy().into_owned();
    let new_key = keyring::generate_key();
    let rotate = |key: &str, previous: &str| {
        let env = [
            // Not the test's Postgres: the dev file in --data-dir.
            ("DATABASE_URL", String::new()),
            ("STEVEDORE_WEBHOOK_KEY", key.to_owned()),
            ("STEVEDORE_WEBHOOK_KEY_PREVIOUS", previous.to_owned()),
        ];
        let dir = dir.clone();
        async move {
            support::procs::run_stevedore(&["webhooks", "rotate-key", "--data-dir", &dir], &env)
                .await
        }
    };
    let out = rotate(&new_key, TEST_WEBHOOK_KEY).await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("re-encrypted 1, already current 0, unreadable 0"),
        "{}",
        out.stdout
    );
    let out = rotate(&keyring::generate_key(), "").await;
    assert!(!out.ok, "a secret no key opens fails the command");
    assert!(out.stdout.contains("unreadable 1"), "{}", out.stdout);
    f.shutdown().await;
}
