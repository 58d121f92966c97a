//! [`AnalyzeHandler`]: the `analyze` kind's [`Handler`], and its
//! configuration.
//!
//! One run: look every question up in the answer cache, send the misses to
//! the provider in one call (after the shared rate limit allows it, for
//! `openai`), check every answer, store the new ones, and return them all in
//! question order. Each answered question is reported as a partial result
//! as soon as it is known ([`Partials`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;
use stevedore_handler::{FieldError, Handler, JobContext, JobError};

use crate::cache::{cache_keys, AnswerCache, CachedAnswer, MemoryAnswerCache};
use crate::error::ProviderError;
use crate::local::{LocalProvider, WeightFormat};
use crate::metrics::Metrics;
use crate::openai::{OpenAiConfig, OpenAiProvider};
use crate::payload::{AnalyzeOutput, AnalyzePayload, Answer, ProviderKind, Question, Usage};
use crate::ratelimit::{self, AcquireError, Cost, MemoryRateLimiter, RateLimiter, RateLimits};

/// Where `scripts/fetch-model.sh` puts the model, relative to the repo root.
pub const DEFAULT_LOCAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// How long the fleet pauses after a 429 that says nothing of when to come
/// back. OpenAI sends a hint nearly always; without one, a second (the
/// granularity of `Retry-After`) plus the emptied bucket's refill spaces
/// calls out again without parking the fleet for long on a guess.
pub const DRAIN_WITHOUT_HINT: Duration = Duration::from_secs(1);

/// Everything the core passes in; it reads the environment, this crate never
/// does.
pub struct AnalyzeConfig {
    /// `Some` makes `openai` the default provider (the core builds it when
    /// `OPENAI_API_KEY` or `OPENAI_BASE_URL` is set).
    pub openai: Option<OpenAiConfig>,
    /// `STEVEDORE_LOCAL_MODEL`, else [`DEFAULT_LOCAL_MODEL`].
    pub local_model_path: PathBuf,
    pub local_weights: WeightFormat,
    /// Shared limits for `openai` calls, keyed by provider and model. The
    /// local model is bounded by its own process's CPU and is not limited.
    pub rate_limiter: Arc<dyn RateLimiter>,
    pub cache: Arc<dyn AnswerCache>,
    /// Attempts below this retry an invalid model reply; from this one on it
    /// is permanent.
    pub invalid_reply_attempts: u32,
    /// Models a payload may ask `openai` for besides the configured default
    /// (`STEVEDORE_ANALYZE_MODELS`): a free-text model would let a caller
    /// pick the most expensive one, and dodge the per-model rate limit and
    /// multiply metric labels by varying the name.
    pub models: Vec<String>,
}

