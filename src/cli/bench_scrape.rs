//! `stevedore bench-scrape`: the scrape kind's loaders side by side on the
//! embedded Moodle quiz page, served from this process on loopback. Each
//! mode runs the real handler (guard, proxy, browser, extraction) without
//! the queue, so the figures are the loader's own: plain HTTP, the warm
//! browser pool (one browser, a fresh context per page), and a fresh
//! browser per page (what a pool saves).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use futures::stream::{self, StreamExt};
use stevedore_handler::{Handler, JobContext};
use stevedore_scrape::{Render, ScrapeConfig, ScrapeHandler, ScrapePayload};

use super::bench::pct;

#[derive(Debug, Args)]
pub struct BenchScrapeArgs {
    /// Pages per mode.
    #[arg(long, default_value_t = 200)]
    pub pages: usize,
    /// Pages loaded at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Which loaders to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http,browser,fresh-browser"
    )]
    pub modes: Vec<String>,
    /// Pages for the fresh-browser mode (each starts Chromium).
    #[arg(long, default_value_t = 40)]
    pub fresh_pages: usize,
    #[arg(long, env = "CHROME", default_value = "/usr/bin/chromium")]
    pub chrome: std::path::PathBuf,
}

fn handler(args: &BenchScrapeArgs, allow: &str) -> anyhow::Result<ScrapeHandler> {
    let mut cfg = ScrapeConfig {
        allow_hosts: allow.to_owned(),
        // One host on purpose; the politeness cap would measure itself.
        per_host: args.concurrency.max(1),
        ..ScrapeConfig::default()
    };
    cfg.browser.chrome = args.chrome.clone();
    cfg.browser.max_pages = args.concurrency.max(1);
    Ok(ScrapeHandler::new(cfg, &prometheus::Registry::new())?)
}

async fn one(h: &ScrapeHandler, url: &str, render: Render) -> anyhow::Result<Duration> {
    let p = ScrapePayload {
        url: url.to_owned(),
        render,
        wait_for: None,
        wait_ms: None,
        selectors: None,
        then: None,
    };
    let started = Instant::now();
    let out = h
        .run(
            &JobContext::new(Default::default(), 1, Default::default()),
            p,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if out.questions.len() != 5 {
        bail!("expected 5 questions, got {}", out.questions.len());
    }
    Ok(started.elapsed())
}

fn report(mode: &str, pages: usize, concurrency: usize, wall: Duration, mut lat: Vec<f64>) {
    lat.sort_by(f64::total_cmp);
    println!(
        "{mode:<14} {pages:>5} pages  concurrency {concurrency}  {:>8.1} pages/s  p50 {:>7.1} ms  p99 {:>7.1} ms",
        pages as f64 / wall.as_secs_f64(),
        pct(&lat, 0.5) * 1000.0,
        pct(&lat, 0.99) * 1000.0,
    );
}

pub async fn run(args: BenchScrapeArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, crate::api::demo::router()).await });
    let url = format!("http://{addr}/demo/quiz/moodle-multichoice.html");
    let allow = addr.to_string();
    for mode in &args.modes {
        let render = match mode.as_str() {
            "http" => Render::Http,
            "browser" | "fresh-browser" => Render::Browser,
            other => bail!("unknown mode {other:?} (http, browser, fresh-browser)"),
        };
        let fresh = mode == "fresh-browser";
        let pages = if fresh { args.fresh_pages } else { args.pages };
        let shared = Arc::new(handler(&args, &allow)?);
        // Warm up: the first browser start is not what a warm pool costs.
        one(&shared, &url, render)
            .await
            .with_context(|| format!("warm-up of {mode}"))?;
        let started = Instant::now();
        let lat: Vec<anyhow::Result<Duration>> = stream::iter(0..pages)
            .map(|_| {
                let shared = shared.clone();
                let (args, allow, url) = (&args, &allow, &url);
                async move {
                    if fresh {
                        let own = handler(args, allow)?;
                        one(&own, url, render).await
                    } else {
                        one(&shared, url, render).await
                    }
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await;
        let wall = started.elapsed();
        let lat = lat
            .into_iter()
            .map(|r| r.map(|d| d.as_secs_f64()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        report(mode, pages, args.concurrency, wall, lat);
    }
    Ok(())
}
