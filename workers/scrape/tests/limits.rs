//! Pages over the caps, in the real browser: a 20 MiB DOM fails with a
//! clear permanent error within its timeout, while another job on the same
//! worker completes and the runtime (which sends the worker's heartbeats)
//! is never stalled.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stevedore_handler::JobError;
use stevedore_scrape::{ScrapeConfig, ScrapeHandler};
use support::{fixtures, scrape, Canary};

#[tokio::test]
async fn a_20_mib_dom_fails_clearly_while_another_job_runs_and_the_runtime_keeps_ticking() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let timeout = Duration::from_secs(20);
    let mut cfg = ScrapeConfig {
        allow_hosts: format!("127.0.0.1:{port}"),
        ..ScrapeConfig::default()
    };
    cfg.browser.timeout = timeout;
    let h = ScrapeHandler::new(cfg, &prometheus::Registry::new()).expect("handler");

    // A heartbeat stand-in on the same (single-threaded) runtime: the
    // longest gap between its ticks is how long the runtime was blocked.
    let worst = Arc::new(AtomicU64::new(0));
    let ticker = {
        let worst = worst.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let gap = last.elapsed().as_millis() as u64;
                worst.fetch_max(gap, Ordering::SeqCst);
                last = Instant::now();
            }
        })
    };
    let huge = {
        let h = h.clone();
        let url = format!("http://127.0.0.1:{port}/huge-dom");
        tokio::spawn(async move {
            let started = Instant::now();
            let res = scrape(&h, json!({"url": url, "render": "browser"})).await.0;
            (res, started.elapsed())
        })
    };
    let (other, _) = scrape(
        &h,
        json!({"url": format!("http://127.0.0.1:{port}/moodle"), "render": "browser"}),
    )
    .await;
    assert_eq!(other.expect("the other job").questions.len(), 5);
    let (res, took) = huge.await.expect("join");
    match res {
        Err(JobError::Permanent { message }) => {
            assert!(message.contains("larger than 5242880 bytes"), "{message}")
        }
        other => panic!("the huge page did not fail permanently: {other:?}"),
    }
    assert!(took < timeout, "took {took:?}");
    ticker.abort();
    let worst = worst.load(Ordering::SeqCst);
    assert!(worst < 500, "the runtime stalled for {worst} ms");
    assert_eq!(canary.reached().await, 0);
}
