//! The headless-Chromium loader: one browser per worker process, reused
//! across jobs, a fresh incognito context per job, a cap on open pages, and
//! a new browser when the old one crashed or has served its share of pages.
//!
//! The browser reaches the network only through proxies in this process;
//! its own DNS never decides where a page connects. Each job's context gets
//! its own filtering [`Proxy`] (so a refusal is attributed to the job that
//! caused it); the browser-wide `--proxy-server` is one that refuses
//! everything, so the browser's own background traffic, and anything that
//! escaped the context's proxy, fails closed. WebRTC is kept off
//! non-proxied UDP, and the process is started through
//! `setpriv --pdeathsig KILL` so a worker that dies (even by SIGKILL) takes
//! its browser with it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig as CdpConfig};
use chromiumoxide::cdp::browser_protocol::network::{EventResponseReceived, ResourceType};
use chromiumoxide::cdp::browser_protocol::target::{
    CreateBrowserContextParams, CreateTargetParams,
};
use chromiumoxide::error::CdpError;
use futures::{FutureExt, StreamExt};
use stevedore_netguard::UrlGuard;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::proxy::{Dial, Proxy, Refusal, Refusals, REFUSED_META};

#[derive(Debug, Clone)]
pub struct BrowserConfig {
    /// The Chromium executable (Debian's `chromium`; the core reads
    /// `CHROME`, this crate never reads the environment).
    pub chrome: PathBuf,
    /// Pages open at once in this process.
    pub max_pages: usize,
    /// Pages one browser serves before it is replaced, so whatever it
    /// leaks (memory, renderer processes) is bounded.
    pub recycle_after: u64,
    /// Navigation plus waiting for the page, per job.
    pub timeout: Duration,
    /// How long after `load` a page may take to show what the caller is
    /// looking for (script-built quizzes often render on a timer).
    pub settle: Duration,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        Self {
            chrome: PathBuf::from("/usr/bin/chromium"),
            max_pages: 4,
            recycle_after: 500,
            timeout: Duration::from_secs(30),
            settle: Duration::from_secs(5),
        }
    }
}

/// "Does this page show what we came for yet?"
pub type Ready<'a> = &'a (dyn Fn(&str) -> bool + Send + Sync);

/// A page as the browser left it.
#[derive(Debug)]
pub struct Rendered {
    pub final_url: String,
    pub html: String,
    pub status: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("refused by the SSRF guard: {0}")]
    Refused(String),
    #[error("the page did not load within {0:?}")]
    Timeout(Duration),
    #[error("the browser crashed: {0}")]
    Crashed(String),
    #[error("cannot start the browser ({0}); is chromium installed? set CHROME to its path")]
    Launch(String),
    #[error("HTTP {status} from {url}")]
    Status { status: u16, url: String },
    #[error("browser: {0}")]
    Other(String),
}

/// One running browser with its proxy and profile directory.
struct Live {
    browser: Browser,
    events: JoinHandle<()>,
    /// Where the browser's own traffic goes to be refused.
    _background: Proxy,
    pid: Option<u32>,
    served: AtomicU64,
    /// Set before the event task drops the CDP handler, which is what fails
    /// the pending commands: a job that sees its command fail then sees the
    /// flag (the task's own `is_finished` may still lag behind).
    dead: Arc<AtomicBool>,
    _profile: tempfile::TempDir,
}

impl Live {
    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst) || self.events.is_finished()
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// Counts browser starts after the first, for the restarts metric.
pub type OnRestart = Arc<dyn Fn() + Send + Sync>;

pub struct BrowserPool {
    cfg: BrowserConfig,
    guard: Arc<dyn UrlGuard>,
    dial: Arc<dyn Dial>,
    pages: Semaphore,
    live: Mutex<Option<Arc<Live>>>,
    recent: Refusals,
    started: AtomicU64,
    on_restart: OnRestart,
}

