//! The job model, with no I/O: statuses and event types ([`status`]), what
//! a job is ([`job`]), every lifecycle rule as a function that returns the
//! transition a store applies ([`lifecycle`]), what watchers see
//! ([`event`]), webhook signing keys ([`secret`]), when cron schedules
//! fire ([`schedule`]), which keyed jobs may start ([`concurrency`]), the
//! trace context a job carries ([`trace`]) and what a running job reports
//! of itself ([`progress`]).

pub mod concurrency;
pub mod event;
pub mod job;
pub mod lifecycle;
pub mod progress;
pub mod schedule;
pub mod secret;
pub mod status;
pub mod trace;

pub use status::{EventType, JobStatus};
