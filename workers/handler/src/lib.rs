//! The contract between the Stevedore core and its job kinds.
//!
//! A job kind is a payload type plus a [`Handler`] impl living in its own
//! worker crate. The core knows kinds only through this crate: it validates
//! payloads at submit time ([`Payload::validate`]), runs handlers with a
//! [`JobContext`], and maps a [`JobError`] to the job's next state. Worker
//! crates never see the store or the broker: progress reports leave through
//! a [`ProgressSink`] the worker installs.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A payload field that failed validation; `field` is a dotted path relative
/// to the payload (`sleep_ms`, `questions[2].options`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A job payload: parsed strictly (`#[serde(deny_unknown_fields)]` on the
/// type), then checked by `validate` for what serde cannot express.
pub trait Payload: DeserializeOwned + Serialize + Send + 'static {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// Parses and validates a payload, naming the offending field on failure.
pub fn parse_payload<P: Payload>(value: &serde_json::Value) -> Result<P, FieldError> {
    let payload: P = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldError::new(field, e.inner().to_string())
    })?;
    payload.validate()?;
    Ok(payload)
}

/// Why an attempt failed. The class decides the job's fate: retrying a
/// permanent error is a bug, so classify where the error happens.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// Timeouts, 429, 5xx, lost connections: try again after the backoff, or
    /// after `retry_after` when the remote side said how long to wait.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Bad input, 4xx, nothing to extract: the job goes to the dead letters.
    #[error("{message}")]
    Permanent { message: String },
    /// Not a failure: run again after `after` without using an attempt (a
    /// page that is not ready yet, a quota that resets at a known time).
    #[error("snoozed for {after:?}: {reason}")]
    Snooze { reason: String, after: Duration },
}

impl JobError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: Some(after),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    pub fn snooze(reason: impl Into<String>, after: Duration) -> Self {
        Self::Snooze {
            reason: reason.into(),
            after,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }
}

/// A job the running job asks the core to submit when it succeeds, in the
/// same transaction that records the success (chains such as scrape → analyze).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChildJob {
    pub kind: String,
    pub payload: serde_json::Value,
}

/// Longest progress message kept, in characters; longer ones are cut.
pub const MAX_PROGRESS_MESSAGE: usize = 200;

/// How far a running attempt got, as its handler reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// 0.0 to 1.0.
    pub fraction: f32,
    /// What the attempt is doing, at most [`MAX_PROGRESS_MESSAGE`] characters.
    pub message: String,
    /// A piece of the result ready before the whole (analyze: one answered
    /// question). Unlike plain reports, partials are never merged away.
    pub partial: Option<serde_json::Value>,
}

/// Where an attempt's progress reports go. The worker installs one that
/// records them, throttled; `report` is called from handler code (also
/// from blocking threads), so it must return at once and never do I/O.
pub trait ProgressSink: Send + Sync {
    fn report(&self, progress: Progress);
}

/// What a handler knows about the attempt it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job_id: Uuid,
    /// Attempt number, counting every attempt ever made (replays included).
    pub attempt: u32,
    /// Fired when the job is cancelled or its lease is lost: stop soon, the
    /// result will be discarded anyway.
    pub cancelled: CancellationToken,
    children: Arc<Mutex<Vec<ChildJob>>>,
    progress: Option<Sink>,
}

