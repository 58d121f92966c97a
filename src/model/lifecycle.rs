//! Every lifecycle rule, once, as plain functions: [`next`] takes what a
//! job is ([`JobState`]) and what happened to it ([`Outcome`]) and returns
//! the [`Transition`] a store must apply, or [`Illegal`] when that outcome
//! cannot happen to a job in that state. Stores only apply transitions
//! (fenced per row on `from` and `attempt`), so Postgres and SQLite cannot
//! drift apart. Claiming and heartbeats stay in the stores' SQL (they are
//! the hot path and need the database's clock); their statuses come from
//! [`JobStatus::CLAIMABLE`] and [`JobStatus::Running`]. No I/O here.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use rand::Rng;
use stevedore_handler::JobError;
use uuid::Uuid;

use super::job::{AttemptError, Backoff, NewJob};
use super::status::{EventType, JobStatus};

/// The error recorded when a worker stops heartbeating.
pub const LEASE_EXPIRED: &str =
    "lease expired: the worker stopped heartbeating (killed, paused or cut off)";

/// The longest a handler may snooze a job at once.
pub const SNOOZE_MAX: Duration = Duration::from_secs(7 * 86_400);

/// What the rules need to know of a stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobState {
    pub id: Uuid,
    pub status: JobStatus,
    /// Attempts started so far; also the running attempt's fencing token.
    pub attempt: i32,
    /// The last attempt number allowed (moves on replay and hand-back).
    pub attempt_limit: i32,
    pub max_attempts: i32,
    pub backoff: Backoff,
    pub cancel_requested: bool,
}

/// What happened to a job.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The attempt's handler returned a result, and maybe jobs to submit.
    Succeeded {
        result: serde_json::Value,
        children: Vec<NewJob>,
    },
    /// The attempt's handler failed.
    Failed(JobError),
    /// Shutdown interrupted the attempt: it does not use up the budget.
    HandedBack,
    /// The worker stopped the attempt because a cancel was requested.
    StoppedForCancel,
    /// The worker stopped heartbeating and the lease ran out.
    LeaseExpired,
    /// A client asked to cancel the job.
    Cancel,
    /// An operator replays a dead letter with a fresh attempt budget.
    Replay,
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Succeeded { .. } => "success",
            Self::Failed(_) => "failure",
            Self::HandedBack => "hand-back",
            Self::StoppedForCancel => "stop for cancel",
            Self::LeaseExpired => "lease expiry",
            Self::Cancel => "cancel",
            Self::Replay => "replay",
        }
    }
}

/// When an outbox row makes the job due on its broker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Enqueue {
    /// At the database's now.
    Now,
    At(DateTime<Utc>),
}

/// One job's move, as a store applies it: only while the job is still in
/// `from` with this `attempt` (the fencing token), else not at all.
/// `finished_at` is set when `to` is terminal; the lease is kept only while
/// `to` is running.
#[derive(Debug, Clone)]
pub struct Transition {
    pub id: Uuid,
    pub from: JobStatus,
    pub attempt: i32,
    pub to: JobStatus,
    /// New attempt limit; `None` leaves it.
    pub attempt_limit: Option<i32>,
    /// The column's new value (`None` clears it).
    pub next_run_at: Option<DateTime<Utc>>,
    /// New flag; `None` leaves it.
    pub cancel_requested: Option<bool>,
    pub result: Option<serde_json::Value>,
    /// Appended to the job's error history.
    pub error: Option<AttemptError>,
    /// An outbox row to write, so the job reaches its broker.
    pub enqueue: Option<Enqueue>,
    /// The event to record, if watchers should see this move.
    pub event: Option<EventType>,
    /// Submitted in the same transaction, only if this transition applies.
    pub children: Vec<NewJob>,
}

impl Transition {
    fn from_state(s: &JobState, to: JobStatus) -> Self {
        Self {
            id: s.id,
            from: s.status,
            attempt: s.attempt,
            to,
            attempt_limit: None,
            next_run_at: None,
            cancel_requested: None,
            result: None,
            error: None,
            enqueue: None,
            event: (s.status != to).then(|| EventType::entering(to)),
            children: vec![],
        }
    }
}

/// An outcome that cannot happen to a job in this state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{outcome} is not allowed for a {} job", from.as_str())]
pub struct Illegal {
    pub from: JobStatus,
    pub outcome: &'static str,
}

