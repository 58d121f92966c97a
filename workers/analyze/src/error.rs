//! Errors of the analysis providers and their mapping to the core's
//! [`JobError`] classes.
//!
//! Classification happens where the error is raised (the HTTP status, the
//! missing file); this module only decides how an invalid model reply ages:
//! retried while a later attempt may well produce a valid one, then dead.

use std::time::Duration;

use stevedore_handler::JobError;

/// How much of a raw model reply an error message keeps: enough to see what
/// went wrong, not so much that one bad reply bloats the job's error history.
const MAX_RAW_CHARS: usize = 2_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// A setting is wrong (key, model, URL, model file): retrying cannot help.
    #[error("{0}")]
    Misconfigured(String),
    /// The endpoint refused this request for good (other 4xx).
    #[error("{0}")]
    Rejected(String),
    /// 429: the endpoint's own limit is spent. Retryable like
    /// [`Self::Transient`], and the whole fleet backs off (the handler
    /// drains the shared bucket).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Timeouts, 5xx, lost connections.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The model answered, but not with a valid answer for every question.
    #[error("invalid model reply ({why}); raw reply: {raw}")]
    InvalidReply { why: String, raw: String },
}

impl ProviderError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid_reply(why: impl Into<String>, raw: &str) -> Self {
        let raw = if raw.chars().count() > MAX_RAW_CHARS {
            let cut: String = raw.chars().take(MAX_RAW_CHARS).collect();
            format!("{cut}… [truncated]")
        } else {
            raw.to_owned()
        };
        Self::InvalidReply {
            why: why.into(),
            raw,
        }
    }

    /// A short label for the `outcome` metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Misconfigured(_) => "misconfigured",
            Self::Rejected(_) => "rejected",
            Self::RateLimited { .. } => "rate_limited",
            Self::Transient { .. } => "transient",
            Self::InvalidReply { .. } => "invalid_reply",
        }
    }

    /// Maps to the core's classes. An invalid reply is retryable while
    /// `attempt < invalid_reply_attempts`: sampling may well give a valid
    /// reply next time, but a model that keeps failing would otherwise burn
    /// every attempt the job has.
    pub fn into_job_error(self, attempt: u32, invalid_reply_attempts: u32) -> JobError {
        let message = self.to_string();
        match self {
            Self::Misconfigured(_) | Self::Rejected(_) => JobError::permanent(message),
            Self::Transient {
                retry_after: Some(after),
                ..
            }
            | Self::RateLimited {
                retry_after: Some(after),
                ..
            } => JobError::retry_after(message, after),
            Self::Transient { .. } | Self::RateLimited { .. } => JobError::retryable(message),
            Self::InvalidReply { .. } if attempt < invalid_reply_attempts => {
                JobError::retryable(message)
            }
            Self::InvalidReply { .. } => JobError::permanent(format!(
                "{message} (gave up after {attempt} attempts with invalid replies)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_reply_is_retryable_then_permanent_and_keeps_the_raw_reply() {
        let e = ProviderError::invalid_reply("choice 9 out of range", "{\"answers\":9}");
        let first = e.clone().into_job_error(1, 3);
        assert!(first.is_retryable());
        let last = e.into_job_error(3, 3);
        assert!(!last.is_retryable());
        assert!(last.to_string().contains("{\"answers\":9}"), "{last}");
    }

    #[test]
    fn long_raw_replies_are_truncated() {
        let raw = "x".repeat(10_000);
        let ProviderError::InvalidReply { raw, .. } = ProviderError::invalid_reply("bad", &raw)
        else {
            unreachable!("constructor builds InvalidReply")
        };
        assert!(raw.len() < 2_100);
    }

    #[test]
    fn transient_keeps_the_retry_delay() {
        let e = ProviderError::RateLimited {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            e.into_job_error(1, 3),
            JobError::retry_after("429", Duration::from_secs(7))
        );
    }
}
