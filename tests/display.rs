//! The display page in headless Chromium, as a person reads it: a real
//! analyze job (its provider an OpenAI-shaped test server on loopback whose
//! answers the test chooses) finishes while the page is open, and again when
//! a fresh page loads it from the stream's history. Every question's text
//! shows, the chosen option is marked with its confidence as "NN%", and its
//! bar is filled to that width. An answer from the bundled tiny model is
//! labelled as one; the endpoint's answers carry no such label.

mod support;

#[path = "chromium/mod.rs"]
mod chromium;
#[allow(dead_code)]
#[path = "../workers/analyze/tests/support/fake_openai.rs"]
mod fake_openai;

use std::time::Duration;

use chromium::{eval, screenshot, wait_for, Chromium};
use chromiumoxide::Page;
use fake_openai::{FakeOpenAi, Reply};
use serde_json::{json, Value};
use stevedore::api::auth::Access;
use stevedore::auth::{generate, AuthSecret, Scope};
use stevedore::config::KindsArgs;
use stevedore::fleet::{self, ApiRole, Roles, Shared};
use stevedore::store::keys::NewKey;
use support::{fast_dispatcher, fast_notify, fast_timing, Flavor, TestFleet};

/// (question, options, chosen index, confidence): what the model "answers".
const QUIZ: &[(&str, &[&str], usize, f64)] = &[
    (
        "Which planet is known as the Red Planet?",
        &["Venus", "Mars", "Jupiter", "Saturn"],
        1,
        0.70,
    ),
    (
        "At sea level, water boils at which temperature?",
        &["90 °C", "100 °C", "110 °C"],
        1,
        0.93,
    ),
    (
        "Which language is Stevedore written in?",
        &["Go", "Python", "Rust"],
        2,
        0.55,
    ),
    (
        "How many sides does a hexagon have?",
        &["5", "6", "8"],
        1,
        0.42,
    ),
];

/// What the page shows for one job's result, question by question.
const READ_RESULT: &str = r#"[...document.querySelectorAll('.result')]
  .filter((r) => r.dataset.job === JOB)
  .map((r) => [...r.querySelectorAll('.question')].map((q) => {
    const marked = [...q.querySelectorAll('.option.chosen')];
    const c = marked[0];
    const bar = c && c.querySelector('.bar');
    const fill = bar && bar.firstElementChild;
    return {
      text: q.querySelector('.text').innerText,
      marked: marked.length,
      chosen: c ? c.querySelector('.opt').innerText : null,
      pct: c ? c.querySelector('.pct').innerText : null,
      ratio: bar ? fill.getBoundingClientRect().width / bar.getBoundingClientRect().width : null,
      options: [...q.querySelectorAll('.option .opt')].map((o) => o.innerText),
    };
  }))[0]"#;

/// Waits until the page shows the job's result and its bars have finished
/// growing, then checks every question against `QUIZ`.
async fn assert_shows_answers(page: &Page, job: &str, when: &str) {
    let js = READ_RESULT.replace("JOB", &format!("{job:?}"));
    wait_for(page, &js, 30, &format!("{when}: the result of {job}")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let shown: Vec<Value> = loop {
        let shown: Vec<Value> = eval(page, &js).await;
        let settled = shown.len() == QUIZ.len()
            && shown.iter().zip(QUIZ).all(|(s, (.., conf))| {
                s["ratio"].as_f64().is_some_and(|r| (r - conf).abs() < 0.01)
            });
        if settled || tokio::time::Instant::now() >= deadline {
            break shown;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        shown.len(),
        QUIZ.len(),
        "{when}: one block per question: {shown:?}"
    );
    for (s, (text, options, choice, conf)) in shown.iter().zip(QUIZ) {
        assert_eq!(s["text"], *text, "{when}: the question's text: {s}");
        assert_eq!(
            s["options"].as_array().map(Vec::len),
            Some(options.len()),
            "{when}: {s}"
        );
        assert_eq!(s["marked"], 1, "{when}: exactly one option marked: {s}");
        let chosen = s["chosen"].as_str().unwrap_or_default();
        assert!(
            chosen.contains(options[*choice]),
            "{when}: {text:?} marks {:?}, shows {chosen:?}",
            options[*choice]
        );
        let pct = format!("{}%", (conf * 100.0).round());
        assert_eq!(s["pct"], pct.as_str(), "{when}: confidence in words: {s}");
        let ratio = s["ratio"].as_f64().unwrap_or(-1.0);
        assert!(
            (ratio - conf).abs() < 0.01,
            "{when}: {text:?} bar filled to {ratio:.3} of its width, not {conf}"
        );
    }
}

/// A job answered by the bundled SmolLM2 (`provider: local`): the page
/// says, above the answers, that a tiny offline model guessed them.
async fn the_tiny_local_model_is_named_as_such(url: &str, page: &Page) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"kind": "analyze", "payload": {
            "questions": [{"text": QUIZ[0].0, "options": QUIZ[0].1}],
            "provider": "local"
        }}))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let job: Value = r.json().await.expect("json");
    let id = job["id"].as_str().expect("id");
    let shown = wait_for(
        page,
        &format!(
            "[...document.querySelectorAll('.result')].find((r) => r.dataset.job === {id:?})\
             ?.querySelector('.notice')?.innerText"
        ),
        60,
        "the local model's answer with its notice",
    )
    .await;
    let shown = shown.as_str().unwrap_or_default();
    assert!(
        shown.contains("answered by SmolLM2-135M-Instruct")
            && shown.contains("a tiny offline model — expect guesses")
            && shown.contains("point analyze at a real model"),
        "{shown}"
    );
    // The result fades in: let it finish before a screenshot is taken.
    wait_for(
        page,
        "document.getAnimations().every((a) => a.playState === 'finished')",
        10,
        "the new result has faded in",
    )
    .await;
}