impl BrowserPool {
    /// Nothing starts until the first page asks for a browser.
    pub fn new(
        cfg: BrowserConfig,
        guard: Arc<dyn UrlGuard>,
        dial: Arc<dyn Dial>,
        on_restart: OnRestart,
    ) -> Self {
        Self {
            pages: Semaphore::new(cfg.max_pages.max(1)),
            cfg,
            guard,
            dial,
            live: Mutex::new(None),
            recent: Default::default(),
            started: AtomicU64::new(0),
            on_restart,
        }
    }

    /// The browser's process id, while one runs (tests kill it).
    pub async fn pid(&self) -> Option<u32> {
        self.live.lock().await.as_ref().and_then(|l| l.pid)
    }

    /// What pages tried and were refused lately (tests check that a page's
    /// escape attempts were made, and stopped).
    pub fn refusals(&self) -> Vec<Refusal> {
        self.recent.all()
    }

    /// The running browser, or a new one if there is none, it died, or it
    /// has served its share.
    async fn browser(&self) -> Result<Arc<Live>, BrowserError> {
        let mut slot = self.live.lock().await;
        if let Some(live) = slot.as_ref() {
            if !live.is_dead() && live.served.load(Ordering::SeqCst) < self.cfg.recycle_after {
                return Ok(live.clone());
            }
            if let Some(old) = slot.take() {
                retire(old);
            }
        }
        let live = Arc::new(self.launch().await?);
        if self.started.fetch_add(1, Ordering::SeqCst) > 0 {
            (self.on_restart)();
        }
        *slot = Some(live.clone());
        Ok(live)
    }

    async fn launch(&self) -> Result<Live, BrowserError> {
        let launch = |e: &dyn std::fmt::Display| BrowserError::Launch(e.to_string());
        let background = Proxy::deny_all().await.map_err(|e| launch(&e))?;
        let profile = tempfile::Builder::new()
            .prefix("stevedore-chromium-")
            .tempdir()
            .map_err(|e| launch(&e))?;
        let executable =
            wrap_with_pdeathsig(profile.path(), &self.cfg.chrome).map_err(|e| launch(&e))?;
        let config = CdpConfig::builder()
            .chrome_executable(executable)
            // Each browser its own profile: a shared one makes the second
            // browser fail on Chromium's SingletonLock.
            .user_data_dir(profile.path())
            .no_sandbox()
            .respect_https_errors()
            // No device-metrics emulation per page: extraction reads the DOM,
            // and skipping it took ~10% off a warm job here.
            .viewport(None)
            .request_timeout(self.cfg.timeout)
            .args([
                "disable-gpu",
                "disable-background-networking",
                "disable-component-update",
                "no-first-run",
                "no-default-browser-check",
                "disable-domain-reliability",
                "dns-prefetch-disable",
                "disable-search-engine-choice-screen",
                "no-service-autorun",
                "disable-client-side-phishing-detection",
                // One list: Chromium honours only the last --disable-features.
                // Each of these is background chatter (time sync, hints,
                // media routing, translation) that costs CPU per context and
                // would only be refused by the deny-all proxy anyway.
                "disable-features=Translate,TranslateUI,OptimizationHints,OptimizationGuideModelDownloading,OptimizationHintsFetching,NetworkTimeServiceQuerying,MediaRouter,DialMediaRouteProvider,CertificateTransparencyComponentUpdater,AutofillServerCommunication,LensOverlay,PaintHolding,InterestFeedContentSuggestions",
                &format!("proxy-server=http://{}", background.addr()),
                // Chromium bypasses proxies for loopback unless told not to;
                // loopback is exactly what the guard must see.
                &format!("proxy-bypass-list={BYPASS_NOTHING}"),
                // Without it WebRTC sends STUN straight past the proxy.
                "webrtc-ip-handling-policy=disable_non_proxied_udp",
                "force-webrtc-ip-handling-policy",
            ])
            .build()
            .map_err(|e| launch(&e))?;
        let (mut browser, mut handler) = Browser::launch(config).await.map_err(|e| launch(&e))?;
        // The launcher execs into Chromium, so this is the browser itself.
        let pid = browser.get_mut_child().and_then(|c| c.inner.id());
        let dead = Arc::new(AtomicBool::new(false));
        let flag = dead.clone();
        // The handler must be polled for the browser's whole life. Its
        // schema is older than Chromium's, so odd messages are logged, not
        // fatal; a broken socket means the browser is gone.
        let events = tokio::spawn(async move {
            while let Some(event) = handler.next().await {
                match event {
                    Ok(()) => {}
                    Err(CdpError::Ws(e)) => {
                        tracing::warn!(error = %e, "lost the browser's devtools socket");
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "browser event"),
                }
            }
            flag.store(true, Ordering::SeqCst);
        });
        Ok(Live {
            browser,
            events,
            _background: background,
            pid,
            served: AtomicU64::new(0),
            dead,
            _profile: profile,
        })
    }

