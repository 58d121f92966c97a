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
//! non-proxied UDP.
//!
//! Beyond the proxy, [`isolate`] decides how Chromium is contained (its own
//! network namespace holding only the proxies, an unprivileged user, its
//! sandbox, a scrubbed environment, a parent-death signal); [`launch`]
//! starts it; [`cdp`] speaks the DevTools protocol to it; [`page`] runs
//! one job's visit under the HTML size cap.

mod cdp;
mod isolate;
mod launch;
pub mod netns;
mod page;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stevedore_netguard::UrlGuard;
use tokio::sync::{Mutex, Semaphore};

use crate::proxy::{Dial, Proxy, Refusal, Refusals};
pub use isolate::Isolation;
use launch::Live;
use page::{refused_page, visit, Failed};

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
    /// The largest page HTML read back, as for plain HTTP.
    pub max_bytes: usize,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        Self {
            chrome: PathBuf::from("/usr/bin/chromium"),
            max_pages: 4,
            recycle_after: 500,
            timeout: Duration::from_secs(30),
            settle: Duration::from_secs(5),
            max_bytes: 5 * 1024 * 1024,
        }
    }
}

/// "Does this page show what we came for yet?" Called on a blocking
/// thread, so it may be CPU work.
pub type Ready = Arc<dyn Fn(&str) -> bool + Send + Sync>;

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
    #[error("page larger than {cap} bytes ({size} read in the browser)")]
    TooLarge { size: usize, cap: usize },
    #[error("the page took longer than {0:?} to extract")]
    TooSlow(Duration),
    #[error("browser: {0}")]
    Other(String),
}

/// Called on browser starts after the first (the restarts metric) and on
/// each start without a network namespace of its own.
pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// Told how long a phase of a job's visit took: `context`, `page`,
/// `navigation`, `settle`, `close`.
pub type PhaseHook = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

#[derive(Clone)]
pub struct Hooks {
    pub on_restart: Hook,
    pub on_unisolated: Hook,
    pub on_phase: PhaseHook,
}

pub struct BrowserPool {
    cfg: BrowserConfig,
    guard: Arc<dyn UrlGuard>,
    dial: Arc<dyn Dial>,
    pages: Semaphore,
    live: Mutex<Option<Arc<Live>>>,
    recent: Refusals,
    started: AtomicU64,
    hooks: Hooks,
    isolation: Isolation,
}

impl BrowserPool {
    /// Nothing starts until the first page asks for a browser; what this
    /// machine allows for isolating it is found out (and logged) now.
    pub fn new(
        cfg: BrowserConfig,
        guard: Arc<dyn UrlGuard>,
        dial: Arc<dyn Dial>,
        hooks: Hooks,
    ) -> Self {
        Self {
            pages: Semaphore::new(cfg.max_pages.max(1)),
            cfg,
            guard,
            dial,
            live: Mutex::new(None),
            recent: Default::default(),
            started: AtomicU64::new(0),
            hooks,
            isolation: Isolation::probe(),
        }
    }

    /// How this pool's browsers are contained.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// The browser's process id, while one runs (tests kill it).
    pub async fn pid(&self) -> Option<u32> {
        self.live.lock().await.as_ref().and_then(|l| l.pid)
    }

    /// The running browser's profile directory: every process of that
    /// browser names it on its command line (tests read their environment).
    pub async fn profile_dir(&self) -> Option<PathBuf> {
        let live = self.live.lock().await;
        live.as_ref().map(|l| l.profile.path().to_owned())
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
        let live = Arc::new(launch::launch(&self.cfg, &self.isolation).await?);
        if live.netns.is_none() {
            (self.hooks.on_unisolated)();
        }
        if self.started.fetch_add(1, Ordering::SeqCst) > 0 {
            (self.hooks.on_restart)();
        }
        *slot = Some(live.clone());
        Ok(live)
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
        let proxy = live
            .listener()
            .and_then(|l| Proxy::start_on(l, self.guard.clone(), self.dial.clone()))
            .map_err(|e| BrowserError::Other(format!("starting the job's proxy: {e}")))?;
        if !wait.full_render {
            proxy.skip_resources();
        }
        let budget = self.cfg.timeout;
        let outcome = tokio::time::timeout(
            budget,
            visit(
                &live.cdp,
                url,
                &wait,
                &self.cfg,
                proxy.addr(),
                &|u: &str| proxy.status_of(u),
                self.hooks.on_phase.as_ref(),
            ),
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
            Ok(Err(Failed::TooLarge(size, cap))) => Err(BrowserError::TooLarge { size, cap }),
            Ok(Err(Failed::Slow(d))) => Err(BrowserError::TooSlow(d)),
            Ok(Err(Failed::Cdp(e))) if live.is_dead() => Err(BrowserError::Crashed(e.to_string())),
            // A refused https hop shows only as a failed tunnel (the error
            // page may not name it); the proxy knows whether it refused.
            Ok(Err(Failed::Navigation(e))) => {
                Err(refused().unwrap_or(BrowserError::Other(format!("{e} at {url}"))))
            }
            Ok(Err(Failed::Cdp(e))) => Err(BrowserError::Other(e.to_string())),
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
                Ok(mut live) => return launch::close(&mut live).await,
                Err(still_used) => {
                    old = still_used;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

/// What to wait for once the page has loaded.
#[derive(Clone)]
pub struct Wait<'a> {
    pub selector: Option<&'a str>,
    pub ms: Option<u64>,
    pub ready: Ready,
    /// Load images, media, fonts and stylesheets too; otherwise they are
    /// refused in the browser, since extraction reads only the DOM.
    pub full_render: bool,
}
