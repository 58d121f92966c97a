//! The `scrape` Handler: load (HTTP, browser, or HTTP then browser for
//! `auto`), extract, classify errors, chain a child job. It reports its
//! stages as progress: loading, rendering, extracting, what it found.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use stevedore_handler::{Handler, JobContext, JobError};
use stevedore_netguard::{NetGuard, OwnListeners, UrlGuard};

use crate::browser::{BrowserConfig, BrowserError, BrowserPool, Hooks, Wait};
use crate::extract::{extract, Extracted};
use crate::load::{load, LoadConfig, LoadError};
use crate::payload::{Render, ScrapeOutput, ScrapePayload, Selectors};
use crate::proxy::{Dial, TcpDial};

#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// `host:port` pairs the guard lets through although they are internal
    /// (the core reads `STEVEDORE_SCRAPE_ALLOW_HOSTS`).
    pub allow_hosts: String,
    /// The process's own listeners (its API, its metrics): never scraped,
    /// allowlisted or not, so a page cannot drive the API it runs beside.
    pub own_listeners: OwnListeners,
    pub timeout: Duration,
    pub max_bytes: usize,
    pub browser: BrowserConfig,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            allow_hosts: String::new(),
            own_listeners: OwnListeners::default(),
            timeout: Duration::from_secs(20),
            max_bytes: 5 * 1024 * 1024,
            browser: BrowserConfig::default(),
        }
    }
}

struct Metrics {
    pages: IntCounterVec,
    load_seconds: HistogramVec,
    phase_seconds: HistogramVec,
}

#[derive(Clone)]
pub struct ScrapeHandler {
    guard: Arc<dyn UrlGuard>,
    cfg: ScrapeConfig,
    metrics: Arc<Metrics>,
    browser: Arc<BrowserPool>,
}

impl ScrapeHandler {
    pub fn new(cfg: ScrapeConfig, registry: &Registry) -> Result<Self, prometheus::Error> {
        let guard = Arc::new(NetGuard::new(&cfg.allow_hosts).refusing(cfg.own_listeners.clone()));
        Self::with_guard(cfg, registry, guard, Arc::new(TcpDial))
    }

