//! Lifecycle decisions as plain functions: what a finished attempt turns
//! into, and how long a retry waits. Stores apply the result with one
//! conditional UPDATE; nothing here touches I/O, so the rules are tested
//! without a database.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use rand::Rng;
use stevedore_handler::JobError;
use uuid::Uuid;

use crate::job::{AttemptError, Backoff, JobStatus, NewJob};

/// What one attempt's end writes. Every variant is applied only if the job
/// is still `running` with this attempt number (the fencing token).
#[derive(Debug, Clone)]
pub enum Finish {
    Succeeded {
        result: serde_json::Value,
        children: Vec<NewJob>,
    },
    Retrying {
        error: AttemptError,
        next_run_at: DateTime<Utc>,
    },
    Dead {
        error: AttemptError,
    },
    Cancelled,
    /// Shutdown interrupted the attempt: back to `queued`, and the attempt
    /// does not count against the budget.
    HandedBack,
}

impl Finish {
    pub fn status(&self) -> JobStatus {
        match self {
            Self::Succeeded { .. } => JobStatus::Succeeded,
            Self::Retrying { .. } => JobStatus::Retrying,
            Self::Dead { .. } => JobStatus::Dead,
            Self::Cancelled => JobStatus::Cancelled,
            Self::HandedBack => JobStatus::Queued,
        }
    }

    pub fn error(&self) -> Option<&AttemptError> {
        match self {
            Self::Retrying { error, .. } | Self::Dead { error } => Some(error),
            _ => None,
        }
    }
}

/// One attempt's finish, addressed by its fencing token.
#[derive(Debug, Clone)]
pub struct FinishCmd {
    pub id: Uuid,
    pub attempt: i32,
    pub finish: Finish,
}

/// Decides what a failed attempt becomes: a permanent error, or a retryable
/// one on the last allowed attempt, goes to the dead letters; otherwise the
/// job waits out its backoff (or the delay the remote side asked for).
pub fn after_failure(
    attempt: i32,
    attempt_limit: i32,
    backoff: Backoff,
    err: &JobError,
    now: DateTime<Utc>,
) -> Finish {
    let mut error = AttemptError {
        attempt,
        class: if err.is_retryable() {
            "retryable"
        } else {
            "permanent"
        }
        .to_owned(),
        message: err.to_string(),
        at: now,
        retry_at: None,
    };
    match err {
        JobError::Retryable { retry_after, .. } if attempt < attempt_limit => {
            let delay = retry_after.unwrap_or_else(|| retry_delay(backoff, attempt));
            let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            let next_run_at = now.checked_add_signed(delay).unwrap_or(now);
            error.retry_at = Some(next_run_at);
            Finish::Retrying { error, next_run_at }
        }
        _ => Finish::Dead { error },
    }
}

/// The delay before retrying after failed attempt number `attempt` (1-based):
/// backon's exponential policy gives the capped ceiling `min(max, base·2^(n-1))`
/// and we draw uniformly below it ("full jitter"), so a burst of failures
/// does not come back as a burst. backon's own jitter only adds on top of the
/// ceiling, which keeps retries bunched.
pub fn retry_delay(backoff: Backoff, attempt: i32) -> Duration {
    let ceiling = ceiling(backoff, attempt);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

fn ceiling(backoff: Backoff, attempt: i32) -> Duration {
    let max = Duration::from_millis(backoff.max_ms);
    let mut policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(backoff.base_ms))
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build();
    let steps = attempt.clamp(1, 64);
    (1..steps).for_each(|_| {
        policy.next();
    });
    policy.next().unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base_ms: 100,
        max_ms: 1_000,
    };

    #[test]
    fn ceiling_doubles_then_caps() {
        let ms: Vec<u128> = (1..=6).map(|a| ceiling(B, a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn delay_is_jittered_below_the_ceiling() {
        let draws: Vec<Duration> = (0..200).map(|_| retry_delay(B, 3)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_millis(400)));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 20, "full jitter spreads the delays");
    }

    #[test]
    fn retryable_error_retries_until_the_limit_then_dies() {
        let now = Utc::now();
        let err = JobError::retryable("flaky");
        match after_failure(2, 3, B, &err, now) {
            Finish::Retrying { next_run_at, error } => {
                assert!(next_run_at >= now);
                assert!(next_run_at <= now + chrono::Duration::milliseconds(200));
                assert_eq!(error.class, "retryable");
                assert_eq!(error.attempt, 2);
            }
            other => panic!("expected retry, got {other:?}"),
        }
        assert!(matches!(
            after_failure(3, 3, B, &err, now),
            Finish::Dead { .. }
        ));
    }

    #[test]
    fn permanent_error_dies_at_once_and_retry_after_is_honoured() {
        let now = Utc::now();
        let dead = after_failure(1, 5, B, &JobError::permanent("bad"), now);
        assert_eq!(dead.status(), JobStatus::Dead);
        assert_eq!(dead.error().map(|e| e.class.as_str()), Some("permanent"));
        let err = JobError::retry_after("429", Duration::from_secs(7));
        match after_failure(1, 5, B, &err, now) {
            Finish::Retrying { next_run_at, .. } => {
                assert_eq!(next_run_at, now + chrono::Duration::seconds(7))
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }
}
