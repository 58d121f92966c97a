//! The registry of job kinds: turns each typed [`Handler`] into an erased
//! [`DynHandler`] that validates and runs JSON payloads. Adding a kind is one
//! `register` line where the fleet is assembled.

pub mod probe;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use stevedore_handler::{parse_payload, FieldError, Handler, JobContext, JobError};

/// A handler with its payload and output types erased to JSON.
pub trait DynHandler: Send + Sync {
    /// Checks the payload; answers the concurrency key the kind gives a job
    /// that names none.
    fn validate(&self, payload: &serde_json::Value) -> Result<Option<String>, FieldError>;
    fn run<'a>(
        &'a self,
        ctx: &'a JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>>;
}

impl<H: Handler> DynHandler for H {
    /// The payload's shape, then what the handler's configuration allows.
    fn validate(&self, payload: &serde_json::Value) -> Result<Option<String>, FieldError> {
        let p = parse_payload::<H::Payload>(payload)?;
        Handler::check(self, &p)?;
        Ok(Handler::concurrency_key(self, &p))
    }

    fn run<'a>(
        &'a self,
        ctx: &'a JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        async move {
            // Stored payloads were validated at submit; failing here means the
            // kind's schema changed under a stored job, which retrying won't fix.
            let payload = parse_payload::<H::Payload>(&payload)
                .map_err(|e| JobError::permanent(format!("invalid stored payload: {e}")))?;
            let out = Handler::run(self, ctx, payload).await?;
            serde_json::to_value(out)
                .map_err(|e| JobError::permanent(format!("result is not JSON: {e}")))
        }
        .boxed()
    }
}

/// The kinds this process knows, by stable name.
#[derive(Clone, Default)]
pub struct Kinds {
    map: BTreeMap<&'static str, Arc<dyn DynHandler>>,
}

impl Kinds {
    pub fn register<H: Handler>(mut self, handler: H) -> Self {
        self.map.insert(H::KIND, Arc::new(handler));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DynHandler>> {
        self.map.get(kind)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.map.keys().copied().collect()
    }
}
