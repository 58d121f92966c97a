//! The process's `tracing` subscriber: logs (text or JSON on stderr,
//! filtered by `STEVEDORE_LOG`) and, only when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set, OpenTelemetry traces exported over OTLP/HTTP (protobuf). Also the
//! few calls that move a trace context between a job's store row and its
//! spans: a submit stores one ([`traceparent_for`]), an attempt continues it
//! ([`continue_trace`]).
//!
//! Traces, when on:
//! - `request` (API, every route): child of the caller's `traceparent`.
//! - `submit` (`POST /v1/jobs`, `/v1/jobs/batch`): the job stores the
//!   caller's `traceparent` header, or this span's context when there is none.
//! - `job{job.id, job.kind, attempt}` (worker): one per attempt, a child of
//!   the stored context, so all attempts of a job share its trace; `run`
//!   (the handler) and `finish` (the committed outcome) inside it. A child
//!   job (chains) stores its parent attempt's context and joins its trace.
//!
//! Environment (read once, at start):
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. `http://collector:4318`; spans go
//!   to `<endpoint>/v1/traces`) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the
//!   full URL); plain HTTP (the exporter's client has no TLS: a collector
//!   beside the process, not across a network).
//! - `OTEL_SERVICE_NAME` (default `stevedore-<role>`), `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_BSP_SCHEDULE_DELAY` (ms between exports, default 5000),
//!   `OTEL_EXPORTER_OTLP_HEADERS`: as the OpenTelemetry SDK reads them.
//!
//! Off (no endpoint), there is no exporter, no layer and no thread: the
//! extra spans are not made and the checks here are one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{env_setting, LogFormat};
use crate::model::trace::TraceParent;

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported. Off, the code paths that exist only for
/// traces (extra spans, context look-ups) are skipped.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A span made only when tracing is on (`Span::none()` otherwise): for the
/// spans that exist for traces alone, so logs and the untraced hot path
/// stay as they were.
pub fn span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if enabled() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Holds the exporter of a process that traces; [`Telemetry::shutdown`]
/// sends what is still buffered.
#[must_use = "shut down at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (on a blocking thread: its HTTP
    /// client is a blocking one).
    pub async fn shutdown(self) {
        let Some(p) = self.provider else { return };
        let done = tokio::task::spawn_blocking(move || p.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "Trace exporter did not shut down cleanly.");
        }
    }
}

/// Installs the subscriber of a process. `role` names the service in
/// traces (`stevedore-api`, ...); `None` (the CLI) never exports.
pub fn init(format: LogFormat, role: Option<&str>) -> Telemetry {
    let filter = env_setting("STEVEDORE_LOG")
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info,chromiumoxide=error"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let (provider, failed) = match role.filter(|_| endpoint_set()) {
        None => (None, None),
        Some(role) => match provider(role) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("stevedore"))
            // Only what the spans say: no thread or source-line attributes,
            // and no busy/idle clock on every poll of an instrumented future.
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .init();
    if let Some(e) = failed {
        // Traces are a diagnosis aid: a bad setting must not stop the role.
        tracing::warn!(error = %e, "Traces are off: the OTLP exporter could not be built.");
    }
    ON.store(provider.is_some(), Ordering::Relaxed);
    Telemetry { provider }
}

fn endpoint_set() -> bool {
    env_setting("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env_setting("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

fn provider(role: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()?;
    let mut resource = Resource::builder();
    // The SDK reads OTEL_SERVICE_NAME itself; naming the service here
    // would override it.
    if env_setting("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(format!("stevedore-{role}"));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The trace context a submit stores with its jobs: the caller's
/// `traceparent` header (kept even when this process does not trace, so
/// workers that do still join the caller's trace), else the submit's own
/// span when tracing is on.
pub fn traceparent_for(headers: &HeaderMap, submit: &tracing::Span) -> Option<TraceParent> {
    from_headers(headers).or_else(|| of_span(submit))
}

/// A valid `traceparent` header, if the request has one.
pub fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
}

/// The context of `span` as a `traceparent`, when tracing is on.
pub fn of_span(span: &tracing::Span) -> Option<TraceParent> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    TraceParent::new(
        &format!("{:032x}", sc.trace_id()),
        &format!("{:016x}", sc.span_id()),
        sc.is_sampled(),
    )
}

/// Makes `span` (not yet entered) a child of `parent`, or the root of a new
/// trace when there is none: without that, an attempt would hang below
/// the worker's process-long span and every job would share one trace.
pub fn continue_trace(span: &tracing::Span, parent: Option<&TraceParent>) {
    if !enabled() {
        return;
    }
    let cx = parent.and_then(remote).map_or_else(Context::new, |sc| {
        Context::new().with_remote_span_context(sc)
    });
    // Fails only for a span the filter disabled: nothing to parent.
    let _ = span.set_parent(cx);
}

fn remote(tp: &TraceParent) -> Option<SpanContext> {
    let mut parts = tp.as_str().split('-').skip(1);
    let trace_id = TraceId::from_hex(parts.next()?).ok()?;
    let span_id = SpanId::from_hex(parts.next()?).ok()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_context_reads_back_as_a_remote_parent() {
        let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        let sc = remote(&tp).expect("parsed");
        assert_eq!(
            format!("{:032x}", sc.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{:016x}", sc.span_id()), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
    }

    #[test]
    fn the_header_is_read_and_an_invalid_one_ignored() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), None);
        h.insert("traceparent", "nonsense".parse().expect("header"));
        assert_eq!(from_headers(&h), None);
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .expect("header"),
        );
        assert_eq!(
            from_headers(&h).map(|t| t.trace_id().to_owned()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
    }
}
