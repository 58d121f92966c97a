//! WebRTC from inside a page: Stevedore's browser gathers no UDP ICE
//! candidate, while the same Chromium started with only
//! `--force-webrtc-ip-handling-policy=disable_non_proxied_udp` (how
//! Playwright users usually write it, which Chromium reads as a bare switch
//! without a policy) still gathers UDP host candidates. The page has no ICE
//! server, so gathering sends nothing.

mod support;

use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use futures::StreamExt;
use serde_json::json;
use stevedore_scrape::{ScrapeConfig, ScrapeHandler};
use support::{fixtures, scrape, Canary};

fn counts(title: &str) -> (u32, u32) {
    let get = |key: &str| {
        title
            .split(' ')
            .find_map(|kv| kv.strip_prefix(key)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {title:?}"))
    };
    (get("udp="), get("tcp="))
}

#[tokio::test]
async fn stevedores_browser_gathers_no_udp_candidate_where_the_playwright_flag_does() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let url = format!("http://127.0.0.1:{port}/webrtc");
    let mut cfg = ScrapeConfig {
        allow_hosts: format!("127.0.0.1:{port}"),
        ..ScrapeConfig::default()
    };
    cfg.browser.timeout = Duration::from_secs(20);
    let chrome = cfg.browser.chrome.clone();
    let h = ScrapeHandler::new(cfg, &prometheus::Registry::new()).expect("handler");
    let (res, _) = scrape(
        &h,
        json!({"url": url, "render": "browser", "wait_for": "#done"}),
    )
    .await;
    let title = res.expect("scraped").title;
    assert_eq!(counts(&title).0, 0, "Stevedore's browser: {title}");

    // The control: plain Chromium with the flag alone. mDNS obfuscation is
    // off so host candidates are not announced on the network.
    let profile = tempfile::tempdir().expect("profile");
    let config = BrowserConfig::builder()
        .chrome_executable(chrome)
        .user_data_dir(profile.path())
        .no_sandbox()
        .args([
            "force-webrtc-ip-handling-policy=disable_non_proxied_udp",
            "disable-features=WebRtcHideLocalIpsWithMdns",
        ])
        .build()
        .expect("config");
    let (mut browser, mut handler) = Browser::launch(config).await.expect("control browser");
    let events = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser.new_page(url.as_str()).await.expect("page");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let title = loop {
        let t = page.get_title().await.expect("title").unwrap_or_default();
        if t.starts_with("udp=") || tokio::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = browser.close().await;
    let _ = browser.wait().await;
    events.abort();
    assert!(counts(&title).0 > 0, "the flag alone: {title}");
    assert_eq!(canary.reached().await, 0);
}
