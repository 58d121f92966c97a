//! The `local` provider: a small GGUF model run in-process with candle, on
//! the CPU, with nothing fetched at run time.
//!
//! The model is loaded on first use and kept for the life of the process:
//! every [`LocalProvider`] for the same file and weight format shares one
//! copy (loading takes about a second and a few hundred MB, so doing it per
//! job or per handler would dominate). Inference is CPU-bound and runs under
//! `spawn_blocking`, never on the async workers.

mod llama;
mod model;
mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

pub use model::{LocalModel, Scored, WeightFormat};
pub use tokenizer::{GgufTokenizer, TokenizerError};

use crate::error::ProviderError;
use crate::payload::{Answer, Question, Usage};

/// The script that puts the default model in place; named in the error a
/// missing model gives.
pub const FETCH_SCRIPT: &str = "scripts/fetch-model.sh";

/// Below this many weights a local model's answers carry a
/// [`tiny_model_notice`]: the bundled SmolLM2-135M scores about chance on
/// `fixtures/analyze/labelled.json`, and a confident-looking wrong answer
/// must not pass for knowledge.
pub const TINY_MODEL_PARAMETERS: u64 = 1_000_000_000;

/// What a result from a tiny local model says where people read it (the
/// demo's output, the display page); `None` for a model big enough to try.
pub fn tiny_model_notice(model: &str, parameters: u64) -> Option<String> {
    (parameters < TINY_MODEL_PARAMETERS).then(|| {
        format!(
            "answered by {model} ({}M parameters), a tiny offline model — expect guesses; \
             point analyze at a real model for real answers (OPENAI_BASE_URL, see the README)",
            (parameters + 500_000) / 1_000_000
        )
    })
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LocalError {
    #[error(
        "local model file {path} not found: run {FETCH_SCRIPT} (it puts SmolLM2 into models/), \
         or point STEVEDORE_LOCAL_MODEL at a llama-architecture GGUF"
    )]
    Missing { path: String },
    #[error("local model file {path} cannot be used: {message}")]
    Invalid { path: String, message: String },
    #[error("question too long for the local model: {tokens} tokens, at most {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("local model inference failed: {0}")]
    Inference(String),
}

impl From<LocalError> for ProviderError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Missing { .. } | LocalError::Invalid { .. } => {
                ProviderError::Misconfigured(e.to_string())
            }
            // Same input, same model, same failure: retrying cannot help.
            LocalError::TooLong { .. } | LocalError::Inference(_) => {
                ProviderError::Rejected(e.to_string())
            }
        }
    }
}

type Slot = Arc<OnceCell<Arc<LocalModel>>>;

/// One slot per (file, format) for the whole process.
fn slot(path: &Path, format: WeightFormat) -> Slot {
    static SLOTS: OnceLock<Mutex<HashMap<(PathBuf, WeightFormat), Slot>>> = OnceLock::new();
    let slots = SLOTS.get_or_init(Mutex::default);
    // Poison means a panic while inserting an Arc; the map is still sound.
    let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
    slots
        .entry((path.to_path_buf(), format))
        .or_default()
        .clone()
}

/// What answering a batch produced.
pub struct LocalCompletion {
    pub answers: Vec<Answer>,
    pub usage: Usage,
}

pub struct LocalProvider {
    path: PathBuf,
    format: WeightFormat,
    name: String,
    model: Slot,
}

impl LocalProvider {
    pub fn new(path: impl Into<PathBuf>, format: WeightFormat) -> Self {
        let path = path.into();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "local".into());
        let model = slot(&path, format);
        Self {
            path,
            format,
            name,
            model,
        }
    }

    /// The model's name in results and cache keys: the file name without
    /// `.gguf`, known before the file is loaded.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// Loads the model on first call; a failed load is not remembered, so a
    /// model fetched after the failure is picked up by the next job.
    pub async fn model(&self) -> Result<Arc<LocalModel>, LocalError> {
        self.model
            .get_or_try_init(|| async {
                let (path, format) = (self.path.clone(), self.format);
                let started = std::time::Instant::now();
                let model = tokio::task::spawn_blocking(move || LocalModel::load(&path, format))
                    .await
                    .map_err(|e| LocalError::Inference(format!("model load panicked: {e}")))??;
                tracing::info!(path = %self.path.display(), format = ?self.format,
                    elapsed_ms = started.elapsed().as_millis() as u64, "Local model loaded.");
                Ok(Arc::new(model))
            })
            .await
            .cloned()
    }

    /// The [`tiny_model_notice`] for this model, if it is tiny. Reads only
    /// the file's header when no job has loaded the model yet (every answer
    /// came from the cache); `None` when the file cannot be read, since the
    /// answers were then not this file's.
    pub async fn notice(&self) -> Option<String> {
        let parameters = match self.model.get() {
            Some(model) => model.parameters(),
            None => {
                let path = self.path.clone();
                match tokio::task::spawn_blocking(move || LocalModel::read_parameters(&path)).await
                {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "Could not read the local model's size.");
                        return None;
                    }
                    Err(_) => return None,
                }
            }
        };
        tiny_model_notice(&self.name, parameters)
    }

    /// Scores every asked question; stops between questions once the job is
    /// cancelled (the result would be discarded).
    pub async fn answer(
        &self,
        asked: Vec<(usize, Question)>,
        cancelled: &CancellationToken,
    ) -> Result<LocalCompletion, ProviderError> {
        self.answer_each(asked, cancelled, |_| {}).await
    }

    /// [`Self::answer`], calling `answered` with each answer as soon as it
    /// is scored (on the blocking thread that scores: keep it cheap).
    pub async fn answer_each(
        &self,
        asked: Vec<(usize, Question)>,
        cancelled: &CancellationToken,
        answered: impl Fn(&Answer) + Send + 'static,
    ) -> Result<LocalCompletion, ProviderError> {
        let model = self.model().await?;
        let cancelled = cancelled.clone();
        let run = tokio::task::spawn_blocking(move || {
            let mut answers = Vec::with_capacity(asked.len());
            let mut tokens = 0;
            for (index, q) in &asked {
                if cancelled.is_cancelled() {
                    return Err(ProviderError::transient("cancelled during local inference"));
                }
                let scored = model.score(q)?;
                tokens += scored.tokens;
                let answer = Answer {
                    question: *index,
                    choice: scored.choice,
                    confidence: scored.confidence,
                    reason: None,
                };
                answered(&answer);
                answers.push(answer);
            }
            Ok(LocalCompletion {
                answers,
                usage: Usage {
                    prompt_tokens: tokens,
                    completion_tokens: 0,
                },
            })
        });
        run.await
            .map_err(|e| ProviderError::transient(format!("local inference task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::tiny_model_notice;

    #[test]
    fn only_a_tiny_model_gets_the_notice() {
        let notice = tiny_model_notice("SmolLM2-360M-Instruct", 361_821_120).unwrap_or_default();
        assert!(notice.starts_with("answered by SmolLM2-360M-Instruct (362M parameters), a tiny"));
        assert_eq!(
            tiny_model_notice("Qwen2.5-7B-Instruct", 7_615_616_512),
            None
        );
    }
}
