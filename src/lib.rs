//! Stevedore's core: a queue-driven job fleet with Postgres as the source of
//! truth and brokers as the fast path.
//!
//! # Layout
//! - [`model`]: statuses, event types, the job, and every lifecycle rule as
//!   a function returning the transition to apply. No I/O.
//! - [`store`]: all SQL: the `Store` and `EventStore` traits, applied by
//!   `store/postgres/` and `store/sqlite/` (which also holds the embedded
//!   queue's table and dev mode's analyze limits and cache).
//! - [`kinds`]: the registry of job kinds; `probe` lives here.
//! - [`broker`]: the `Broker` trait, Redis Streams and the embedded queue.
//! - [`dispatcher`]: outbox relay, lease rescue, lost-message repair.
//! - [`worker`]: claim, run, heartbeat, finish, ack; graceful shutdown.
//! - [`progress`]: the attempts' progress reports, throttled, to the store.
//! - [`notifier`]: events to stream clients and signed webhooks.
//! - [`auth`]: API keys, scopes and tenants (no I/O); `api::auth` checks
//!   every request against them.
//! - [`api`]: the HTTP API, its OpenAPI document and the display page.
//! - [`fleet`]: assembles roles into a process.
//! - [`cli`]: the operator CLI over the HTTP API, and `bench`.
//! - [`supervisor`]: `stevedore up`, the local process supervisor.
//! - [`connect`]: the client of each service (Postgres, Redis, RabbitMQ)
//!   with its TLS settings, built in one place.
//! - [`telemetry`]: the log subscriber and, when configured, OpenTelemetry
//!   traces; the trace context a job carries from submit to its attempts.
//! - [`config`], [`metrics`].

pub mod api;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connect;
pub mod dispatcher;
pub mod fleet;
pub mod kinds;
pub mod metrics;
pub mod model;
pub mod notifier;
pub mod progress;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod worker;
