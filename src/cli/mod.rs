//! The operator CLI: thin commands over the HTTP API, with tables for
//! people and `--json` for scripts. `bench` lives in its own module, `watch`
//! and `webhooks` in `notify`.

pub mod bench;
pub mod bench_analyze;
pub mod bench_scrape;
pub mod demo_pages;
pub mod doctor;
pub mod keys;
pub mod limits;
pub mod notify;
pub mod pools;
pub mod schedules;

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::Value;

use crate::config::ClientArgs;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead jobs, newest first.
    List {
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One dead job with its error history.
    Show { id: String },
    /// Queue a dead job again with a fresh budget of attempts; without an
    /// id, every dead job the filter takes.
    Replay {
        id: Option<String>,
        #[command(flatten)]
        filter: DeadFilterArgs,
    },
    /// Delete a dead job; without an id, every dead job the filter takes.
    Purge {
        id: Option<String>,
        #[command(flatten)]
        filter: DeadFilterArgs,
    },
}

/// Which dead letters a bulk replay or purge takes.
#[derive(Debug, clap::Args)]
pub struct DeadFilterArgs {
    /// Only this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only jobs with this text in an error message (case ignored).
    #[arg(long)]
    pub error_contains: Option<String>,
    /// Only jobs that died at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only jobs that died before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
}

impl DeadFilterArgs {
    fn body(&self) -> Option<Value> {
        filter_body(&[
            ("kind", self.kind.as_deref()),
            ("error_contains", self.error_contains.as_deref()),
            ("since", self.since.as_deref()),
            ("until", self.until.as_deref()),
        ])
    }
}

/// A bulk action's filter as the API takes it: the fields given, or
/// `None` when none is.
fn filter_body(fields: &[(&str, Option<&str>)]) -> Option<Value> {
    let m: serde_json::Map<String, Value> = fields
        .iter()
        .filter_map(|(k, v)| Some(((*k).to_owned(), Value::from((*v)?))))
        .collect();
    (!m.is_empty()).then_some(Value::Object(m))
}

/// The one job named, or the filter: exactly one of them.
fn one_or_filter<'a>(
    id: &'a Option<String>,
    filter: &DeadFilterArgs,
) -> anyhow::Result<Result<&'a str, Value>> {
    match (id, filter.body()) {
        (Some(id), None) => Ok(Ok(id)),
        (None, Some(body)) => Ok(Err(body)),
        (Some(_), Some(_)) => bail!("give a job id or a filter, not both"),
        (None, None) => {
            bail!("give a job id, or a filter: --kind, --error-contains, --since, --until")
        }
    }
}

/// The HTTP client of every command: the API key (if any) on every
/// request, and JSON as the body type the API insists on for POST and
/// DELETE, bodiless ones included.
pub(crate) fn client(api_key: Option<&str>) -> anyhow::Result<reqwest::Client> {
    client_builder(api_key)?
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

pub(crate) fn client_builder(api_key: Option<&str>) -> anyhow::Result<reqwest::ClientBuilder> {
    use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = api_key.filter(|k| !k.is_empty()) {
        let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key holds characters a header cannot carry")?;
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
    }
    // The API is reached directly: a proxy from the environment would see
    // the key.
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy())
}

/// Sends a request and returns the JSON body, turning API errors into a
/// readable message.
pub(crate) async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = req
        .send()
        .await
        .context("the API is not reachable (is `stevedore dev` running? see --url)")?;
    let status = resp.status();
    let text = resp.text().await.context("reading the response")?;
    if status.is_success() {
        if text.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_str(&text).context("the API answered something that is not JSON");
    }
    let msg = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            let field = e
                .get("field")
                .and_then(Value::as_str)
                .map(|f| format!(" (field {f})"))
                .unwrap_or_default();
            Some(format!("{}{field}", e.get("message")?.as_str()?))
        })
        .unwrap_or(text);
    bail!("{status}: {msg}")
}

pub(crate) fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn print_job(job: &Value) {
    for k in [
        "id",
        "kind",
        "status",
        "attempt",
        "created_at",
        "started_at",
        "finished_at",
        "next_run_at",
    ] {
        println!("{k:<12} {}", s(job, k));
    }
    if let Some(r) = job.get("result").filter(|r| !r.is_null()) {
        println!("{:<12} {r}", "result");
    }
    if let Some(Value::Array(errors)) = job.get("errors") {
        for e in errors {
            println!(
                "{:<12} #{} {} {}: {}",
                "error",
                s(e, "attempt"),
                s(e, "at"),
                s(e, "class"),
                s(e, "message")
            );
        }
    }
    if let Some(Value::Array(kids)) = job.get("children") {
        for c in kids {
            println!(
                "{:<12} {} {} {}",
                "child",
                s(c, "id"),
                s(c, "kind"),
                s(c, "status")
            );
        }
    }
}

