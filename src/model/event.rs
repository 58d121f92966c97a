//! What watchers see: one [`Event`] per recorded transition (and per
//! recorded progress report), with the job's result or last error on
//! terminal events, and the [`EventFilter`] that the stream, the CLI and
//! webhooks share.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::job::JobWebhook;
use super::progress::JobProgress;
use super::status::EventType;

/// One transition as the stream and webhooks carry it (`data` of an SSE
/// event, a WebSocket text frame, and `data` of a webhook body).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// The `job_events` id: monotonic, the SSE `id:` and the resume point.
    pub id: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub job_id: Uuid,
    pub kind: String,
    pub status: String,
    pub attempt: i32,
    /// Set on a child job (chains): the job that submitted it.
    pub parent_id: Option<Uuid>,
    /// When the transition was committed (its transaction's time).
    pub at: DateTime<Utc>,
    /// On `job.succeeded`: the job's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// On `job.dead` (and `job.retrying`): the last attempt's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
    /// On `job.progress`: the report, as it was when it was made (the job
    /// itself shows only its latest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// The job's own webhook, for the notifier; never shown.
    #[serde(skip)]
    pub webhook: Option<JobWebhook>,
    /// The job's tenant (`None` once the job was purged): streams and
    /// webhooks carry only their own tenant's events.
    #[serde(skip)]
    pub tenant: Option<String>,
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        EventType::parse(&self.event_type).is_some_and(EventType::is_terminal)
    }

    /// The JSON text sent to streams.
    pub fn to_json(&self) -> String {
        // Serialising plain fields and `serde_json::Value`s cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// A webhook body: `{"type", "timestamp", "data"}` (Standard Webhooks).
    pub fn webhook_body(&self) -> String {
        let body = serde_json::json!({
            "type": self.event_type,
            "timestamp": self.at,
            "data": self,
        });
        body.to_string()
    }
}

/// Which events a stream client wants; empty lists mean "all".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub kind: Option<String>,
    /// Job ids; an event matches its own job or a child of one of these.
    pub jobs: Vec<Uuid>,
    pub types: Vec<String>,
    /// Set from the client's key, never from the query.
    pub tenant: Option<String>,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        self.tenant
            .as_ref()
            .is_none_or(|t| e.tenant.as_ref() == Some(t))
            && self.kind.as_ref().is_none_or(|k| *k == e.kind)
            && (self.jobs.is_empty()
                || self.jobs.contains(&e.job_id)
                || e.parent_id.is_some_and(|p| self.jobs.contains(&p)))
            && (self.types.is_empty() || self.types.contains(&e.event_type))
    }

    /// Builds a filter from query pairs: `kind`, `job` (repeatable) and
    /// `types` (comma-separated, repeatable). Unknown keys are left to the
    /// caller; bad values are errors naming the parameter.
    pub fn from_pairs<'a>(
        pairs: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, (&'static str, String)> {
        let mut f = Self::default();
        for (k, v) in pairs {
            match k {
                "kind" => f.kind = Some(v.to_owned()),
                "job" => f
                    .jobs
                    .push(Uuid::parse_str(v).map_err(|_| ("job", format!("{v:?} is not a UUID")))?),
                "types" => {
                    for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        if EventType::parse(t).is_none() {
                            return Err((
                                "types",
                                format!("unknown type {t:?}; known: {}", EventType::names()),
                            ));
                        }
                        f.types.push(t.to_owned());
                    }
                }
                _ => {}
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, t: &str, parent: Option<Uuid>) -> Event {
        Event {
            id: 1,
            event_type: t.into(),
            job_id: Uuid::nil(),
            kind: kind.into(),
            status: "succeeded".into(),
            attempt: 1,
            parent_id: parent,
            at: Utc::now(),
            result: None,
            error: None,
            progress: None,
            webhook: None,
            tenant: Some("a".into()),
        }
    }

    #[test]
    fn a_tenant_sees_only_its_own_events() {
        let mine = EventFilter {
            tenant: Some("a".into()),
            ..EventFilter::default()
        };
        let theirs = EventFilter {
            tenant: Some("b".into()),
            ..EventFilter::default()
        };
        let e = ev("probe", "job.succeeded", None);
        assert!(mine.matches(&e) && !theirs.matches(&e));
        let purged = Event { tenant: None, ..e };
        assert!(!mine.matches(&purged));
    }

    #[test]
    fn filter_matches_kind_type_and_parent() {
        let p = Uuid::now_v7();
        let f = EventFilter::from_pairs(
            [
                ("kind", "probe"),
                ("types", "job.succeeded, job.dead"),
                ("job", &p.to_string()),
            ]
            .into_iter(),
        )
        .expect("valid");
        assert!(f.matches(&ev("probe", "job.succeeded", Some(p))));
        assert!(!f.matches(&ev("probe", "job.started", Some(p))));
        assert!(!f.matches(&ev("scrape", "job.succeeded", Some(p))));
        assert!(!f.matches(&ev("probe", "job.succeeded", None)));
        assert!(EventFilter::from_pairs([("types", "job.nope")].into_iter()).is_err());
    }
}
