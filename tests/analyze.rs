//! The analyze kind through the whole pipeline (API → broker → worker →
//! store) with the local model on the fixture quizzes: every answer picks a
//! real option, a separate `stevedore dev` process with nothing shared
//! gives the same answers, and the second time it is answered from the
//! cache (on SQLite, the file's) without a model call.

mod support;

use serde_json::{json, Value};
use support::{Flavor, Opts, TestFleet};

fn quizzes() -> Vec<(String, Vec<Value>)> {
    let expected: Value = serde_json::from_str(include_str!("../fixtures/quiz/expected.json"))
        .expect("expected.json");
    [
        "moodle-multichoice.html",
        "jsonld-quiz.html",
        "spa-rendered.html",
    ]
    .iter()
    .map(|page| {
        let qs = expected[page]["questions"]
            .as_array()
            .expect("questions")
            .iter()
            .map(|q| json!({"text": q["text"], "options": q["options"]}))
            .collect();
        ((*page).to_owned(), qs)
    })
    .collect()
}

async fn analyze(f: &TestFleet, questions: &[Value]) -> Value {
    let (status, v) = f
        .post(
            "/v1/jobs",
            json!({"kind": "analyze", "payload": {"questions": questions}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("id").parse().expect("uuid");
    f.wait_status(id, "succeeded", 180).await["result"].clone()
}

/// The same questions answered by a separate `stevedore dev` process on its
/// own empty file: no cache or handler shared with this test's fleet.
async fn answers_from_another_process(questions: &[Value]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = support::procs::free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let args = [
        "dev",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().expect("path"),
        "--concurrency",
        "1",
    ];
    let env = [
        ("STEVEDORE_LOCAL_MODEL", model.to_owned()),
        ("STEVEDORE_LOG", "warn".to_owned()),
    ];
    let _dev = support::procs::Proc::stevedore(&args, &env, dir.path(), "dev");
    support::procs::wait_port(port, 60).await;
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let v: Value = http
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"kind": "analyze", "payload": {"questions": questions}}))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    let id = v["id"].as_str().expect("id").to_owned();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let job: Value = http
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .expect("job")
            .json()
            .await
            .expect("json");
        if job["status"] == "succeeded" {
            return job["result"].clone();
        }
        assert!(
            job["status"] != "dead" && tokio::time::Instant::now() < deadline,
            "the other process's analyze job: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn local_model_answers_the_fixture_quizzes_deterministically(flavor: Flavor) {
    let f = TestFleet::start_with(
        flavor,
        Opts {
            workers: vec![("analyze".into(), 2)],
            ..Opts::default()
        },
    )
    .await;
    let mut correct = 0;
    let mut total = 0;
    let expected: Value =
        serde_json::from_str(include_str!("../fixtures/quiz/expected.json")).expect("json");
    for (page, questions) in quizzes() {
        let first = analyze(&f, &questions).await;
        assert_eq!(first["provider"], "local");
        let answers = first["answers"].as_array().expect("answers");
        assert_eq!(
            answers.len(),
            questions.len(),
            "{page}: one answer per question"
        );
        for a in answers {
            let q = a["question"].as_u64().expect("question index") as usize;
            let c = a["choice"].as_u64().expect("choice index") as usize;
            let n = questions[q]["options"].as_array().expect("options").len();
            assert!(c < n, "{page}: choice {c} within {n} options");
            let conf = a["confidence"].as_f64().expect("confidence");
            assert!((0.0..=1.0).contains(&conf));
            total += 1;
            if expected[&page]["questions"][q]["correct"].as_u64() == Some(c as u64) {
                correct += 1;
            }
        }
        if flavor == Flavor::Sqlite && page.starts_with("moodle") {
            // Determinism that can fail: a run that shares nothing.
            let other = answers_from_another_process(&questions).await;
            assert_eq!(other["cached"], 0, "{page}: the other run used the model");
            assert_eq!(
                other["answers"], first["answers"],
                "{page}: an independent run picks the same answers"
            );
        }
        let again = analyze(&f, &questions).await;
        assert_eq!(
            again["answers"], first["answers"],
            "{page}: same quiz, same answers"
        );
        assert_eq!(
            again["cached"],
            questions.len(),
            "{page}: the second run is answered from the cache"
        );
        assert_eq!(
            again["usage"]["prompt_tokens"], 0,
            "{page}: and costs no model call"
        );
    }
    if let Some(pool) = &f.backend.sqlite {
        // Dev mode keeps the cache in its SQLite file, where other
        // processes on the file find it too.
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM analyze_answers")
            .fetch_one(pool)
            .await
            .expect("count cached answers");
        assert_eq!(rows, total, "every answer cached in the SQLite file");
    } else {
        // Production keeps it in Redis, shared by every worker process.
        let mut r = ::redis::Client::open(support::redis_url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}:analyze:answer:*", f.redis_prefix))
            .query_async(&mut r)
            .await
            .expect("keys");
        assert_eq!(keys.len() as i64, total, "every answer cached in Redis");
    }
    println!("local model accuracy on the fixtures: {correct}/{total}");
    f.shutdown().await;
}

both_flavors!(local_model_answers_the_fixture_quizzes_deterministically);
