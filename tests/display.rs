//! The display page in headless Chromium (Debian's, installed by
//! scripts/services.sh): after a job finishes, the page's DOM shows it with
//! its status, fed by the live stream.

mod support;

use serde_json::json;
use support::{Flavor, TestFleet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_display_page_shows_a_finished_job() {
    let f = TestFleet::start(Flavor::Sqlite).await;
    let id = f.probe(json!({"sleep_ms": 10}), json!({})).await;
    f.wait_status(id, "succeeded", 30).await;
    let profile = tempfile::tempdir().expect("profile dir");
    let url = format!("{}/?recent=50", f.url);
    let chrome = std::env::var("CHROME").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let out = tokio::process::Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--disable-quic",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", &url])
        .output()
        .await
        .expect("chromium runs (scripts/services.sh installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    let short = &id.to_string()[24..];
    let row = dom
        .split("<li")
        .find(|li| li.contains(short))
        .unwrap_or_else(|| panic!("the page lists job {id}:\n{dom}"));
    assert!(
        row.contains("succeeded"),
        "the job's row shows its status: {row}"
    );
    f.shutdown().await;
}