    /// With a guard and dialer of the caller's choosing: tests inject a
    /// resolver whose answers change, or a dialer that records targets.
    pub fn with_guard(
        cfg: ScrapeConfig,
        registry: &Registry,
        guard: Arc<dyn UrlGuard>,
        dial: Arc<dyn Dial>,
    ) -> Result<Self, prometheus::Error> {
        let pages = IntCounterVec::new(
            Opts::new(
                "stevedore_scrape_pages_total",
                "Pages loaded, by mode and outcome.",
            ),
            &["mode", "outcome"],
        )?;
        let load_seconds = HistogramVec::new(
            HistogramOpts::new("stevedore_scrape_load_seconds", "Time to load a page."),
            &["mode"],
        )?;
        let restarts = prometheus::IntCounter::new(
            "stevedore_scrape_browser_restarts_total",
            "Browsers started again after a crash or after serving their share of pages.",
        )?;
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "stevedore_scrape_browser_phase_seconds",
                "Time per phase of a browser job: context, page, navigation, settle, extraction, close.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 15)?),
            &["phase"],
        )?;
        registry.register(Box::new(pages.clone()))?;
        registry.register(Box::new(load_seconds.clone()))?;
        registry.register(Box::new(phase_seconds.clone()))?;
        let unisolated = prometheus::IntCounter::new(
            "stevedore_scrape_browser_without_netns_total",
            "Browsers started without a network namespace of their own (held back by the filtering proxy alone).",
        )?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(unisolated.clone()))?;
        let phases = phase_seconds.clone();
        let hooks = Hooks {
            on_restart: Arc::new(move || restarts.inc()),
            on_unisolated: Arc::new(move || unisolated.inc()),
            on_phase: Arc::new(move |phase, took| {
                phases
                    .with_label_values(&[phase])
                    .observe(took.as_secs_f64())
            }),
        };
        let mut browser_cfg = cfg.browser.clone();
        browser_cfg.max_bytes = cfg.max_bytes;
        let browser = BrowserPool::new(browser_cfg, guard.clone(), dial, hooks);
        Ok(Self {
            guard,
            browser: Arc::new(browser),
            cfg,
            metrics: Arc::new(Metrics {
                pages,
                load_seconds,
                phase_seconds,
            }),
        })
    }

    /// The browser pool, for tests that kill its browser.
    pub fn browser(&self) -> &BrowserPool {
        &self.browser
    }

    fn observe<T, E>(&self, mode: &str, started: Instant, r: &Result<T, E>) {
        self.metrics
            .load_seconds
            .with_label_values(&[mode])
            .observe(started.elapsed().as_secs_f64());
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.metrics.pages.with_label_values(&[mode, outcome]).inc();
    }

    async fn over_http(
        &self,
        ctx: &JobContext,
        p: &ScrapePayload,
    ) -> Result<(String, Extracted), JobError> {
        ctx.progress(0.1, "loading over HTTP");
        let started = Instant::now();
        let cfg = LoadConfig {
            timeout: self.cfg.timeout,
            max_bytes: self.cfg.max_bytes,
        };
        let page = load(self.guard.as_ref(), &p.url, &cfg).await;
        self.observe("http", started, &page);
        let page = page.map_err(classify)?;
        ctx.progress(0.3, "extracting questions");
        let found = extract_off_runtime(page.html, p.selectors.clone()).await?;
        Ok((page.final_url, found))
    }

    async fn in_browser(
        &self,
        ctx: &JobContext,
        p: &ScrapePayload,
    ) -> Result<(String, Extracted), JobError> {
        // Refused before a browser is even asked; the proxy judges every
        // connection the page then makes, redirects included.
        self.guard
            .check(&p.url)
            .await
            .map_err(|e| classify(LoadError::from(e)))?;
        ctx.progress(0.4, "rendering in the browser");
        let started = Instant::now();
        let selectors = p.selectors.clone();
        // The readiness check extracts the page already; what it found on
        // the HTML the browser hands back is not extracted twice.
        let last: Arc<Mutex<Option<(u64, Extracted)>>> = Arc::default();
        let seen = last.clone();
        let wait = Wait {
            selector: p.wait_for.as_deref(),
            ms: p.wait_ms,
            // A page over a cap is ready too: waiting longer will not help.
            ready: Arc::new(move |html: &str| {
                let found = extract(html, selectors.as_ref());
                let ready = found.as_ref().map_or(true, |e| !e.questions.is_empty());
                *seen.lock().unwrap_or_else(|p| p.into_inner()) =
                    found.ok().map(|e| (fingerprint(html), e));
                ready
            }),
            full_render: p.full_render,
        };
        let page = self.browser.render(&p.url, wait).await;
        self.observe("browser", started, &page);
        let page = page.map_err(classify_browser)?;
        ctx.progress(0.9, "extracting questions");
        let t = Instant::now();
        let known = last.lock().unwrap_or_else(|p| p.into_inner()).take();
        let found = match known {
            Some((print, found)) if print == fingerprint(&page.html) => found,
            _ => extract_off_runtime(page.html, p.selectors.clone()).await?,
        };
        self.metrics
            .phase_seconds
            .with_label_values(&["extraction"])
            .observe(t.elapsed().as_secs_f64());
        Ok((page.final_url, found))
    }
}

/// Which HTML an extraction was made from.
fn fingerprint(html: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    html.hash(&mut h);
    h.finish()
}

/// How long extracting one page may take before the job gives up on it.
const EXTRACT_BUDGET: Duration = Duration::from_secs(10);

/// Extraction is CPU work proportional to the page: on a blocking thread,
/// so a huge page cannot stall the runtime that sends this worker's
/// heartbeats, and within a budget.
async fn extract_off_runtime(
    html: String,
    selectors: Option<Selectors>,
) -> Result<Extracted, JobError> {
    let job = tokio::task::spawn_blocking(move || extract(&html, selectors.as_ref()));
    match tokio::time::timeout(EXTRACT_BUDGET, job).await {
        Ok(Ok(found)) => Ok(found?),
        Ok(Err(e)) => Err(JobError::permanent(format!("extraction failed: {e}"))),
        Err(_) => Err(JobError::permanent(format!(
            "the page took longer than {EXTRACT_BUDGET:?} to extract"
        ))),
    }
}