/// The rules. `now` is when the outcome happened (errors and backoff are
/// stamped with it).
pub fn next(s: &JobState, outcome: Outcome, now: DateTime<Utc>) -> Result<Transition, Illegal> {
    use JobStatus::*;
    let illegal = Illegal {
        from: s.status,
        outcome: outcome.name(),
    };
    let t = match (s.status, outcome) {
        (Running, Outcome::Succeeded { result, children }) => Transition {
            result: Some(result),
            children,
            ..Transition::from_state(s, Succeeded)
        },
        (Running, Outcome::Failed(err)) => after_failure(s, &err, now),
        // Interrupted, not failed: the attempt is given back to the budget.
        (Running, Outcome::HandedBack) => Transition {
            attempt_limit: Some(s.attempt_limit + 1),
            enqueue: Some(Enqueue::Now),
            ..Transition::from_state(s, Queued)
        },
        (Running, Outcome::StoppedForCancel) => Transition::from_state(s, Cancelled),
        (Running, Outcome::LeaseExpired) => {
            let to = if s.cancel_requested {
                Cancelled
            } else if s.attempt >= s.attempt_limit {
                Dead
            } else {
                Retrying
            };
            // The worker may be alive but cut off: retry at once, since the
            // failure says nothing about the job itself.
            Transition {
                error: Some(AttemptError {
                    attempt: s.attempt,
                    class: "retryable".into(),
                    message: LEASE_EXPIRED.into(),
                    at: now,
                    retry_at: None,
                }),
                enqueue: (to == Retrying).then_some(Enqueue::Now),
                ..Transition::from_state(s, to)
            }
        }
        (Queued | Retrying, Outcome::Cancel) => Transition {
            cancel_requested: Some(true),
            ..Transition::from_state(s, Cancelled)
        },
        // A running attempt cannot be stopped from here: its worker sees
        // the flag at its next heartbeat and stops it (StoppedForCancel).
        (Running, Outcome::Cancel) => Transition {
            cancel_requested: Some(true),
            ..Transition::from_state(s, Running)
        },
        (Dead, Outcome::Replay) => Transition {
            attempt_limit: Some(s.attempt + s.max_attempts),
            cancel_requested: Some(false),
            enqueue: Some(Enqueue::Now),
            ..Transition::from_state(s, Queued)
        },
        _ => return Err(illegal),
    };
    Ok(t)
}

/// A permanent error, or a retryable one on the last allowed attempt, goes
/// to the dead letters; otherwise the job waits out its backoff (or the
/// delay the remote side asked for). A snooze waits as long as it asked,
/// without using the attempt.
fn after_failure(s: &JobState, err: &JobError, now: DateTime<Utc>) -> Transition {
    if let JobError::Snooze { reason, after } = err {
        // The attempt is given back, as on a hand-back: a job may snooze
        // as often as it needs without coming closer to the dead letters.
        let after = chrono::Duration::from_std((*after).min(SNOOZE_MAX))
            .unwrap_or(chrono::Duration::zero());
        let at = now.checked_add_signed(after).unwrap_or(now);
        return Transition {
            attempt_limit: Some(s.attempt_limit + 1),
            error: Some(AttemptError {
                attempt: s.attempt,
                class: "snoozed".into(),
                message: reason.clone(),
                at: now,
                retry_at: Some(at),
            }),
            next_run_at: Some(at),
            enqueue: Some(Enqueue::At(at)),
            ..Transition::from_state(s, JobStatus::Retrying)
        };
    }
    let mut error = AttemptError {
        attempt: s.attempt,
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
        JobError::Retryable { retry_after, .. } if s.attempt < s.attempt_limit => {
            let delay = retry_after.unwrap_or_else(|| retry_delay(s.backoff, s.attempt));
            let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            let at = now.checked_add_signed(delay).unwrap_or(now);
            error.retry_at = Some(at);
            Transition {
                error: Some(error),
                next_run_at: Some(at),
                enqueue: Some(Enqueue::At(at)),
                ..Transition::from_state(s, JobStatus::Retrying)
            }
        }
        _ => Transition {
            error: Some(error),
            ..Transition::from_state(s, JobStatus::Dead)
        },
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
#[path = "lifecycle_tests.rs"]
mod tests;