    /// Loads `url` in a fresh incognito context and returns the rendered
    /// page once it loaded, `wait_for` matched (or `wait_ms` passed), and
    /// `ready` accepts it or the settle time ran out.
    pub async fn render(&self, url: &str, wait: Wait<'_>) -> Result<Rendered, BrowserError> {
        let _page_slot = self
            .pages
            .acquire()
            .await
            .map_err(|_| BrowserError::Other("browser pool closed".into()))?;
        let live = self.browser().await?;
        live.served.fetch_add(1, Ordering::SeqCst);
        let proxy = Proxy::start(self.guard.clone(), self.dial.clone())
            .await
            .map_err(|e| BrowserError::Other(format!("starting the job's proxy: {e}")))?;
        let budget = self.cfg.timeout;
        let outcome = tokio::time::timeout(
            budget,
            visit(&live.browser, url, wait, self.cfg.settle, proxy.addr()),
        )
        .await;
        let refusals = proxy.refusals();
        for r in &refusals {
            self.recent.push(r.clone());
        }
        let refused = || {
            refusals
                .first()
                .map(|r| BrowserError::Refused(format!("{}: {}", r.target, r.reason)))
        };
        match outcome {
            Ok(Ok(page)) => {
                if let Some(reason) = refused_page(&page.html) {
                    return Err(BrowserError::Refused(reason));
                }
                if let Some(status) = page.status.filter(|s| *s >= 400) {
                    return Err(BrowserError::Status {
                        status,
                        url: page.final_url,
                    });
                }
                Ok(page)
            }
            Ok(Err(e)) if live.is_dead() => Err(BrowserError::Crashed(e.to_string())),
            // A refused https hop shows only as a failed tunnel; the proxy
            // knows whether it refused or could not connect.
            Ok(Err(e)) if e.to_string().contains("ERR_TUNNEL_CONNECTION_FAILED") => {
                Err(refused().unwrap_or(BrowserError::Other(e.to_string())))
            }
            Ok(Err(e)) => Err(BrowserError::Other(e.to_string())),
            Err(_) if live.is_dead() => Err(BrowserError::Crashed("during navigation".into())),
            Err(_) => Err(BrowserError::Timeout(budget)),
        }
    }
}

/// Waits for jobs still on the old browser, then closes it properly.
fn retire(old: Arc<Live>) {
    tokio::spawn(async move {
        let mut old = old;
        loop {
            match Arc::try_unwrap(old) {
                Ok(mut live) => {
                    if !live.is_dead() {
                        let _ = live.browser.close().await;
                    }
                    let _ = live.browser.wait().await;
                    return;
                }
                Err(still_used) => {
                    old = still_used;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

/// What to wait for once the page has loaded.
#[derive(Clone, Copy)]
pub struct Wait<'a> {
    pub selector: Option<&'a str>,
    pub ms: Option<u64>,
    pub ready: Ready<'a>,
}

const BYPASS_NOTHING: &str = "<-loopback>";

async fn visit(
    browser: &Browser,
    url: &str,
    wait: Wait<'_>,
    settle: Duration,
    proxy: std::net::SocketAddr,
) -> Result<Rendered, CdpError> {
    // A context per job: no cookie, cache or storage crosses jobs, and the
    // job's requests go through the job's own proxy.
    let params = CreateBrowserContextParams::builder()
        .dispose_on_detach(true)
        .proxy_server(format!("http://{proxy}"))
        .proxy_bypass_list(BYPASS_NOTHING)
        .build();
    let t = std::time::Instant::now();
    let context = browser.create_browser_context(params).await?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "context created");
    let target = CreateTargetParams::builder()
        .url("about:blank")
        .browser_context_id(context.clone())
        .build()
        .map_err(CdpError::ChromeMessage)?;
    let loaded = async {
        let page = browser.new_page(target).await?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "page opened");
        let loaded = load_page(&page, url, wait, settle).await;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "page loaded");
        let _ = page.close().await;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "page closed");
        loaded
    }
    .await;
    let _ = browser.dispose_browser_context(context).await;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "context disposed");
    loaded
}