fn classify(e: LoadError) -> JobError {
    let msg = e.to_string();
    match e {
        // The site said how long to wait; the core also holds every job of
        // the site (its concurrency key) that long.
        LoadError::Status {
            status: 429 | 503,
            retry_after: Some(d),
            ..
        } => JobError::retry_after(msg, d),
        LoadError::Status { status, .. } if status == 429 || status >= 500 => {
            JobError::retryable(msg)
        }
        LoadError::Unresolvable(_) => JobError::retryable(msg),
        LoadError::Transport {
            retryable: true, ..
        } => JobError::retryable(msg),
        LoadError::Status { .. }
        | LoadError::Refused(_)
        | LoadError::Transport { .. }
        | LoadError::TooLarge(_)
        | LoadError::TooManyRedirects => JobError::permanent(msg),
    }
}

fn classify_browser(e: BrowserError) -> JobError {
    let msg = e.to_string();
    match e {
        // A page over a cap is over it on every attempt.
        BrowserError::Refused(_) | BrowserError::TooLarge { .. } | BrowserError::TooSlow(_) => {
            JobError::permanent(msg)
        }
        // The same status classes as a plain HTTP load.
        BrowserError::Status { status, url } => classify(LoadError::Status {
            status,
            url,
            retry_after: None,
        }),
        // A crash, a timeout, an unreachable host or a browser that would
        // not start: another attempt (on a new browser) may well succeed.
        BrowserError::Timeout(_)
        | BrowserError::Crashed(_)
        | BrowserError::Launch(_)
        | BrowserError::Other(_) => JobError::retryable(msg),
    }
}

impl Handler for ScrapeHandler {
    const KIND: &'static str = "scrape";
    type Payload = ScrapePayload;
    type Output = ScrapeOutput;

    /// `host:<registrable domain>`: the fleet's limit on pages of one site
    /// loading at once (`PUT /v1/concurrency-limits/host:`) and a site's
    /// Retry-After hold for every worker.
    fn concurrency_key(&self, p: &ScrapePayload) -> Option<String> {
        crate::payload::site_key(&p.url)
    }

    async fn run(&self, ctx: &JobContext, p: ScrapePayload) -> Result<ScrapeOutput, JobError> {
        let (rendered_with, (final_url, found)) = match p.render {
            Render::Browser => ("browser", self.in_browser(ctx, &p).await?),
            Render::Http => ("http", self.over_http(ctx, &p).await?),
            Render::Auto => {
                let (final_url, found) = self.over_http(ctx, &p).await?;
                if found.questions.is_empty() {
                    ("browser", self.in_browser(ctx, &p).await?)
                } else {
                    ("http", (final_url, found))
                }
            }
        };
        if found.questions.is_empty() {
            return Err(JobError::permanent(format!(
                "no questions found on {final_url} (rendered with {rendered_with})"
            )));
        }
        ctx.progress(
            1.0,
            format!(
                "found {} question{}",
                found.questions.len(),
                if found.questions.len() == 1 { "" } else { "s" }
            ),
        );
        if let Some(then) = &p.then {
            let mut payload = then.clone();
            let kind = payload
                .remove("kind")
                .and_then(|k| k.as_str().map(str::to_owned))
                .ok_or_else(|| JobError::permanent("then.kind missing"))?;
            let questions = serde_json::to_value(&found.questions)
                .map_err(|e| JobError::permanent(format!("encoding questions: {e}")))?;
            payload.insert("questions".into(), questions);
            ctx.spawn_child(kind, serde_json::Value::Object(payload));
        }
        Ok(ScrapeOutput {
            url: p.url,
            final_url,
            title: found.title,
            rendered_with,
            questions: found.questions,
            method: found.method,
            warnings: found.warnings,
        })
    }
}
