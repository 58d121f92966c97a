//! The `probe` kind: a real job for synthetic end-to-end checks, drills and
//! benchmarks. It sleeps (in `progress_steps` equal steps, reporting
//! `step i of n` after each), snoozes for `snooze_ms` while the attempt
//! number (all attempts ever made, replays and snoozes included) is at most
//! `snooze_attempts`, then fails while it is at most `fail_attempts`. Its
//! result says how many probe handlers of its kind set were running when it
//! started, so tests can check a pool's concurrency from the handlers' side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stevedore_handler::{FieldError, Handler, JobContext, JobError, Payload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    #[default]
    Retryable,
    Permanent,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbePayload {
    #[serde(default)]
    pub sleep_ms: u64,
    #[serde(default)]
    pub fail_attempts: u32,
    #[serde(default)]
    pub failure: FailureClass,
    #[serde(default)]
    pub snooze_attempts: u32,
    #[serde(default)]
    pub snooze_ms: u64,
    #[serde(default)]
    pub progress_steps: u32,
}

impl Payload for ProbePayload {
    fn validate(&self) -> Result<(), FieldError> {
        if self.sleep_ms > 3_600_000 {
            return Err(FieldError::new("sleep_ms", "must be at most 3600000"));
        }
        if self.snooze_attempts > 1_000 {
            return Err(FieldError::new("snooze_attempts", "must be at most 1000"));
        }
        if self.snooze_ms > 3_600_000 {
            return Err(FieldError::new("snooze_ms", "must be at most 3600000"));
        }
        if self.progress_steps > 100 {
            return Err(FieldError::new("progress_steps", "must be at most 100"));
        }
        if self.fail_attempts > 1_000 {
            return Err(FieldError::new("fail_attempts", "must be at most 1000"));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct ProbeOutput {
    pub attempt: u32,
    pub slept_ms: u64,
    /// Probe handlers running when this one started, itself included.
    pub running_at_start: usize,
}

#[derive(Default)]
pub struct Probe {
    running: Arc<AtomicUsize>,
}

/// Counts a handler out however its future ends (returned, timed out,
/// cancelled).
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Handler for Probe {
    const KIND: &'static str = "probe";
    type Payload = ProbePayload;
    type Output = ProbeOutput;

    async fn run(&self, ctx: &JobContext, p: ProbePayload) -> Result<ProbeOutput, JobError> {
        let running_at_start = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = Running(self.running.clone());
        let steps = p.progress_steps.max(1);
        for i in 1..=steps {
            if p.sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(p.sleep_ms / u64::from(steps))).await;
            }
            if p.progress_steps > 0 {
                ctx.progress(i as f32 / steps as f32, format!("step {i} of {steps}"));
            }
        }
        if ctx.attempt <= p.snooze_attempts {
            return Err(JobError::snooze(
                format!("probe snooze on attempt {}", ctx.attempt),
                Duration::from_millis(p.snooze_ms),
            ));
        }
        if ctx.attempt <= p.fail_attempts {
            let msg = format!(
                "probe failure on attempt {} (fails while attempt <= {})",
                ctx.attempt, p.fail_attempts
            );
            return Err(match p.failure {
                FailureClass::Retryable => JobError::retryable(msg),
                FailureClass::Permanent => JobError::permanent(msg),
            });
        }
        Ok(ProbeOutput {
            attempt: ctx.attempt,
            slept_ms: p.sleep_ms,
            running_at_start,
        })
    }
}
