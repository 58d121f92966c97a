//! Stevedore's core: a queue-driven job fleet with Postgres as the source of
//! truth and brokers as the fast path.
//!
//! # Layout
//! - [`job`]: states, the submit request, the stored job.
//! - [`lifecycle`]: what a finished attempt becomes; backoff. No I/O.
//! - [`kinds`]: the registry of job kinds; `probe` lives here.
//! - [`store`]: the `Store` trait, Postgres and SQLite implementations.
//! - [`broker`]: the `Broker` trait, Redis Streams and the embedded queue.
//! - [`dispatcher`]: outbox relay, lease rescue, lost-message repair.
//! - [`worker`]: claim, run, heartbeat, finish, ack; graceful shutdown.
//! - [`notifier`]: events to stream clients and signed webhooks.
//! - [`api`]: the HTTP API, its OpenAPI document and the display page.
//! - [`fleet`]: assembles roles into a process.
//! - [`cli`]: the operator CLI over the HTTP API, and `bench`.
//! - [`supervisor`]: `stevedore up`, the local process supervisor.
//! - [`config`], [`metrics`].

pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dispatcher;
pub mod fleet;
pub mod job;
pub mod kinds;
pub mod lifecycle;
pub mod metrics;
pub mod notifier;
pub mod store;
pub mod supervisor;
pub mod worker;
