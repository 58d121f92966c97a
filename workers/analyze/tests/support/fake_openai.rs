//! A stand-in for the OpenAI API on 127.0.0.1:0, because the real one cannot
//! be reached from here. It replays the body shapes OpenAI really sends
//! (chat.completion with usage, its error objects), counts requests and
//! records when each arrived and what it was answered.
//!
//! The workspace's own tests include this file too (`#[path]`), to point
//! real `stevedore worker` processes at it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the server answers to one request.
#[derive(Clone)]
pub enum Reply {
    /// A valid chat.completion answering every asked question with option
    /// `choice % options`, with usage 120 prompt + 30 completion tokens.
    Answer { choice: usize },
    /// A chat.completion whose message content is this text.
    Content(String),
    /// Any status, headers and body.
    Raw {
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: Value,
    },
    /// Never answers: for client timeouts.
    Hang,
}

/// One request the server answered: when it arrived, and the status sent.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub at: Instant,
    pub status: u16,
}

pub struct FakeOpenAi {
    pub base_url: String,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

#[derive(Clone)]
struct Shared {
    script: Arc<Mutex<VecDeque<Reply>>>,
    default: Reply,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeOpenAi {
    /// Serves `script` in order, then `default` for every later request.
    pub async fn start(script: Vec<Reply>, default: Reply) -> Self {
        let shared = Shared {
            script: Arc::new(Mutex::new(script.into())),
            default,
            requests: Arc::default(),
            bodies: Arc::default(),
            calls: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url: format!("http://{addr}/v1"),
            requests: shared.requests,
            bodies: shared.bodies,
            calls: shared.calls,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().expect("lock").clone()
    }

    /// Every answered request, in the order the answers were made.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }
}

async fn chat(State(s): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let at = Instant::now();
    let response = reply(&s, &headers, body).await;
    s.calls.lock().expect("lock").push(Call {
        at,
        status: response.status().as_u16(),
    });
    response
}

async fn reply(s: &Shared, headers: &HeaderMap, body: Value) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.bodies.lock().expect("lock").push(body.clone());
    let reply = s
        .script
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or(s.default.clone());
    let authorized =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer sk-test");
    if !authorized {
        return error(401, &[], invalid_api_key());
    }
    match reply {
        Reply::Answer { choice } => completion(&answers_for(&body, choice)),
        Reply::Content(text) => completion(&text),
        Reply::Raw {
            status,
            headers,
            body,
        } => error(status, &headers, body),
        Reply::Hang => std::future::pending().await,
    }
}

/// Answers every question of the request's user message.
fn answers_for(request: &Value, choice: usize) -> String {
    let user = request["messages"][1]["content"].as_str().unwrap_or("{}");
    let doc: Value = serde_json::from_str(user).unwrap_or_default();
    let answers: Vec<Value> = doc["questions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            let n = q["options"].as_array().map_or(1, Vec::len);
            json!({"question": q["question"], "choice": choice % n, "confidence": 0.8, "reason": "Fits the definition."})
        })
        .collect();
    json!({ "answers": answers }).to_string()
}

/// The shape of a real chat.completion response (gpt-4o-mini, 2025).
fn completion(content: &str) -> Response {
    let body = json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        },
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306"
    });
    (StatusCode::OK, Json(body)).into_response()
}

fn error(status: u16, headers: &[(&'static str, &'static str)], body: Value) -> Response {
    let mut response = (StatusCode::from_u16(status).expect("status"), Json(body)).into_response();
    for (k, v) in headers {
        response
            .headers_mut()
            .insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    response
}

pub fn invalid_api_key() -> Value {
    json!({"error": {
        "message": "Incorrect API key provided: sk-wrong. You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"
    }})
}

pub fn rate_limited() -> Reply {
    rate_limited_with(vec![
        ("retry-after", "20"),
        ("x-ratelimit-limit-requests", "3"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "20s"),
    ])
}

/// OpenAI's 429 body with these headers (`vec![]`: no hint when to retry).
pub fn rate_limited_with(headers: Vec<(&'static str, &'static str)>) -> Reply {
    Reply::Raw {
        status: 429,
        headers,
        body: json!({"error": {
            "message": "Rate limit reached for gpt-4o-mini in organization org-abc on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits to learn more.",
            "type": "requests", "param": null, "code": "rate_limit_exceeded"
        }}),
    }
}

pub fn server_error() -> Reply {
    Reply::Raw {
        status: 500,
        headers: vec![],
        body: json!({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": null, "code": null
        }}),
    }
}

pub fn model_not_found() -> Reply {
    Reply::Raw {
        status: 404,
        headers: vec![],
        body: json!({"error": {
            "message": "The model `gpt-9` does not exist or you do not have access to it.",
            "type": "invalid_request_error", "param": null, "code": "model_not_found"
        }}),
    }
}

pub fn schema_unsupported() -> Reply {
    Reply::Raw {
        status: 400,
        headers: vec![],
        body: json!({"error": {
            "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model. Learn more about supported models at the Structured Outputs guide: https://platform.openai.com/docs/guides/structured-outputs",
            "type": "invalid_request_error", "param": null, "code": null
        }}),
    }
}
