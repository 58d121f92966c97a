//! Headless Chromium for the page tests (tests/display.rs, tests/console.rs):
//! launches Debian's `chromium` (`CHROME` overrides; scripts/services.sh
//! installs it) through chromiumoxide, reads what the page shows with small
//! script expressions, waits for it with a deadline, and saves screenshots
//! when `STEVEDORE_SCREENSHOTS` names a directory (e.g. `docs`).

#![allow(dead_code)]

use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub struct Chromium {
    pub browser: Browser,
    handler: tokio::task::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// A browser whose pages are `width`×`height` CSS pixels.
    pub async fn launch(width: u32, height: u32) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let chrome = std::env::var("CHROME").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let config = BrowserConfig::builder()
            .chrome_executable(chrome)
            .user_data_dir(profile.path())
            .no_sandbox()
            .window_size(width, height)
            .viewport(Viewport {
                width,
                height,
                device_scale_factor: Some(1.0),
                ..Viewport::default()
            })
            .args([
                "disable-gpu",
                "disable-background-networking",
                "disable-component-update",
                "no-first-run",
                "no-default-browser-check",
                "disable-sync",
                "disable-domain-reliability",
                "disable-client-side-phishing-detection",
                "disable-features=Translate,OptimizationHints,MediaRouter,NetworkTimeServiceQuerying",
                // Anything but the loopback page under test goes to a port
                // nobody listens on: tests talk to loopback only.
                "proxy-server=http://127.0.0.1:9",
            ])
            .build()
            .expect("browser config");
        let (browser, mut handler) = Browser::launch(config)
            .await
            .expect("chromium starts (scripts/services.sh installs it)");
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Self {
            browser,
            handler,
            _profile: profile,
        }
    }

    /// A new tab showing `url`, once its document has loaded.
    pub async fn open(&self, url: &str) -> Page {
        let page = self.browser.new_page(url).await.expect("open page");
        page.wait_for_navigation().await.expect("page loads");
        page
    }

    pub async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
        self.handler.abort();
    }
}

/// Evaluates `js` (an expression) in the page and returns its value,
/// passed through JSON so any plain structure comes back.
pub async fn eval<T: DeserializeOwned>(page: &Page, js: &str) -> T {
    let wrapped = format!("JSON.stringify(({js}) ?? null)");
    let text: String = page
        .evaluate(wrapped.as_str())
        .await
        .unwrap_or_else(|e| panic!("evaluating {js}: {e}"))
        .into_value()
        .expect("a string");
    serde_json::from_str(&text).expect("JSON from the page")
}

/// Polls `js` until it returns something other than null/false, failing
/// with `what` (and the page's text) after `secs`.
pub async fn wait_for(page: &Page, js: &str, secs: u64, what: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v: Value = eval(page, js).await;
        if !v.is_null() && v != Value::Bool(false) {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            let body: String = eval(page, "document.body.innerText").await;
            panic!("timed out after {secs}s waiting for: {what}\npage text:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Saves a PNG of the page as `<STEVEDORE_SCREENSHOTS>/<name>` when that
/// variable is set (how docs/display.png and docs/console.png are made).
pub async fn screenshot(page: &Page, name: &str) {
    let Ok(dir) = std::env::var("STEVEDORE_SCREENSHOTS") else {
        return;
    };
    let path = std::path::Path::new(&dir).join(name);
    page.save_screenshot(
        ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .full_page(true)
            .build(),
        &path,
    )
    .await
    .unwrap_or_else(|e| panic!("screenshot {}: {e}", path.display()));
}
