//! The `scrape` Handler: load, extract, classify errors, chain a child job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use stevedore_handler::{Handler, JobContext, JobError};
use stevedore_netguard::NetGuard;
use tokio::sync::Semaphore;

use crate::extract::extract;
use crate::load::{load, LoadConfig, LoadError};
use crate::payload::{Render, ScrapeOutput, ScrapePayload};

#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// `host:port` pairs the guard lets through although they are internal
    /// (the core reads `STEVEDORE_ALLOW_HOSTS`).
    pub allow_hosts: String,
    pub timeout: Duration,
    pub max_bytes: usize,
    /// Pages of one host loaded at once by this process.
    pub per_host: usize,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            allow_hosts: String::new(),
            timeout: Duration::from_secs(20),
            max_bytes: 5 * 1024 * 1024,
            per_host: 2,
        }
    }
}

struct Metrics {
    pages: IntCounterVec,
    load_seconds: HistogramVec,
}

#[derive(Clone)]
pub struct ScrapeHandler {
    guard: Arc<NetGuard>,
    cfg: ScrapeConfig,
    hosts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    metrics: Arc<Metrics>,
}

impl ScrapeHandler {
    pub fn new(cfg: ScrapeConfig, registry: &Registry) -> Result<Self, prometheus::Error> {
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
        registry.register(Box::new(pages.clone()))?;
        registry.register(Box::new(load_seconds.clone()))?;
        Ok(Self {
            guard: Arc::new(NetGuard::new(&cfg.allow_hosts)),
            cfg,
            hosts: Arc::default(),
            metrics: Arc::new(Metrics {
                pages,
                load_seconds,
            }),
        })
    }

    /// The per-host cap: one site is not hammered by a busy pool.
    fn host_slot(&self, url: &str) -> Arc<Semaphore> {
        let host = stevedore_netguard::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(host)
            .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.per_host.max(1))))
            .clone()
    }
}

fn classify(e: LoadError) -> JobError {
    let msg = e.to_string();
    match e {
        LoadError::Status {
            status: 429,
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

const NO_BROWSER: &str = "the headless-Chromium loader is not part of this build yet";

impl Handler for ScrapeHandler {
    const KIND: &'static str = "scrape";
    type Payload = ScrapePayload;
    type Output = ScrapeOutput;

    async fn run(&self, ctx: &JobContext, p: ScrapePayload) -> Result<ScrapeOutput, JobError> {
        if p.render == Render::Browser {
            return Err(JobError::permanent(format!(
                "render \"browser\" cannot run: {NO_BROWSER}"
            )));
        }
        let slot = self.host_slot(&p.url);
        let _permit = slot
            .acquire()
            .await
            .map_err(|_| JobError::retryable("host limiter closed"))?;
        let started = Instant::now();
        let cfg = LoadConfig {
            timeout: self.cfg.timeout,
            max_bytes: self.cfg.max_bytes,
        };
        let page = load(self.guard.as_ref(), &p.url, &cfg).await;
        self.metrics
            .load_seconds
            .with_label_values(&["http"])
            .observe(started.elapsed().as_secs_f64());
        let outcome = if page.is_ok() { "ok" } else { "error" };
        self.metrics
            .pages
            .with_label_values(&["http", outcome])
            .inc();
        let page = page.map_err(classify)?;
        let found = extract(&page.html, p.selectors.as_ref());
        if found.questions.is_empty() {
            let hint = if p.render == Render::Auto {
                format!("; pages that build their questions with script need a browser, and {NO_BROWSER}")
            } else {
                String::new()
            };
            return Err(JobError::permanent(format!(
                "no questions found on {}{hint}",
                page.final_url
            )));
        }
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
            final_url: page.final_url,
            title: found.title,
            rendered_with: "http",
            questions: found.questions,
        })
    }
}