/// The installed sink; a newtype so that [`JobContext`] stays `Debug`.
#[derive(Clone)]
struct Sink(Arc<dyn ProgressSink>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

impl JobContext {
    pub fn new(job_id: Uuid, attempt: u32, cancelled: CancellationToken) -> Self {
        Self {
            job_id,
            attempt,
            cancelled,
            children: Arc::default(),
            progress: None,
        }
    }

    /// Sends this attempt's progress reports to `sink` (without one, as in
    /// tests and tools, they go nowhere).
    pub fn with_progress(mut self, sink: Arc<dyn ProgressSink>) -> Self {
        self.progress = Some(Sink(sink));
        self
    }

    /// Reports how far the attempt got: `fraction` from 0 to 1 (clamped)
    /// and a short message. Cheap and non-blocking: call it at every stage.
    /// The worker writes the latest report at most a few times a second
    /// (`GET /v1/jobs/{id}` shows it, the stream carries it as
    /// `job.progress`), so reports in quick succession merge.
    pub fn progress(&self, fraction: f32, message: impl Into<String>) {
        self.send(fraction, message.into(), None);
    }

    /// Reports progress with a piece of the result ready before the whole.
    /// Each partial is written (several in one write when they come fast),
    /// so a watcher sees every one.
    pub fn partial(&self, fraction: f32, message: impl Into<String>, partial: serde_json::Value) {
        self.send(fraction, message.into(), Some(partial));
    }

    fn send(&self, fraction: f32, mut message: String, partial: Option<serde_json::Value>) {
        let Some(Sink(sink)) = &self.progress else {
            return;
        };
        if let Some((cut, _)) = message.char_indices().nth(MAX_PROGRESS_MESSAGE) {
            message.truncate(cut);
        }
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        sink.report(Progress {
            fraction,
            message,
            partial,
        });
    }

    /// Queues a child job, submitted only if this attempt succeeds.
    pub fn spawn_child(&self, kind: impl Into<String>, payload: serde_json::Value) {
        let child = ChildJob {
            kind: kind.into(),
            payload,
        };
        // A poisoned lock means another thread panicked mid-push; the vector
        // itself is still valid, so keep going rather than lose the child.
        match self.children.lock() {
            Ok(mut c) => c.push(child),
            Err(p) => p.into_inner().push(child),
        }
    }

    pub fn take_children(&self) -> Vec<ChildJob> {
        match self.children.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

/// One job kind. `KIND` is stored with every job and must never change:
/// renaming it would orphan stored jobs, so it is not derived from the type.
pub trait Handler: Send + Sync + 'static {
    const KIND: &'static str;
    type Payload: Payload;
    type Output: Serialize + Send;

    /// Checks a parsed payload against this handler's configuration at
    /// submit (a model the deployment allows, say): what the payload type
    /// alone cannot know. A failure is a 422 naming the field.
    fn check(&self, _payload: &Self::Payload) -> Result<(), FieldError> {
        Ok(())
    }

    /// The concurrency key a job of this kind gets when its submit names
    /// none (scrape: the site's registrable domain, so the fleet's limit
    /// on one site holds without every client saying so).
    fn concurrency_key(&self, _payload: &Self::Payload) -> Option<String> {
        None
    }

    fn run(
        &self,
        ctx: &JobContext,
        payload: Self::Payload,
    ) -> impl Future<Output = Result<Self::Output, JobError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        n: u32,
        #[serde(default)]
        inner: Vec<Inner>,
    }
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        s: String,
    }
    impl Payload for P {
        fn validate(&self) -> Result<(), FieldError> {
            if self.n > 10 {
                return Err(FieldError::new("n", "must be at most 10"));
            }
            Ok(())
        }
    }

    #[test]
    fn parse_payload_names_nested_field_and_rejects_unknown() {
        let err = parse_payload::<P>(&serde_json::json!({"n": 1, "inner": [{"s": 3}]}))
            .expect_err("wrong type");
        assert_eq!(err.field, "inner[0].s");
        let err = parse_payload::<P>(&serde_json::json!({"n": 1, "extra": true}))
            .expect_err("unknown field");
        assert!(err.message.contains("unknown field"), "{err}");
        let err = parse_payload::<P>(&serde_json::json!({"n": 11})).expect_err("range");
        assert_eq!(err, FieldError::new("n", "must be at most 10"));
        assert_eq!(
            parse_payload::<P>(&serde_json::json!({"n": 3}))
                .expect("valid")
                .n,
            3
        );
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Progress>>);
    impl ProgressSink for Recorder {
        fn report(&self, p: Progress) {
            self.0.lock().expect("lock").push(p);
        }
    }

    #[test]
    fn progress_is_clamped_and_cut_and_goes_nowhere_without_a_sink() {
        JobContext::new(Uuid::nil(), 1, CancellationToken::new()).progress(0.5, "dropped");
        let rec = Arc::new(Recorder::default());
        let ctx =
            JobContext::new(Uuid::nil(), 1, CancellationToken::new()).with_progress(rec.clone());
        ctx.progress(1.5, "é".repeat(MAX_PROGRESS_MESSAGE + 5));
        ctx.progress(f32::NAN, "nan");
        ctx.partial(-1.0, "part", serde_json::json!({"answer": 1}));
        let got = rec.0.lock().expect("lock").clone();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].fraction, 1.0);
        assert_eq!(got[0].message.chars().count(), MAX_PROGRESS_MESSAGE);
        assert_eq!(got[1].fraction, 0.0);
        assert_eq!(got[2].fraction, 0.0);
        assert_eq!(got[2].partial, Some(serde_json::json!({"answer": 1})));
    }

    #[test]
    fn children_are_taken_once() {
        let ctx = JobContext::new(Uuid::nil(), 1, CancellationToken::new());
        ctx.spawn_child("probe", serde_json::json!({}));
        assert_eq!(ctx.take_children().len(), 1);
        assert!(ctx.take_children().is_empty());
    }
}
