//! `stevedore bench-scrape`: the scrape kind's loaders side by side on the
//! embedded Moodle quiz page, served from this process on loopback. Each
//! mode runs the real handler (guard, proxy, browser, extraction) without
//! the queue, so the figures are the loader's own: plain HTTP, the warm
//! browser pool (one browser, a fresh context per page), and a fresh
//! browser per page (what a pool saves). Each mode runs at every
//! concurrency asked for (`--concurrency 1,4`), and the warm pool's runs
//! print the mean time per phase of a job (context, page, navigation,
//! settle, extraction, close), read off the handler's own
//! `stevedore_scrape_browser_phase_seconds` histogram.

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
    /// Pages loaded at once; a list runs each in turn (`1,4`).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub concurrency: Vec<usize>,
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

fn handler(
    args: &BenchScrapeArgs,
    allow: &str,
    concurrency: usize,
    registry: &prometheus::Registry,
) -> anyhow::Result<ScrapeHandler> {
    let mut cfg = ScrapeConfig {
        allow_hosts: allow.to_owned(),
        ..ScrapeConfig::default()
    };
    cfg.browser.chrome = args.chrome.clone();
    cfg.browser.max_pages = concurrency;
    Ok(ScrapeHandler::new(cfg, registry)?)
}

const PHASES: &[&str] = &[
    "context",
    "page",
    "navigation",
    "settle",
    "extraction",
    "close",
];

/// Each phase's sample count and total seconds so far.
fn phases(registry: &prometheus::Registry) -> Vec<(String, u64, f64)> {
    let mut out = Vec::new();
    for family in registry.gather() {
        if family.name() != "stevedore_scrape_browser_phase_seconds" {
            continue;
        }
        for m in family.get_metric() {
            let phase = m
                .get_label()
                .iter()
                .find(|l| l.name() == "phase")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            let h = m.get_histogram();
            out.push((phase, h.get_sample_count(), h.get_sample_sum()));
        }
    }
    out
}

/// Mean milliseconds per phase between two readings (the warm-up's share
/// taken off).
fn report_phases(before: &[(String, u64, f64)], after: &[(String, u64, f64)]) {
    let line: Vec<String> = PHASES
        .iter()
        .filter_map(|p| {
            let (_, n1, s1) = after.iter().find(|(name, ..)| name == p)?;
            let (n0, s0) = before
                .iter()
                .find(|(name, ..)| name == p)
                .map_or((0, 0.0), |(_, n, s)| (*n, *s));
            let n = n1.saturating_sub(n0);
            (n > 0).then(|| format!("{p} {:.1}", (s1 - s0) / n as f64 * 1000.0))
        })
        .collect();
    println!("  mean ms per phase: {}", line.join("  "));
}

async fn one(h: &ScrapeHandler, url: &str, render: Render) -> anyhow::Result<Duration> {
    let p = ScrapePayload {
        url: url.to_owned(),
        render,
        wait_for: None,
        wait_ms: None,
        full_render: false,
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
    let addr = super::demo_pages::serve(std::net::Ipv4Addr::LOCALHOST.into()).await?;
    let url = format!("http://{addr}/demo/quiz/moodle-multichoice.html");
    let allow = addr.to_string();
    for mode in &args.modes {
        for &concurrency in &args.concurrency {
            run_mode(&args, mode, concurrency.max(1), &url, &allow).await?;
        }
    }
    Ok(())
}

async fn run_mode(
    args: &BenchScrapeArgs,
    mode: &str,
    concurrency: usize,
    url: &str,
    allow: &str,
) -> anyhow::Result<()> {
    let render = match mode {
        "http" => Render::Http,
        "browser" | "fresh-browser" => Render::Browser,
        other => bail!("unknown mode {other:?} (http, browser, fresh-browser)"),
    };
    let fresh = mode == "fresh-browser";
    let pages = if fresh { args.fresh_pages } else { args.pages };
    let registry = prometheus::Registry::new();
    let shared = Arc::new(handler(args, allow, concurrency, &registry)?);
    // Warm up: the first browser start is not what a warm pool costs.
    one(&shared, url, render)
        .await
        .with_context(|| format!("warm-up of {mode}"))?;
    let before = phases(&registry);
    let started = Instant::now();
    let lat: Vec<anyhow::Result<Duration>> = stream::iter(0..pages)
        .map(|_| {
            let shared = shared.clone();
            async move {
                if fresh {
                    let own = handler(args, allow, concurrency, &prometheus::Registry::new())?;
                    one(&own, url, render).await
                } else {
                    one(&shared, url, render).await
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let lat = lat
        .into_iter()
        .map(|r| r.map(|d| d.as_secs_f64()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    report(mode, pages, concurrency, wall, lat);
    if mode == "browser" {
        report_phases(&before, &phases(&registry));
    }
    Ok(())
}
