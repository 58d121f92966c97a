//! The browser loader against real headless Chromium (Debian's package):
//! script-built pages, the `auto` fallback, every way a page can try to
//! reach a host it was not sent to (sub-requests, redirects, https tunnels,
//! WebSockets, beacons, WebRTC STUN, DNS rebinding), and a browser killed
//! mid-job.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use stevedore_handler::JobError;
use stevedore_netguard::{NetGuard, Resolve};
use stevedore_scrape::proxy::TcpDial;
use stevedore_scrape::{ScrapeConfig, ScrapeHandler};
use support::{assert_refused, fixtures, scrape, Canary};

fn config(allow: String) -> ScrapeConfig {
    let mut cfg = ScrapeConfig {
        allow_hosts: allow,
        ..ScrapeConfig::default()
    };
    cfg.browser.timeout = Duration::from_secs(20);
    cfg
}

fn handler(fixture_port: u16) -> ScrapeHandler {
    handler_with(
        config(format!("127.0.0.1:{fixture_port}")),
        &prometheus::Registry::new(),
    )
}

fn handler_with(cfg: ScrapeConfig, registry: &prometheus::Registry) -> ScrapeHandler {
    ScrapeHandler::new(cfg, registry).expect("handler")
}

/// The browser restarts counter, as the metrics endpoint would show it.
fn restarts(registry: &prometheus::Registry) -> f64 {
    registry
        .gather()
        .iter()
        .find(|m| m.name() == "stevedore_scrape_browser_restarts_total")
        .map(|m| m.get_metric()[0].get_counter().get_value())
        .unwrap_or_default()
}

/// What expected.json says a page holds; `correct` only where the page
/// itself states it, which neither of these pages does.
fn expected(page: &str) -> serde_json::Value {
    let mut all: serde_json::Value =
        serde_json::from_str(include_str!("../../../fixtures/quiz/expected.json")).expect("json");
    let mut questions = all[page]["questions"].take();
    for q in questions.as_array_mut().expect("questions") {
        q.as_object_mut().expect("question").remove("correct");
    }
    questions
}

#[tokio::test]
async fn script_built_pages_need_the_browser_and_auto_falls_back_to_it() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let h = handler(port);
    let spa = format!("http://127.0.0.1:{port}/spa");

    let (res, _) = scrape(&h, json!({"url": spa, "render": "http"})).await;
    assert!(
        matches!(res, Err(JobError::Permanent { ref message }) if message.contains("no questions")),
        "{res:?}"
    );
    for render in ["browser", "auto"] {
        let (res, _) = scrape(&h, json!({"url": spa, "render": render})).await;
        let out = res.expect("rendered in the browser");
        assert_eq!(out.rendered_with, "browser", "{render}");
        assert_eq!(
            serde_json::to_value(&out.questions).expect("json"),
            expected("spa-rendered.html"),
            "{render}"
        );
        assert_eq!(out.final_url, spa);
    }
    let (res, _) = scrape(
        &h,
        json!({"url": format!("http://127.0.0.1:{port}/moodle")}),
    )
    .await;
    assert_eq!(
        res.expect("moodle").rendered_with,
        "http",
        "auto tries HTTP first"
    );

    let (res, _) = scrape(
        &h,
        json!({"url": format!("http://127.0.0.1:{port}/moodle"), "render": "browser", "wait_for": "input[type=radio]"}),
    )
    .await;
    assert_eq!(
        serde_json::to_value(res.expect("moodle in the browser").questions).expect("json"),
        expected("moodle-multichoice.html")
    );
    let (res, _) = scrape(
        &h,
        json!({"url": format!("http://127.0.0.1:{port}/missing"), "render": "browser"}),
    )
    .await;
    assert!(
        matches!(res, Err(JobError::Permanent { ref message }) if message.contains("404")),
        "{res:?}"
    );
    assert_eq!(canary.reached().await, 0);
}

