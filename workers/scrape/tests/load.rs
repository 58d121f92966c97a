//! Loading through the SSRF guard against real servers on loopback: the
//! fixture server is allowlisted, a canary server is not, and no refused
//! request may ever reach the canary (checked on its connection counter,
//! not only on the error). Error classes and the analyze chain too.

mod support;

use std::time::Duration;

use stevedore_handler::{parse_payload, JobError};
use stevedore_netguard::NetGuard;
use stevedore_scrape::load::{load, LoadConfig, LoadError};
use stevedore_scrape::{ScrapeConfig, ScrapeHandler, ScrapePayload};
use support::{assert_refused, fixtures, scrape, Canary};

fn handler(fixture_port: u16) -> ScrapeHandler {
    let cfg = ScrapeConfig {
        allow_hosts: format!("127.0.0.1:{fixture_port}"),
        ..ScrapeConfig::default()
    };
    ScrapeHandler::new(cfg, &prometheus::Registry::new()).expect("handler")
}

#[tokio::test]
async fn internal_addresses_in_every_spelling_are_refused_and_never_reached() {
    let canary = Canary::start().await;
    let cport = canary.port;
    let fport = fixtures(&canary).await;
    let h = handler(fport);
    for host in [
        "127.0.0.1",
        "127.1",
        "0x7f000001",
        "2130706433",
        "0.0.0.0",
        "localhost.",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ] {
        let url = format!("http://{host}:{cport}/");
        for render in ["http", "browser"] {
            let (res, _) = scrape(&h, serde_json::json!({"url": url, "render": render})).await;
            assert_refused(&format!("{url} ({render})"), &res);
        }
    }
    let (res, _) = scrape(
        &h,
        serde_json::json!({"url": format!("http://127.0.0.1:{fport}/to-canary")}),
    )
    .await;
    assert!(
        matches!(res, Err(JobError::Permanent { ref message }) if message.contains("refused")),
        "{res:?}"
    );
    let guard = NetGuard::new(&format!("127.0.0.1:{fport}"));
    let cfg = LoadConfig {
        timeout: Duration::from_secs(5),
        max_bytes: 1024,
    };
    for url in [
        "file:///etc/passwd".to_owned(),
        format!("gopher://127.0.0.1:{cport}/"),
    ] {
        assert!(
            matches!(load(&guard, &url, &cfg).await, Err(LoadError::Refused(_))),
            "{url}"
        );
    }
    assert_eq!(canary.reached().await, 0, "the canary was never reached");
}

#[tokio::test]
async fn a_quiz_page_is_scraped_and_chains_an_analyze_job() {
    let canary = Canary::start().await;
    let fport = fixtures(&canary).await;
    let h = handler(fport);
    let url = format!("http://127.0.0.1:{fport}/to-moodle");
    let (res, ctx) = scrape(
        &h,
        serde_json::json!({"url": url, "then": {"kind": "analyze", "provider": "local"}}),
    )
    .await;
    let out = res.expect("scraped");
    assert_eq!(
        out.final_url,
        format!("http://127.0.0.1:{fport}/moodle"),
        "the redirect was followed"
    );
    assert_eq!(out.rendered_with, "http");
    assert_eq!(out.questions.len(), 5);
    assert!(out.title.starts_with("Quiz 3"));
    let children = ctx.take_children();
    assert_eq!(children.len(), 1);
    assert_eq!(children[0].kind, "analyze");
    assert_eq!(children[0].payload["provider"], "local");
    assert_eq!(
        children[0].payload["questions"].as_array().map(Vec::len),
        Some(5)
    );
}

#[tokio::test]
async fn load_errors_are_classified() {
    let canary = Canary::start().await;
    let cport = canary.port;
    let fport = fixtures(&canary).await;
    let h = handler(fport);
    let url = |p: &str| format!("http://127.0.0.1:{fport}/{p}");
    let (res, _) = scrape(&h, serde_json::json!({"url": url("missing")})).await;
    assert!(
        matches!(res, Err(JobError::Permanent { .. })),
        "404 is permanent: {res:?}"
    );
    let (res, _) = scrape(&h, serde_json::json!({"url": url("broken")})).await;
    assert!(
        matches!(res, Err(JobError::Retryable { .. })),
        "5xx is retryable: {res:?}"
    );
    let (res, _) = scrape(&h, serde_json::json!({"url": url("busy")})).await;
    assert_eq!(
        res.err(),
        Some(JobError::retry_after(
            format!("HTTP 429 from {}", url("busy")),
            Duration::from_secs(7)
        ))
    );
    let (res, _) = scrape(&h, serde_json::json!({"url": url("empty")})).await;
    assert!(
        matches!(res, Err(JobError::Permanent { ref message }) if message.contains("no questions")),
        "{res:?}"
    );
    let guard = NetGuard::new(&format!("127.0.0.1:{fport}"));
    let small = LoadConfig {
        timeout: Duration::from_secs(5),
        max_bytes: 1024,
    };
    assert!(matches!(
        load(&guard, &url("huge"), &small).await,
        Err(LoadError::TooLarge(1024))
    ));
    let (res, _) = scrape(
        &h,
        serde_json::json!({"url": format!("http://127.0.0.1:{cport}/"), "render": "auto"}),
    )
    .await;
    assert!(res.is_err());
}

#[test]
fn bad_payloads_name_their_field() {
    let e = parse_payload::<ScrapePayload>(&serde_json::json!({"url": "ftp://x/"}))
        .expect_err("scheme");
    assert_eq!(e.field, "url");
    let e =
        parse_payload::<ScrapePayload>(&serde_json::json!({"url": "http://x/", "wait_ms": 40000}))
            .expect_err("wait");
    assert_eq!(e.field, "wait_ms");
    let e = parse_payload::<ScrapePayload>(
        &serde_json::json!({"url": "http://x/", "render": "chrome"}),
    )
    .expect_err("render");
    assert_eq!(e.field, "render");
}