fn print_page(page: &Value) {
    println!(
        "{:<38} {:<10} {:<10} {:>7}  CREATED",
        "ID", "KIND", "STATUS", "ATTEMPT"
    );
    if let Some(Value::Array(jobs)) = page.get("jobs") {
        for j in jobs {
            println!(
                "{:<38} {:<10} {:<10} {:>7}  {}",
                s(j, "id"),
                s(j, "kind"),
                s(j, "status"),
                s(j, "attempt"),
                s(j, "created_at")
            );
        }
    }
}

pub(crate) fn output(c: &ClientArgs, v: &Value, human: impl Fn(&Value)) {
    if c.json {
        println!("{v}");
    } else {
        human(v);
    }
}

/// Submits a job; with `wait` (`Some(timeout)`), follows it to its end,
/// printing each state it enters and each progress report it shows on
/// stderr.
pub async fn submit(
    c: &ClientArgs,
    kind: &str,
    payload: &str,
    priority: Option<i32>,
    wait: Option<Option<Duration>>,
) -> anyhow::Result<()> {
    let payload: Value = serde_json::from_str(payload).context("--payload is not valid JSON")?;
    let http = client(c.api_key.as_deref())?;
    let mut body = serde_json::json!({"kind": kind, "payload": payload});
    if let Some(p) = priority {
        body["priority"] = p.into();
    }
    let accepted = call(http.post(format!("{}/v1/jobs", c.url)).json(&body)).await?;
    let id = s(&accepted, "id");
    let Some(timeout) = wait else {
        output(c, &accepted, |v| {
            println!("{} {}", s(v, "id"), s(v, "status"))
        });
        return Ok(());
    };
    if !c.json {
        eprintln!("submitted {id}; waiting…");
    }
    let started = std::time::Instant::now();
    let mut last = String::new();
    let mut last_progress = Value::Null;
    loop {
        let job = call(http.get(format!("{}/v1/jobs/{id}", c.url))).await?;
        let status = s(&job, "status");
        if status != last && !c.json {
            let attempt = s(&job, "attempt");
            eprintln!(
                "  {:>6.1}s  {status} (attempt {attempt})",
                started.elapsed().as_secs_f64()
            );
            last = status.clone();
        }
        let progress = &job["progress"];
        if !progress.is_null() && *progress != last_progress && !c.json {
            let pct = progress["fraction"].as_f64().unwrap_or(0.0) * 100.0;
            let message = progress["message"].as_str().unwrap_or_default();
            let at = started.elapsed().as_secs_f64();
            eprintln!("  {at:>6.1}s  {pct:>3.0}% {message}");
            last_progress = progress.clone();
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
            eprintln!(
                "job {id} is still {status} after {}s; it goes on (see `stevedore status {id}`)",
                t.as_secs()
            );
            std::process::exit(2);
        }
        if matches!(status.as_str(), "succeeded" | "dead" | "cancelled") {
            output(c, &job, print_job);
            if status != "succeeded" {
                bail!("job ended {status}");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cancels one job, or every active job of the kind and status given.
pub async fn cancel(
    c: &ClientArgs,
    id: Option<&str>,
    filter: &[(&str, Option<&str>)],
) -> anyhow::Result<()> {
    let http = client(c.api_key.as_deref())?;
    if let Some(id) = id {
        if filter.iter().any(|(_, v)| v.is_some()) {
            bail!("give a job id or --kind/--status/--concurrency-key, not both");
        }
        let v = call(http.post(format!("{}/v1/jobs/{id}/cancel", c.url))).await?;
        output(c, &v, |v| println!("{} {}", s(v, "id"), s(v, "status")));
        return Ok(());
    }
    let Some(body) = filter_body(filter) else {
        bail!("give a job id, or --kind, --status and/or --concurrency-key to cancel every job they take");
    };
    let v = call(http.post(format!("{}/v1/jobs/cancel", c.url)).json(&body)).await?;
    output(c, &v, |v| {
        println!(
            "{} cancelled, {} running told to stop",
            s(v, "cancelled"),
            s(v, "cancel_requested")
        )
    });
    Ok(())
}

pub async fn status(c: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let job = call(client(c.api_key.as_deref())?.get(format!("{}/v1/jobs/{id}", c.url))).await?;
    output(c, &job, print_job);
    Ok(())
}

pub async fn dlq(c: &ClientArgs, cmd: DlqCommand) -> anyhow::Result<()> {
    let http = client(c.api_key.as_deref())?;
    let base = format!("{}/v1/dead-letters", c.url);
    match cmd {
        DlqCommand::List { kind, limit } => {
            let mut req = http.get(&base).query(&[("limit", limit.to_string())]);
            if let Some(k) = kind {
                req = req.query(&[("kind", k)]);
            }
            output(c, &call(req).await?, print_page);
        }
        DlqCommand::Show { id } => {
            output(c, &call(http.get(format!("{base}/{id}"))).await?, print_job)
        }
        DlqCommand::Replay { id, filter } => match one_or_filter(&id, &filter)? {
            Ok(id) => {
                let v = call(http.post(format!("{base}/{id}/replay"))).await?;
                output(c, &v, |v| println!("{} {}", s(v, "id"), s(v, "status")));
            }
            Err(body) => {
                let v = call(http.post(format!("{base}/replay")).json(&body)).await?;
                output(c, &v, |v| println!("{} replayed", s(v, "count")));
            }
        },
        DlqCommand::Purge { id, filter } => match one_or_filter(&id, &filter)? {
            Ok(id) => {
                call(http.delete(format!("{base}/{id}"))).await?;
                output(c, &serde_json::json!({"id": id, "purged": true}), |_| {
                    println!("{id} purged")
                });
            }
            Err(body) => {
                let v = call(http.post(format!("{base}/purge")).json(&body)).await?;
                output(c, &v, |v| println!("{} purged", s(v, "count")));
            }
        },
    }
    Ok(())
}

/// The newcomer's first jobs, through the API of the fleet that just
/// started: a probe that fails once and succeeds on its retry, then the
/// embedded Moodle quiz page scraped over HTTP with an analyze job chained,
/// then a script-built quiz rendered in Chromium. `pages` is where
/// [`demo_pages::serve`] serves the quiz pages.
pub async fn demo(url: String, pages: String) {
    let c = ClientArgs {
        url: url.clone(),
        api_key: None,
        json: false,
    };
    // The API binds before this task first polls, but give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    eprintln!("demo: a probe job that fails once, then succeeds on its retry");
    if let Err(e) = submit(
        &c,
        "probe",
        r#"{"sleep_ms": 250, "fail_attempts": 1}"#,
        None,
        Some(None),
    )
    .await
    {
        eprintln!("demo failed: {e:#}");
        return;
    }
    eprintln!("\ndemo: a real quiz page scraped and analyzed by the local model (offline)");
    if let Err(e) = analyze_demo(&url, &pages).await {
        eprintln!("demo failed: {e:#}");
        return;
    }
    eprintln!("\ndemo: a quiz that only script builds, rendered in headless Chromium");
    match browser_demo(&url, &pages).await {
        Ok(()) => eprintln!("\ndemo: done. Watch jobs live at {url}/ ; Ctrl-C stops the fleet."),
        Err(e) => eprintln!("demo failed: {e:#}"),
    }
}

async fn analyze_demo(url: &str, pages: &str) -> anyhow::Result<()> {
    let http = client(None)?;
    let page = format!("{pages}/demo/quiz/moodle-multichoice.html");
    eprintln!("demo: scraping {page}, then analyzing its questions");
    let body = serde_json::json!({"kind": "scrape", "payload": {"url": page, "then": {"kind": "analyze"}}});
    let accepted = call(http.post(format!("{url}/v1/jobs")).json(&body)).await?;
    let parent = wait_done(&http, url, &s(&accepted, "id")).await?;
    let child = parent["children"][0]["id"]
        .as_str()
        .context("the scrape chained no analyze job")?
        .to_owned();
    let questions = parent["result"]["questions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!(
        "scrape job {}: {} questions from {}",
        s(&parent, "id"),
        questions.len(),
        s(&parent["result"], "title")
    );
    let job = wait_done(&http, url, &child).await?;
    let result = &job["result"];
    println!(
        "analyze job {child}: provider {}, model {}",
        s(result, "provider"),
        s(result, "model")
    );
    // Before the answers, so nobody reads a guess as knowledge first.
    if let Some(notice) = result["notice"].as_str() {
        println!("  note: {notice}");
    }
    for a in result["answers"].as_array().into_iter().flatten() {
        let qi = a["question"].as_u64().unwrap_or_default() as usize;
        let ci = a["choice"].as_u64().unwrap_or_default() as usize;
        let Some(q) = questions.get(qi) else { continue };
        let conf = a["confidence"].as_f64().unwrap_or_default();
        println!("  Q{}: {}", qi + 1, s(q, "text"));
        println!(
            "      -> {} ({:.0}% confident)",
            q["options"][ci].as_str().unwrap_or("?"),
            conf * 100.0
        );
    }
    Ok(())
}

async fn browser_demo(url: &str, pages: &str) -> anyhow::Result<()> {
    let http = client(None)?;
    let page = format!("{pages}/demo/quiz/spa-rendered.html");
    let body = serde_json::json!({"kind": "scrape", "payload": {"url": page}});
    let accepted = call(http.post(format!("{url}/v1/jobs")).json(&body)).await?;
    let job = wait_done(&http, url, &s(&accepted, "id")).await?;
    let questions = job["result"]["questions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!(
        "scrape job {}: {} questions from {}, rendered with {} (plain HTTP saw none)",
        s(&job, "id"),
        questions.len(),
        s(&job["result"], "title"),
        s(&job["result"], "rendered_with"),
    );
    for q in &questions {
        println!("  - {}", s(q, "text"));
    }
    Ok(())
}

/// Polls a job until it is finished; an end other than success is an error.
async fn wait_done(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<Value> {
    loop {
        let job = call(http.get(format!("{url}/v1/jobs/{id}"))).await?;
        match s(&job, "status").as_str() {
            "succeeded" => return Ok(job),
            "dead" | "cancelled" => {
                bail!("job {id} ended {}: {}", s(&job, "status"), job["errors"])
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