impl AnalyzeConfig {
    /// In-process limiter and cache, for tests and tools (`stevedore dev`
    /// keeps both in its SQLite file).
    pub fn in_process(openai: Option<OpenAiConfig>, local_model_path: impl Into<PathBuf>) -> Self {
        Self {
            openai,
            local_model_path: local_model_path.into(),
            local_weights: WeightFormat::default(),
            rate_limiter: Arc::new(MemoryRateLimiter::new(RateLimits::per_minute(500, 200_000))),
            cache: Arc::new(MemoryAnswerCache::new(
                Duration::from_secs(7 * 24 * 3600),
                100_000,
            )),
            invalid_reply_attempts: 3,
            models: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeInitError {
    #[error("registering analyze metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("openai provider: {0}")]
    OpenAi(#[from] ProviderError),
}

/// Cheap to clone; clones share providers, cache, limiter and metrics.
#[derive(Clone)]
pub struct AnalyzeHandler {
    inner: Arc<Inner>,
}

struct Inner {
    openai: Option<OpenAiProvider>,
    local: LocalProvider,
    limiter: Arc<dyn RateLimiter>,
    cache: Arc<dyn AnswerCache>,
    invalid_reply_attempts: u32,
    models: Vec<String>,
    metrics: Metrics,
}

impl AnalyzeHandler {
    /// Registers the metrics into `registry`; does not load the local model
    /// (the first local job does, once per process).
    pub fn new(config: AnalyzeConfig, registry: &Registry) -> Result<Self, AnalyzeInitError> {
        let openai = config.openai.map(OpenAiProvider::new).transpose()?;
        Ok(Self {
            inner: Arc::new(Inner {
                openai,
                local: LocalProvider::new(config.local_model_path, config.local_weights),
                limiter: config.rate_limiter,
                cache: config.cache,
                invalid_reply_attempts: config.invalid_reply_attempts.max(1),
                models: config
                    .models
                    .iter()
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect(),
                metrics: Metrics::new(registry)?,
            }),
        })
    }

    pub fn default_provider(&self) -> ProviderKind {
        if self.inner.openai.is_some() {
            ProviderKind::Openai
        } else {
            ProviderKind::Local
        }
    }

    /// The local provider, e.g. to load its model at start-up (readiness).
    pub fn local(&self) -> &LocalProvider {
        &self.inner.local
    }
}

impl Handler for AnalyzeHandler {
    const KIND: &'static str = "analyze";
    type Payload = AnalyzePayload;
    type Output = AnalyzeOutput;

    fn check(&self, payload: &AnalyzePayload) -> Result<(), FieldError> {
        let Some(requested) = payload.model.as_deref() else {
            return Ok(());
        };
        let provider = payload.provider.unwrap_or_else(|| self.default_provider());
        let allowed = self.inner.allowed_models(provider);
        if allowed.iter().any(|m| m == requested) {
            return Ok(());
        }
        Err(FieldError::new(
            "model",
            format!(
                "{requested:?} is not a model this deployment offers for {}; allowed: {}",
                provider.as_str(),
                allowed.join(", ")
            ),
        ))
    }

    async fn run(
        &self,
        ctx: &JobContext,
        payload: AnalyzePayload,
    ) -> Result<AnalyzeOutput, JobError> {
        let provider = payload.provider.unwrap_or_else(|| self.default_provider());
        let model = self.inner.model_for(provider, payload.model.as_deref())?;
        self.inner
            .run(ctx, provider, &model, payload.questions)
            .await
    }
}

impl Inner {
    /// What a payload may name as its model.
    fn allowed_models(&self, provider: ProviderKind) -> Vec<String> {
        match (provider, &self.openai) {
            (ProviderKind::Openai, Some(o)) => std::iter::once(o.default_model().to_owned())
                .chain(self.models.iter().cloned())
                .collect(),
            (ProviderKind::Openai, None) => Vec::new(),
            (ProviderKind::Local, _) => vec![self.local.model_name().to_owned()],
        }
    }

    fn model_for(
        &self,
        provider: ProviderKind,
        requested: Option<&str>,
    ) -> Result<String, JobError> {
        match provider {
            ProviderKind::Openai => match &self.openai {
                // Checked at submit too; a job stored before the list
                // changed must not slip past it.
                Some(_)
                    if requested
                        .is_some_and(|m| !self.allowed_models(provider).iter().any(|a| a == m)) =>
                {
                    Err(JobError::permanent(format!(
                        "model {:?} is not offered by this deployment",
                        requested.unwrap_or_default()
                    )))
                }
                Some(o) => Ok(requested.unwrap_or(o.default_model()).to_owned()),
                None => Err(JobError::permanent(
                    "provider \"openai\" requested but no endpoint is configured: set \
                     OPENAI_API_KEY (and OPENAI_BASE_URL for a non-OpenAI server)",
                )),
            },
            ProviderKind::Local => {
                let name = self.local.model_name();
                match requested {
                    Some(m) if m != name => Err(JobError::permanent(format!(
                        "the local provider serves {name:?} only, not {m:?}: omit \"model\" or \
                         point STEVEDORE_LOCAL_MODEL at that file"
                    ))),
                    _ => Ok(name.to_owned()),
                }
            }
        }
    }

    async fn run(
        &self,
        ctx: &JobContext,
        provider: ProviderKind,
        model: &str,
        questions: Vec<Question>,
    ) -> Result<AnalyzeOutput, JobError> {
        let keys = cache_keys(provider, model, &questions);
        let mut answers = self.cached(&keys, &questions).await;
        let partials = Partials::new(ctx, &questions);
        answers.iter().flatten().for_each(|a| partials.answered(a));
        let cached = answers.iter().filter(|a| a.is_some()).count();
        let missed: Vec<(usize, Question)> = questions
            .iter()
            .enumerate()
            .filter(|(i, _)| answers[*i].is_none())
            .map(|(i, q)| (i, q.clone()))
            .collect();
        let mut usage = Usage::default();
        if !missed.is_empty() {
            ctx.progress(
                cached as f32 / questions.len() as f32,
                format!(
                    "asking {model} about {} question{}",
                    missed.len(),
                    if missed.len() == 1 { "" } else { "s" }
                ),
            );
            let (fresh, used) = self.call(ctx, provider, model, missed, &partials).await?;
            usage = used;
            let mut entries = Vec::with_capacity(fresh.len());
            for a in fresh {
                entries.push((
                    keys[a.question].clone(),
                    CachedAnswer {
                        choice: a.choice,
                        confidence: a.confidence,
                        reason: a.reason.clone(),
                    },
                ));
                let slot = a.question;
                answers[slot] = Some(a);
            }
            if let Err(e) = self.cache.put_many(&entries).await {
                tracing::warn!(error = %e, "Answer cache write failed; answers not cached.");
            }
        }
        let answers = answers
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                a.ok_or_else(|| JobError::permanent(format!("question {i} got no answer")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_answers(&answers, &questions)?;
        let notice = match provider {
            ProviderKind::Local => self.local.notice().await,
            ProviderKind::Openai => None,
        };
        Ok(AnalyzeOutput {
            provider,
            model: model.to_owned(),
            answers,
            usage,
            cached,
            notice,
        })
    }

    /// Cache hits, one slot per question. The cache only saves calls: when it
    /// is down the job still runs, at the price of model calls.
    async fn cached(&self, keys: &[String], questions: &[Question]) -> Vec<Option<Answer>> {
        let found = match self.cache.get_many(keys).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "Answer cache read failed; treating all as misses.");
                vec![None; keys.len()]
            }
        };
        let answers: Vec<Option<Answer>> = found
            .into_iter()
            .zip(questions)
            .enumerate()
            .map(|(i, (hit, q))| {
                hit.filter(|h| h.choice < q.options.len() && (0.0..=1.0).contains(&h.confidence))
                    .map(|h| Answer {
                        question: i,
                        choice: h.choice,
                        confidence: h.confidence,
                        reason: h.reason,
                    })
            })
            .collect();
        let hits = answers.iter().filter(|a| a.is_some()).count() as u64;
        let lookups = &self.metrics.cache_lookups;
        lookups.with_label_values(&["hit"]).inc_by(hits);
        lookups
            .with_label_values(&["miss"])
            .inc_by(keys.len() as u64 - hits);
        answers
    }

    async fn call(
        &self,
        ctx: &JobContext,
        provider: ProviderKind,
        model: &str,
        missed: Vec<(usize, Question)>,
        partials: &Partials,
    ) -> Result<(Vec<Answer>, Usage), JobError> {
        let labels = [provider.as_str(), model];
        let limit_key = format!("{}:{model}", provider.as_str());
        let mut reserved = 0;
        if provider == ProviderKind::Openai {
            reserved = estimate_tokens(&missed);
            let cost = Cost {
                requests: 1,
                tokens: reserved,
            };
            let waited =
                ratelimit::acquire(self.limiter.as_ref(), &limit_key, cost, &ctx.cancelled)
                    .await
                    .map_err(|e| match e {
                        // The lease is gone or the job cancelled: the core drops
                        // this attempt's result whatever it is.
                        AcquireError::Cancelled => JobError::retryable(e.to_string()),
                        AcquireError::Limiter(e) => JobError::retryable(e.to_string()),
                    })?;
            self.metrics
                .rate_limit_wait_seconds
                .with_label_values(&labels)
                .observe(waited.as_secs_f64());
        }
        let started = Instant::now();
        let result = match provider {
            ProviderKind::Openai => match &self.openai {
                Some(o) => {
                    let asked: Vec<(usize, &Question)> =
                        missed.iter().map(|(i, q)| (*i, q)).collect();
                    o.complete(model, &asked).await.map(|c| {
                        c.answers.iter().for_each(|a| partials.answered(a));
                        (c.answers, c.usage)
                    })
                }
                None => Err(ProviderError::Misconfigured(
                    "no openai endpoint configured".into(),
                )),
            },
            ProviderKind::Local => {
                let partials = partials.clone();
                self.local
                    .answer_each(missed, &ctx.cancelled, move |a| partials.answered(a))
                    .await
                    .map(|c| (c.answers, c.usage))
            }
        };
        if let Err(ProviderError::RateLimited { retry_after, .. }) = &result {
            // Every process sharing the bucket backs off, not only this job:
            // the others would otherwise keep spending calls the endpoint
            // refuses, each earning its own 429.
            let for_ = retry_after.unwrap_or(DRAIN_WITHOUT_HINT);
            if let Err(e) = self.limiter.drain(&limit_key, for_).await {
                tracing::warn!(error = %e, "Could not drain the rate limit after a 429.");
            }
        }
        let outcome = result
            .as_ref()
            .map(|_| "ok")
            .unwrap_or_else(|e| e.outcome());
        self.metrics
            .model_calls
            .with_label_values(&[labels[0], labels[1], outcome])
            .inc();
        self.metrics
            .model_call_seconds
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
        let (answers, usage) = result.map_err(|e| {
            tracing::info!(job.id = %ctx.job_id, provider = labels[0], model, error = %e, "Model call failed.");
            e.into_job_error(ctx.attempt, self.invalid_reply_attempts)
        })?;
        let tokens = &self.metrics.tokens;
        tokens
            .with_label_values(&[labels[0], labels[1], "prompt"])
            .inc_by(usage.prompt_tokens);
        tokens
            .with_label_values(&[labels[0], labels[1], "completion"])
            .inc_by(usage.completion_tokens);
        if provider == ProviderKind::Openai && usage.total() > 0 {
            let extra = usage.total() as i64 - reserved as i64;
            if let Err(e) = self.limiter.settle(&limit_key, extra).await {
                tracing::warn!(error = %e, "Could not settle rate-limit tokens.");
            }
        }
        Ok((answers, usage))
    }
}

/// What one call is expected to cost before the endpoint says: ~4 characters
/// a token for the prompt, plus room for each answer's JSON and reason.
fn estimate_tokens(missed: &[(usize, Question)]) -> u64 {
    let chars: usize = missed
        .iter()
        .map(|(_, q)| q.text.len() + q.options.iter().map(|o| o.len() + 4).sum::<usize>() + 40)
        .sum::<usize>()
        + crate::prompt::SYSTEM_PROMPT.len();
    (chars / 4 + missed.len() * 40) as u64
}

/// Whether an answer points at an existing option (`options[i]`: how many
/// question `i` has) with a confidence in 0..=1, whatever produced it.
fn points_at_option(a: &Answer, options: &[usize]) -> bool {
    options.get(a.question).is_some_and(|n| a.choice < *n) && (0.0..=1.0).contains(&a.confidence)
}

fn option_counts(questions: &[Question]) -> Vec<usize> {
    questions.iter().map(|q| q.options.len()).collect()
}

/// Reports each answered question as a partial result,
/// `{"answer": {"question", "choice", "confidence", "reason"?}}` (an item
/// of the result's `answers`), with the share of questions answered so far.
/// Only answers that pass the result's own check are reported: a partial is
/// stored, and model output is checked before anything is.
#[derive(Clone)]
struct Partials(Arc<PartialsInner>);

struct PartialsInner {
    ctx: JobContext,
    options: Vec<usize>,
    answered: AtomicUsize,
}

impl Partials {
    fn new(ctx: &JobContext, questions: &[Question]) -> Self {
        Self(Arc::new(PartialsInner {
            ctx: ctx.clone(),
            options: option_counts(questions),
            answered: AtomicUsize::new(0),
        }))
    }

    fn answered(&self, a: &Answer) {
        let p = &self.0;
        if !points_at_option(a, &p.options) {
            return;
        }
        let n = p.answered.fetch_add(1, Ordering::Relaxed) + 1;
        let total = p.options.len();
        p.ctx.partial(
            n as f32 / total as f32,
            format!("answered question {} of {total}", a.question + 1),
            serde_json::json!({ "answer": a }),
        );
    }
}

/// The last word before anything is stored: every answer points at an
/// existing option with a confidence in 0..=1, whatever produced it.
fn check_answers(answers: &[Answer], questions: &[Question]) -> Result<(), JobError> {
    let options = option_counts(questions);
    for (i, a) in answers.iter().enumerate() {
        if a.question != i || !points_at_option(a, &options) {
            return Err(JobError::permanent(format!(
                "invalid answer for question {i}: {a:?}"
            )));
        }
    }
    Ok(())
}