/// Keys for a deployment with keys: (read key for the page, submit key).
struct Keys {
    read: String,
    submit: String,
}

/// Types the read key into the page's key form, as a person would.
async fn enter_key(page: &Page, key: &str) {
    wait_for(
        page,
        "document.getElementById('key-form') !== null",
        20,
        "the page asks for a key",
    )
    .await;
    let state: String = eval(page, "document.getElementById('conn').innerText").await;
    assert_ne!(state, "live", "no stream without a key");
    let _: bool = eval(
        page,
        &format!(
            "(() => {{ document.getElementById('key-input').value = {key:?}; \
             document.getElementById('key-form').requestSubmit(); return true; }})()"
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_display_page_shows_what_analysis_answered_live_and_from_history() {
    shows_answers(false).await;
}

/// With API keys the page asks for a read key once per tab, opens the
/// stream with a ticket, and shows the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_the_display_asks_for_a_key_and_shows_the_answers() {
    shows_answers(true).await;
}

async fn shows_answers(with_keys: bool) {
    let answers: Vec<Value> = QUIZ
        .iter()
        .enumerate()
        .map(|(i, (.., choice, conf))| {
            json!({"question": i, "choice": choice, "confidence": conf, "reason": "Stated in the question's own field."})
        })
        .collect();
    let model = FakeOpenAi::start(
        vec![],
        Reply::Content(json!({ "answers": answers }).to_string()),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backend, _) = TestFleet::backend(Flavor::Sqlite, dir.path(), "display").await;
    let kinds = fleet::kinds(
        &KindsArgs {
            openai_base_url: Some(model.base_url.clone()),
            openai_api_key: Some("sk-test".into()),
            ..KindsArgs::default()
        },
        Shared::local(&backend),
    )
    .expect("kinds");
    let mut api = ApiRole::open("127.0.0.1:0".parse().expect("addr"));
    let mut keys = None;
    if with_keys {
        let secret = AuthSecret::new(vec![42u8; 32]).expect("secret");
        let mut made = Vec::new();
        for scope in [Scope::Read, Scope::Submit] {
            let g = generate(&secret);
            backend
                .keys
                .create_key(&NewKey {
                    id: uuid::Uuid::now_v7(),
                    hash: g.hash,
                    prefix: g.prefix,
                    tenant: "display".into(),
                    scope,
                    name: None,
                    rate: None,
                    max_queued: None,
                })
                .await
                .expect("key");
            made.push(g.key);
        }
        keys = Some(Keys {
            read: made[0].clone(),
            submit: made[1].clone(),
        });
        api.access = Access::keys(backend.keys.clone(), secret);
    }
    let roles = Roles::new(fast_timing())
        .with_api(api)
        .with_dispatcher(fast_dispatcher())
        .with_workers(vec![("analyze".into(), 1)])
        .with_notifier()
        .with_notify(fast_notify(""));
    let running = fleet::start(backend, kinds, roles).await.expect("fleet");
    let url = format!("http://{}", running.addr.expect("api address"));

    let browser = Chromium::launch(1280, 900).await;
    let live = browser.open(&format!("{url}/")).await;
    if let Some(k) = &keys {
        enter_key(&live, &k.read).await;
    }
    wait_for(
        &live,
        "document.getElementById('conn').innerText === 'live'",
        20,
        "the page connects",
    )
    .await;

    let questions: Vec<Value> = QUIZ
        .iter()
        .map(|(text, options, ..)| json!({"text": text, "options": options}))
        .collect();
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"kind": "analyze", "payload": {"questions": questions}}));
    if let Some(k) = &keys {
        req = req.bearer_auth(&k.submit);
    }
    let r = req.send().await.expect("submit");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let job: Value = r.json().await.expect("json");
    let id = job["id"].as_str().expect("id").to_owned();

    assert_shows_answers(&live, &id, "live").await;
    let row = wait_for(
        &live,
        &format!("[...document.querySelectorAll('#jobs li')].find((li) => li.dataset.job === {id:?} && li.innerText.includes('succeeded'))?.innerText"),
        10,
        "the job's row says succeeded",
    )
    .await;
    assert!(row.as_str().is_some_and(|r| r.contains("analyze")), "{row}");
    assert_eq!(model.requests(), 1, "one model call answered the job");

    let history = browser.open(&format!("{url}/")).await;
    if let Some(k) = &keys {
        enter_key(&history, &k.read).await;
    }
    assert_shows_answers(&history, &id, "from history").await;
    let notice: Value = eval(
        &history,
        &format!("[...document.querySelectorAll('.result')].find((r) => r.dataset.job === {id:?}).querySelectorAll('.notice').length"),
    )
    .await;
    assert_eq!(notice, 0, "answers from a real model carry no warning");
    if !with_keys {
        the_tiny_local_model_is_named_as_such(&url, &history).await;
        screenshot(&history, "display.png").await;
    }

    browser.close().await;
    running.shutdown().await;
}