async fn load_page(
    page: &chromiumoxide::Page,
    url: &str,
    wait: Wait<'_>,
    settle: Duration,
) -> Result<Rendered, CdpError> {
    // The main document's status, from the network events: the page's
    // navigation helpers also report iframes, whose refusals are not the
    // page's own status.
    let mut responses = page.event_listener::<EventResponseReceived>().await?;
    let main = page.mainframe().await?;
    let navigated = page.goto(url).await.map(|_| ());
    let mut status = None;
    while let Some(Some(ev)) = responses.next().now_or_never() {
        if ev.r#type == ResourceType::Document && ev.frame_id.is_some() && ev.frame_id == main {
            status = Some(ev.response.status as u16);
        }
    }
    if let Err(e) = navigated {
        // Chromium fails the navigation on an error status with an empty
        // body; the status is what the caller needs to classify it.
        return match status.filter(|s| *s >= 400) {
            Some(status) => Ok(Rendered {
                final_url: url.to_owned(),
                html: String::new(),
                status: Some(status),
            }),
            None => Err(e),
        };
    }
    if let Some(selector) = wait.selector {
        // Polled, not event-driven: a selector that never appears ends in
        // the job's timeout like any slow page.
        while page.find_element(selector).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if let Some(ms) = wait.ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let settled = tokio::time::Instant::now() + settle;
    let mut html = page.content().await?;
    // An error page or the proxy's refusal will not turn into a quiz.
    let final_answer = |html: &str| {
        (wait.ready)(html) || refused_page(html).is_some() || status.is_some_and(|s| s >= 400)
    };
    while !final_answer(&html) && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(100)).await;
        html = page.content().await?;
    }
    Ok(Rendered {
        final_url: page.url().await?.unwrap_or_else(|| url.to_owned()),
        html,
        status,
    })
}

/// The reason on the proxy's refusal page, if that is what loaded.
fn refused_page(html: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{REFUSED_META}\""))?;
    let rest = &html[at..];
    let start = rest.find("content=\"")? + 9;
    let end = rest[start..].find('"')?;
    Some(
        rest[start..start + end]
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// Writes a launcher that starts Chromium with a parent-death signal: a
/// worker killed outright must not leave browsers behind.
fn wrap_with_pdeathsig(
    dir: &std::path::Path,
    chrome: &std::path::Path,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if !chrome.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} not found", chrome.display()),
        ));
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(setpriv) = setpriv else {
        return Ok(chrome.to_owned());
    };
    let path = dir.join("chromium-launcher");
    let quoted = chrome.display().to_string().replace('\'', "'\\''");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nexec {setpriv} --pdeathsig KILL -- '{quoted}' \"$@\"\n"),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reason_off_the_refusal_page() {
        let page = format!(
            "<html><head><meta name=\"{REFUSED_META}\" content=\"127.0.0.1 resolves to a &quot;forbidden&quot; address\"></head></html>"
        );
        assert_eq!(
            refused_page(&page).as_deref(),
            Some("127.0.0.1 resolves to a \"forbidden\" address")
        );
        assert_eq!(refused_page("<html><p>quiz</p></html>"), None);
    }
}
