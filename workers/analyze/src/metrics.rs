//! Prometheus metrics of the analyze kind, registered into the registry the
//! core serves on `/metrics`.
//!
//! Cache hit ratio is `hits / (hits + misses)` over
//! `stevedore_analyze_cache_lookups_total{result}`.

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Calls by provider, model and outcome (`ok`, `transient`, `invalid_reply`, ...).
    pub model_calls: IntCounterVec,
    pub model_call_seconds: HistogramVec,
    /// Tokens by provider, model and kind (`prompt`, `completion`).
    pub tokens: IntCounterVec,
    /// Lookups by result (`hit`, `miss`).
    pub cache_lookups: IntCounterVec,
    /// Time spent waiting for the shared rate limit, by provider and model.
    pub rate_limit_wait_seconds: HistogramVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let model_calls = IntCounterVec::new(
            Opts::new(
                "stevedore_analyze_model_calls_total",
                "Model calls by provider, model and outcome.",
            ),
            &["provider", "model", "outcome"],
        )?;
        let model_call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "stevedore_analyze_model_call_seconds",
                "Latency of one model call (all questions of a job that missed the cache).",
            )
            .buckets(exponential_buckets(0.05, 2.0, 12)?),
            &["provider", "model"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "stevedore_analyze_tokens_total",
                "Tokens used by model calls, by provider, model and kind.",
            ),
            &["provider", "model", "kind"],
        )?;
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "stevedore_analyze_cache_lookups_total",
                "Answer cache lookups per question, by result.",
            ),
            &["result"],
        )?;
        let rate_limit_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "stevedore_analyze_rate_limit_wait_seconds",
                "Time a model call waited for the shared rate limit.",
            )
            .buckets(exponential_buckets(0.01, 3.0, 10)?),
            &["provider", "model"],
        )?;
        registry.register(Box::new(model_calls.clone()))?;
        registry.register(Box::new(model_call_seconds.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(rate_limit_wait_seconds.clone()))?;
        Ok(Self {
            model_calls,
            model_call_seconds,
            tokens,
            cache_lookups,
            rate_limit_wait_seconds,
        })
    }
}
