//! The `analyze` job's payload and result types, and the checks the core runs
//! on a payload at submit time.
//!
//! A scrape job's output can be passed on unchanged: its question objects may
//! carry the page's answer key as `correct`, which is accepted and never used
//! (it must not reach the model, or the result would be a copy of the key).

use serde::{Deserialize, Serialize};
use stevedore_handler::{FieldError, Payload};

pub const MAX_QUESTIONS: usize = 100;
pub const MIN_OPTIONS: usize = 2;
pub const MAX_OPTIONS: usize = 10;
/// Bounds the prompt a single job can build: a page with a 1 MB question is
/// an extraction bug, not a quiz.
pub const MAX_TEXT_CHARS: usize = 4_000;
pub const MAX_OPTION_CHARS: usize = 1_000;
const MAX_MODEL_CHARS: usize = 200;

/// Which backend answers the questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible chat completions endpoint.
    Openai,
    /// The in-process GGUF model, scored by log-likelihood.
    Local,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Local => "local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub text: String,
    pub options: Vec<String>,
    /// The page's answer key, when the scrape found one. Ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzePayload {
    pub questions: Vec<Question>,
    /// Overrides the configured model (`openai`); must name the loaded model
    /// file when given for `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Defaults to `openai` when an endpoint is configured, else `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderKind>,
}

impl Payload for AnalyzePayload {
    fn validate(&self) -> Result<(), FieldError> {
        let n = self.questions.len();
        if n == 0 || n > MAX_QUESTIONS {
            return Err(FieldError::new(
                "questions",
                format!("must hold 1 to {MAX_QUESTIONS} questions, got {n}"),
            ));
        }
        for (i, q) in self.questions.iter().enumerate() {
            if q.text.trim().is_empty() {
                return Err(FieldError::new(
                    format!("questions[{i}].text"),
                    "must not be empty",
                ));
            }
            if q.text.chars().count() > MAX_TEXT_CHARS {
                return Err(FieldError::new(
                    format!("questions[{i}].text"),
                    format!("must be at most {MAX_TEXT_CHARS} characters"),
                ));
            }
            let k = q.options.len();
            if !(MIN_OPTIONS..=MAX_OPTIONS).contains(&k) {
                return Err(FieldError::new(
                    format!("questions[{i}].options"),
                    format!("must hold {MIN_OPTIONS} to {MAX_OPTIONS} options, got {k}"),
                ));
            }
            for (j, o) in q.options.iter().enumerate() {
                if o.trim().is_empty() || o.chars().count() > MAX_OPTION_CHARS {
                    return Err(FieldError::new(
                        format!("questions[{i}].options[{j}]"),
                        format!("must be 1 to {MAX_OPTION_CHARS} characters, not blank"),
                    ));
                }
            }
        }
        if let Some(m) = &self.model {
            if m.trim().is_empty() || m.chars().count() > MAX_MODEL_CHARS {
                return Err(FieldError::new(
                    "model",
                    format!("must be 1 to {MAX_MODEL_CHARS} characters"),
                ));
            }
        }
        Ok(())
    }
}

/// One answered question; `question` and `choice` index into the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub question: usize,
    pub choice: usize,
    pub confidence: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyzeOutput {
    pub provider: ProviderKind,
    pub model: String,
    /// One per question, in question order.
    pub answers: Vec<Answer>,
    /// Tokens spent by this job's model calls (cache hits cost none).
    pub usage: Usage,
    /// How many answers came from the answer cache.
    pub cached: usize,
    /// Said wherever the answers are shown, when they deserve less trust
    /// than they look: set for a tiny local model (see
    /// [`crate::local::tiny_model_notice`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use stevedore_handler::parse_payload;

    #[test]
    fn scrape_output_with_answer_key_is_accepted_unchanged() {
        let p: AnalyzePayload = parse_payload(&json!({
            "questions": [{"text": "2+2?", "options": ["3", "4"], "correct": 1}],
            "provider": "local"
        }))
        .expect("valid");
        assert_eq!(p.questions[0].correct, Some(1));
        assert_eq!(p.provider, Some(ProviderKind::Local));
    }

    #[test]
    fn invalid_payloads_name_the_field() {
        let cases = [
            (json!({"questions": []}), "questions"),
            (
                json!({"questions": [{"text": "q", "options": ["a"]}]}),
                "questions[0].options",
            ),
            (
                json!({"questions": [{"text": " ", "options": ["a", "b"]}]}),
                "questions[0].text",
            ),
            (
                json!({"questions": [{"text": "q", "options": ["a", ""]}]}),
                "questions[0].options[1]",
            ),
            (
                json!({"questions": [{"text": "q", "options": ["a", "b"], "hint": 1}]}),
                "questions[0].hint",
            ),
            (
                json!({"questions": [{"text": "q", "options": ["a", "b"]}], "provider": "x"}),
                "provider",
            ),
        ];
        for (value, field) in cases {
            let err = parse_payload::<AnalyzePayload>(&value).expect_err("invalid");
            assert_eq!(err.field, field, "{value}: {err}");
        }
        let many: Vec<_> = (0..101)
            .map(|i| json!({"text": format!("q{i}"), "options": ["a", "b"]}))
            .collect();
        let err = parse_payload::<AnalyzePayload>(&json!({ "questions": many })).expect_err("101");
        assert_eq!(err.field, "questions");
    }
}
