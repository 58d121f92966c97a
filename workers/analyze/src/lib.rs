//! The `analyze` job kind: given quiz questions with their options, pick an
//! answer for each with a confidence.
//!
//! Two providers: `openai` (any OpenAI-compatible chat completions endpoint,
//! structured output with a plain-JSON fallback) and `local` (a GGUF model run
//! in-process with candle, scoring each option by log-likelihood, offline).
//! Calls to `openai` share a rate limit across processes; answers are cached
//! under everything that shaped them (see [`cache`]), and a payload's `model`
//! must be one the deployment offers (checked at submit).
//!
//! The core builds one [`AnalyzeHandler`] per process from an
//! [`AnalyzeConfig`] and registers it under [`AnalyzeHandler::KIND`]
//! (`"analyze"`):
//!
//! ```no_run
//! # use std::{sync::Arc, time::Duration};
//! # use stevedore_analyze::*;
//! # async fn build(conn: redis::aio::ConnectionManager) -> Result<AnalyzeHandler, AnalyzeInitError> {
//! let registry = prometheus::Registry::new();
//! let handler = AnalyzeHandler::new(
//!     AnalyzeConfig {
//!         openai: Some(OpenAiConfig {
//!             base_url: "https://api.openai.com/v1".into(),
//!             api_key: Some("sk-...".into()),
//!             model: "gpt-4o-mini".into(),
//!             timeout: Duration::from_secs(60),
//!         }),
//!         local_model_path: DEFAULT_LOCAL_MODEL.into(),
//!         local_weights: WeightFormat::Q8_0,
//!         rate_limiter: Arc::new(RedisRateLimiter::new(
//!             conn.clone(),
//!             "stevedore:",
//!             RateLimits::per_minute(500, 200_000),
//!         )),
//!         cache: Arc::new(RedisAnswerCache::new(conn, "stevedore:", Duration::from_secs(7 * 86_400))),
//!         invalid_reply_attempts: 3,
//!         models: vec!["gpt-4o".into()],
//!     },
//!     &registry,
//! )?;
//! # Ok(handler) }
//! ```
//!
//! # Layout
//! - [`payload`]: payload (validated at submit) and result types
//! - [`handler`]: the [`Handler`](stevedore_handler::Handler) impl and config
//! - [`openai`]: the OpenAI-compatible provider and HTTP error classification
//! - [`prompt`]: the chat prompt (scraped text as quoted data) and reply checks
//! - [`local`]: the candle provider, its GGUF tokenizer and option scoring
//! - [`ratelimit`]: token buckets in Redis (Lua) and in process; drained on 429
//! - [`cache`]: the answer cache in Redis and in process
//! - [`metrics`]: Prometheus metrics
//! - [`error`]: provider errors and their mapping to retryable / permanent

pub mod cache;
pub mod error;
pub mod handler;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod payload;
pub mod prompt;
pub mod ratelimit;

pub use cache::{AnswerCache, CachedAnswer, MemoryAnswerCache, RedisAnswerCache};
pub use error::ProviderError;
pub use handler::{AnalyzeConfig, AnalyzeHandler, AnalyzeInitError, DEFAULT_LOCAL_MODEL};
pub use local::{LocalProvider, WeightFormat};
pub use openai::OpenAiConfig;
pub use payload::{AnalyzeOutput, AnalyzePayload, Answer, ProviderKind, Question, Usage};
pub use ratelimit::{MemoryRateLimiter, RateLimiter, RateLimits, RedisRateLimiter};