#[tokio::test]
async fn a_page_cannot_reach_the_canary_by_any_sub_request() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let h = handler(port);
    let (res, _) = scrape(
        &h,
        // A full render, so the image requests reach the proxy too.
        json!({"url": format!("http://127.0.0.1:{port}/leaky"), "render": "browser", "wait_for": "#done", "full_render": true}),
    )
    .await;
    let out = res.expect("the page itself loads");
    assert_eq!(out.questions.len(), 1);
    assert_eq!(canary.reached().await, 0, "nothing reached the canary");

    // The attempts were made, and the proxy is what stopped them.
    let refused: Vec<String> = h
        .browser()
        .refusals()
        .into_iter()
        .map(|r| r.target)
        .collect();
    let c = format!("127.0.0.1:{}", canary.port);
    for path in ["/img", "/frame", "/fetch", "/beacon"] {
        assert!(
            refused.contains(&format!("http://{c}{path}")),
            "{path} not refused: {refused:?}"
        );
    }
    assert!(
        refused.contains(&c),
        "no CONNECT (https, WebSocket) refused: {refused:?}"
    );
    assert!(
        refused.iter().any(|t| t.contains("localhost.")),
        "localhost. not refused: {refused:?}"
    );
}

#[tokio::test]
async fn redirects_to_the_canary_are_refused_over_http_and_https() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let h = handler(port);
    for path in ["to-canary", "to-canary-tls"] {
        let url = format!("http://127.0.0.1:{port}/{path}");
        let (res, _) = scrape(&h, json!({"url": url, "render": "browser"})).await;
        assert_refused(&url, &res);
    }
    assert_eq!(canary.reached().await, 0);
}

/// A DNS server that answers 127.0.0.1 a few times, then 127.0.0.2.
struct Rebinding {
    lookups: AtomicUsize,
    honest: usize,
}

#[async_trait]
impl Resolve for Rebinding {
    async fn resolve(&self, _: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let n = self.lookups.fetch_add(1, Ordering::SeqCst);
        let ip: IpAddr = if n < self.honest {
            "127.0.0.1"
        } else {
            "127.0.0.2"
        }
        .parse()
        .map_err(std::io::Error::other)?;
        Ok(vec![SocketAddr::new(ip, port)])
    }
}

fn rebinding_handler(allow: &str, honest: usize) -> ScrapeHandler {
    let resolver = Arc::new(Rebinding {
        lookups: AtomicUsize::new(0),
        honest,
    });
    let guard = Arc::new(NetGuard::with_resolver(allow, resolver));
    ScrapeHandler::with_guard(
        config(String::new()),
        &prometheus::Registry::new(),
        guard,
        Arc::new(TcpDial),
    )
    .expect("handler")
}

#[tokio::test]
async fn a_name_that_rebinds_connects_only_where_it_was_checked() {
    let site_canary = Canary::start().await;
    let port = fixtures(&site_canary).await;
    // The rebound address serves the same port on another loopback IP.
    let canary = Canary::on("127.0.0.2".parse().expect("ip"), port).await;
    let url = format!("http://rebind.test:{port}/rebind");

    // HTTP: one lookup, checked and pinned; the next lookup rebinds.
    let h = rebinding_handler(&format!("rebind.test:{port}"), 1);
    let (res, _) = scrape(&h, json!({"url": url, "render": "http"})).await;
    assert_eq!(
        res.expect("loaded from the checked address")
            .questions
            .len(),
        5
    );
    assert_eq!(canary.reached().await, 0, "pinned to the checked address");

    // Browser: an allowlisted address does not admit a name that resolves
    // to it. Under the old rule (`ip:port` entries matched resolved
    // addresses) the page's sub-request to rebind.test would have been let
    // through to 127.0.0.2.
    let h = rebinding_handler(&format!("127.0.0.1:{port},127.0.0.2:{port}"), 0);
    let page = format!("http://127.0.0.1:{port}/rebind");
    // A full render, so the page's image request reaches the proxy.
    let (res, _) = scrape(
        &h,
        json!({"url": page, "render": "browser", "full_render": true}),
    )
    .await;
    let refused = h.browser().refusals();
    assert_eq!(
        res.unwrap_or_else(|e| panic!("the page loads ({e:?}); refused: {refused:?}"))
            .questions
            .len(),
        5
    );
    assert!(
        refused
            .iter()
            .any(|r| r.target.ends_with("/after-rebinding")),
        "{refused:?}"
    );
    assert_eq!(
        canary.reached().await,
        0,
        "the rebound address was never dialed"
    );
    let (res, _) = scrape(&h, json!({"url": url, "render": "http"})).await;
    assert_refused("a name resolving to an allowlisted address", &res);
    assert_eq!(canary.reached().await, 0);
    assert_eq!(site_canary.reached().await, 0);
}

