//! A job's trace context: a W3C `traceparent` (trace id, parent span id,
//! flags), taken from a submit's header or the submit's own span and stored
//! with the job, so every attempt, and every child job, continues the trace
//! the submit began. Only [`TraceParent::parse`] builds one, so what is
//! stored is always well formed, whatever a client sent.

use std::fmt;

/// A valid `traceparent`, kept in its version-00 form
/// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    /// Parses a header value by the W3C Trace Context rules: lowercase hex,
    /// version `ff` and all-zero ids are invalid; a later version may carry
    /// more fields after the four known ones, which are dropped. Anything
    /// else is `None`: an invalid header starts a new trace rather than
    /// failing the request, as the spec asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.splitn(5, '-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let zero = |s: &str| s.bytes().all(|b| b == b'0');
        let ok = hex(version, 2)
            && version != "ff"
            && (version != "00" || rest.is_none())
            && hex(trace_id, 32)
            && !zero(trace_id)
            && hex(span_id, 16)
            && !zero(span_id)
            && hex(flags, 2);
        ok.then(|| Self(format!("00-{trace_id}-{span_id}-{flags}")))
    }

    /// Builds one from the ids of a span (as the tracer's hex strings).
    pub fn new(trace_id: &str, span_id: &str, sampled: bool) -> Option<Self> {
        Self::parse(&format!(
            "00-{trace_id}-{span_id}-{}",
            if sampled { "01" } else { "00" }
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_is_kept_and_its_trace_id_read() {
        let tp = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(tp.as_str(), GOOD);
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            TraceParent::parse(&format!(" {GOOD} ")).map(|t| t.to_string()),
            Some(GOOD.to_owned())
        );
    }

    #[test]
    fn a_later_version_keeps_the_known_fields() {
        let tp =
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .expect("a future version is read as 00");
        assert_eq!(tp.as_str(), GOOD);
    }

    #[test]
    fn invalid_headers_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9ß2b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn built_from_span_ids() {
        let tp = TraceParent::new("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", true);
        assert_eq!(tp.map(|t| t.to_string()), Some(GOOD.to_owned()));
    }
}
