//! The operator console in headless Chromium, used as an operator would:
//! find a dead job by a word of its error, replay it and watch it succeed;
//! purge a group of dead letters with the same error and see the count drop;
//! pause a pool, see submitted jobs wait, resume it and see them finish; and
//! time a text search over 10,000 jobs.

mod support;

#[path = "chromium/mod.rs"]
mod chromium;

use chromium::{eval, screenshot, wait_for, Chromium};
use chromiumoxide::Page;
use serde_json::{json, Value};
use support::{Flavor, Opts, TestFleet};

/// Clicks the first element matching `css` whose text contains `text`.
async fn click(page: &Page, css: &str, text: &str) {
    let found: bool = eval(
        page,
        &format!(
            "(() => {{ const e = [...document.querySelectorAll({css:?})].find((e) => e.innerText.includes({text:?})); if (e) e.click(); return !!e; }})()"
        ),
    )
    .await;
    assert!(found, "no {css} reading {text:?} on the page");
}

/// The dead-letter group rows as shown: (error, count).
const GROUPS: &str = "[...document.querySelectorAll('tr.group')].map((r) => [r.cells[0].innerText, Number(r.cells[2].innerText)])";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_replays_and_purges_dead_letters() {
    let f = TestFleet::start_with(
        Flavor::Sqlite,
        Opts {
            workers: vec![("probe".into(), 4), ("scrape".into(), 1)],
            ..Opts::default()
        },
    )
    .await;
    // Dies on its only attempt; a replay is attempt 2, which succeeds.
    let probe = f
        .probe(
            json!({"fail_attempts": 1, "failure": "permanent"}),
            json!({"max_attempts": 1}),
        )
        .await;
    // Three scrapes the SSRF guard refuses (loopback), before any connection.
    let mut scrapes = Vec::new();
    for i in 0..3 {
        let (status, v) = f
            .post(
                "/v1/jobs",
                json!({"kind": "scrape", "max_attempts": 1,
                       "payload": {"url": format!("http://127.0.0.1:9/quiz/{i}"), "render": "http"}}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{v}");
        scrapes.push(v["id"].as_str().expect("id").parse().expect("uuid"));
    }
    f.wait_status(probe, "dead", 30).await;
    let mut scrape_error = String::new();
    for id in &scrapes {
        let job = f.wait_status(*id, "dead", 30).await;
        scrape_error = job["errors"][0]["message"]
            .as_str()
            .expect("error")
            .to_owned();
    }
    assert!(
        !scrape_error.contains("probe"),
        "the search word picks one group: {scrape_error}"
    );

    let browser = Chromium::launch(1280, 900).await;
    let page = browser.open(&format!("{}/console#/dead", f.url)).await;
    wait_for(
        &page,
        "document.getElementById('conn').innerText === 'live'",
        20,
        "the console connects",
    )
    .await;
    wait_for(
        &page,
        &format!("{GROUPS}.length === 2"),
        20,
        "two groups of dead letters",
    )
    .await;
    let groups: Vec<(String, i64)> = eval(&page, GROUPS).await;
    assert!(
        groups
            .iter()
            .any(|(msg, n)| msg == &scrape_error && *n == 3),
        "the three refused scrapes are one row with count 3: {groups:?}"
    );
    assert_eq!(
        wait_for(
            &page,
            "document.getElementById('dead-count').innerText === '4' && '4'",
            10,
            "4 dead in the header"
        )
        .await,
        "4"
    );
    screenshot(&page, "console.png").await;

    // The keyboard: "/" focuses the search box, then type a word and Enter.
    page.find_element("main")
        .await
        .expect("main")
        .press_key("/")
        .await
        .expect("key /");
    let focused: String = eval(&page, "document.activeElement.name").await;
    assert_eq!(focused, "q", "/ focuses the search box");
    let search = page
        .find_element("input[name=q]")
        .await
        .expect("search box");
    search.type_str("probe").await.expect("type");
    search.press_key("Enter").await.expect("enter");
    wait_for(&page, "location.hash.includes('q=probe') && document.querySelector('main [role=status]')?.innerText.includes('contain')", 20, "the search ran").await;
    let found: Vec<(String, i64)> = eval(&page, GROUPS).await;
    assert_eq!(found.len(), 1, "one group contains 'probe': {found:?}");
    assert!(
        found[0].0.contains("probe failure on attempt 1"),
        "{found:?}"
    );
    assert_eq!(found[0].1, 1);

    click(&page, "tr.group button", "Replay group").await;
    wait_for(
        &page,
        "document.getElementById('confirm').open",
        5,
        "a confirmation",
    )
    .await;
    let question: String = eval(&page, "document.getElementById('confirm-text').innerText").await;
    assert!(question.contains("Replay 1 dead job"), "{question}");
    click(&page, "#confirm button", "Replay 1").await;
    f.wait_status(probe, "succeeded", 30).await;

    // The job's page (same tab, as a person follows a link) shows it
    // succeeded, with its history in order.
    page.evaluate(format!("location.hash = '#/job/{probe}'"))
        .await
        .expect("navigate");
    let job_page = &page;
    wait_for(
        job_page,
        "document.querySelector('main h2')?.innerText.includes('succeeded')",
        20,
        "the job page says succeeded",
    )
    .await;
    let events: Vec<String> = eval(
        job_page,
        "[...document.querySelectorAll('ol.events li strong')].map((e) => e.innerText)",
    )
    .await;
    assert_eq!(
        events.first().map(String::as_str),
        Some("job.queued"),
        "events in order: {events:?}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("job.succeeded"),
        "{events:?}"
    );
    assert!(events.contains(&"job.dead".to_owned()), "{events:?}");

    // Back to every dead letter: purge the scrape group after confirming.
    page.evaluate("location.hash = '#/dead'")
        .await
        .expect("navigate");
    wait_for(
        &page,
        &format!("{GROUPS}.length === 1 && {GROUPS}[0][1] === 3"),
        20,
        "one group of 3 left",
    )
    .await;
    click(&page, "tr.group button", "Purge group").await;
    wait_for(
        &page,
        "document.getElementById('confirm').open",
        5,
        "a confirmation",
    )
    .await;
    click(&page, "#confirm button", "Purge 3").await;
    wait_for(
        &page,
        "document.body.innerText.includes('No dead letters.')",
        20,
        "the group is gone",
    )
    .await;
    wait_for(
        &page,
        "document.getElementById('dead-count').innerText === ''",
        10,
        "the header count drops to none",
    )
    .await;
    let (_, dead) = f.get("/v1/dead-letters").await;
    assert_eq!(dead["jobs"], Value::Array(vec![]), "purged for good");

    // Pools: pause probe from its row, after confirming.
    page.evaluate("location.hash = '#/pools'")
        .await
        .expect("navigate");
    let probe_state = "document.querySelector('tr[data-pool=probe]')?.cells[1].innerText";
    wait_for(
        &page,
        &format!("{probe_state}?.includes('running')"),
        20,
        "the probe pool shows as running",
    )
    .await;
    click(&page, "tr[data-pool=probe] button", "Pause").await;
    wait_for(
        &page,
        "document.getElementById('confirm').open",
        5,
        "a confirmation",
    )
    .await;
    click(&page, "#confirm button", "Pause").await;
    wait_for(
        &page,
        &format!("{probe_state}?.includes('paused')"),
        20,
        "the probe pool shows as paused",
    )
    .await;
    let waiting = [
        f.probe(json!({}), json!({})).await,
        f.probe(json!({}), json!({})).await,
    ];
    let queued = "document.querySelector('tr[data-pool=probe]')?.cells[2].innerText";
    wait_for(
        &page,
        &format!("{queued} === '2'"),
        20,
        "the two submitted jobs wait in the paused pool",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for id in waiting {
        assert_eq!(f.job(id).await["status"], "queued", "started while paused");
    }
    screenshot(&page, "console-pools.png").await;
    click(&page, "tr[data-pool=probe] button", "Resume").await;
    wait_for(
        &page,
        "document.getElementById('confirm').open",
        5,
        "a confirmation",
    )
    .await;
    click(&page, "#confirm button", "Resume").await;
    for id in waiting {
        f.wait_status(id, "succeeded", 30).await;
    }
    wait_for(
        &page,
        &format!("{probe_state}?.includes('running') && {queued} === '0'"),
        20,
        "the pool runs again and nothing waits",
    )
    .await;

    // 10,000 jobs held in a paused pool, one of them with a distinct
    // payload: how long the console takes to find it (a figure, not a
    // pass/fail bound; the machine is shared).
    let (status, _) = f.post("/v1/pools/probe/pause", json!({})).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let mut batch: Vec<Value> = (0..9_999)
        .map(|_| json!({"kind": "probe", "payload": {}}))
        .collect();
    batch.push(json!({"kind": "probe", "payload": {"sleep_ms": 4242}}));
    for chunk in batch.chunks(1_000) {
        let (status, v) = f.post("/v1/jobs/batch", json!({"jobs": chunk})).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{v}");
    }
    let started = std::time::Instant::now();
    page.evaluate("location.hash = '#/jobs?q=4242'")
        .await
        .expect("navigate");
    wait_for(
        &page,
        "document.querySelector('main [role=status]')?.innerText.startsWith('1 of 10000 scanned')",
        60,
        "the search finds the one job among 10,000",
    )
    .await;
    eprintln!(
        "console: a text search over 10,000 jobs took {} ms",
        started.elapsed().as_millis()
    );

    browser.close().await;
    f.shutdown().await;
}
