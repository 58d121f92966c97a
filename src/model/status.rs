//! Where a job is ([`JobStatus`]) and what watchers are told when it moves
//! ([`EventType`]): each name is spelled here and nowhere else; the stores
//! bind these strings, they never write them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life. The allowed moves are the rules in
/// [`super::lifecycle`]:
///
/// ```text
/// queued ──claim──▶ running ──ok──▶ succeeded
///    ▲                 │ ├──retryable, snooze──▶ retrying ──due+claim──▶ running
///    │                 │ └──permanent / last attempt──▶ dead ──replay──▶ queued
///    └── hand back ────┘
/// queued | retrying | running(at next lease check) ──cancel──▶ cancelled
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Dead,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Dead,
        Self::Cancelled,
    ];

    /// The statuses a worker may claim from (when due and not cancelled).
    pub const CLAIMABLE: [JobStatus; 2] = [Self::Queued, Self::Retrying];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Cancelled)
    }
}

/// What a recorded transition is called on the stream and in webhooks;
/// `Progress` is the one event that is no transition (a running job's
/// report of itself, which leaves its status and attempt as they are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Queued,
    Started,
    Retrying,
    Succeeded,
    Dead,
    Cancelled,
    Progress,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        Self::Queued,
        Self::Started,
        Self::Retrying,
        Self::Succeeded,
        Self::Dead,
        Self::Cancelled,
        Self::Progress,
    ];

    /// How jobs end: the default webhook subscription.
    pub const TERMINAL: [EventType; 3] = [Self::Succeeded, Self::Dead, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "job.queued",
            Self::Started => "job.started",
            Self::Retrying => "job.retrying",
            Self::Succeeded => "job.succeeded",
            Self::Dead => "job.dead",
            Self::Cancelled => "job.cancelled",
            Self::Progress => "job.progress",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The event recorded when a job enters `status`.
    pub fn entering(status: JobStatus) -> Self {
        match status {
            JobStatus::Queued => Self::Queued,
            JobStatus::Running => Self::Started,
            JobStatus::Retrying => Self::Retrying,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Dead => Self::Dead,
            JobStatus::Cancelled => Self::Cancelled,
        }
    }

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }

    /// Events whose job's last attempt error travels with them.
    pub fn carries_error(self) -> bool {
        matches!(self, Self::Dead | Self::Retrying)
    }

    /// All names, comma-separated, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

/// In the OpenAPI document: a string, one of [`EventType::ALL`]'s names.
impl utoipa::PartialSchema for EventType {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(Self::ALL.map(Self::as_str)))
            .into()
    }
}

impl utoipa::ToSchema for EventType {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_terminality_agrees() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(EventType::entering(s).is_terminal(), s.is_terminal());
        }
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(JobStatus::parse("done"), None);
        assert_eq!(EventType::parse("job.running"), None);
    }
}
