//! The job model, with no I/O: statuses and event types ([`status`]), what
//! a job is ([`job`]), every lifecycle rule as a function that returns the
//! transition a store applies ([`lifecycle`]), what watchers see
//! ([`event`]), webhook signing keys ([`secret`]), when cron schedules
//! fire ([`schedule`]), which keyed jobs may start ([`concurrency`]) and
//! the trace context a job carries ([`trace`]).

pub mod concurrency;
pub mod event;
pub mod job;
pub mod lifecycle;
pub mod schedule;
pub mod secret;
pub mod status;
pub mod trace;

pub use status::{EventType, JobStatus};