#[tokio::test]
async fn a_browser_killed_mid_job_fails_the_attempt_retryably_and_the_next_one_succeeds() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let registry = prometheus::Registry::new();
    let h = handler_with(config(format!("127.0.0.1:{port}")), &registry);
    let slow = json!({"url": format!("http://127.0.0.1:{port}/slow"), "render": "browser"});
    let job = {
        let h = h.clone();
        let slow = slow.clone();
        tokio::spawn(async move { scrape(&h, slow).await.0 })
    };
    let pid = loop {
        if let Some(pid) = h.browser().pid().await {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Mid-navigation: the page takes 3 s to answer.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let res = job.await.expect("join");
    assert!(
        matches!(res, Err(JobError::Retryable { ref message, .. }) if message.contains("crashed")),
        "{res:?}"
    );
    let (res, _) = scrape(&h, slow).await;
    assert_eq!(
        res.expect("the retry gets a new browser").questions.len(),
        5
    );
    assert_ne!(h.browser().pid().await, Some(pid));
    assert_eq!(restarts(&registry), 1.0);
}

#[tokio::test]
async fn a_browser_that_served_its_share_is_replaced() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let registry = prometheus::Registry::new();
    let mut cfg = config(format!("127.0.0.1:{port}"));
    cfg.browser.recycle_after = 2;
    let h = handler_with(cfg, &registry);
    let page = json!({"url": format!("http://127.0.0.1:{port}/moodle"), "render": "browser"});
    let mut pids = Vec::new();
    for _ in 0..3 {
        let (res, _) = scrape(&h, page.clone()).await;
        assert_eq!(res.expect("scraped").questions.len(), 5);
        pids.push(h.browser().pid().await.expect("a browser runs"));
    }
    assert_eq!(pids[0], pids[1], "reused while under its share");
    assert_ne!(pids[1], pids[2], "replaced after two pages");
    assert_eq!(restarts(&registry), 1.0);
    // The old browser is closed once its last page is done.
    let old = pids[0];
    let mut gone = false;
    for _ in 0..100 {
        gone = std::fs::read_to_string(format!("/proc/{old}/stat"))
            .map(|s| s.split_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the retired browser {old} still runs");
}

/// The browser's renderer processes now: each names the browser's profile.
fn renderers(profile: &std::path::Path) -> std::collections::BTreeSet<u32> {
    let profile = format!("--user-data-dir={}", profile.display());
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("--type=renderer") && cmdline.contains(&profile)
        })
        .collect()
}

#[tokio::test]
async fn a_job_costs_the_browser_one_renderer() {
    // Chromium gives every context a window whose omnibox popup is a WebUI
    // page with a renderer of its own, and a spare renderer for the
    // context's next navigation; both would be started for every job and
    // thrown away with its context.
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let h = handler(port);
    let moodle = format!("http://127.0.0.1:{port}/moodle");
    let (res, _) = scrape(&h, json!({"url": moodle, "render": "browser"})).await;
    assert_eq!(res.expect("warm-up").questions.len(), 5);
    let profile = h.browser().profile_dir().await.expect("a profile");
    let before = renderers(&profile);

    // The page stays open for a second and a half after its load, time
    // enough for anything started for the job to show up.
    let job = {
        let h = h.clone();
        tokio::spawn(async move {
            scrape(
                &h,
                json!({"url": moodle, "render": "browser", "wait_ms": 1500}),
            )
            .await
        })
    };
    let mut started = std::collections::BTreeSet::<u32>::new();
    while !job.is_finished() {
        started.extend(renderers(&profile).difference(&before).copied());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (res, _) = job.await.expect("job ran");
    assert_eq!(res.expect("scraped").questions.len(), 5);
    assert_eq!(
        started.len(),
        1,
        "renderers started for one job: {started:?}"
    );
}
