//! The `scrape` job kind: load a quiz page over plain HTTP or in headless
//! Chromium, always through the SSRF guard, and extract its questions and
//! options, optionally chaining an `analyze` job with what was found.
//!
//! # Layout
//! - [`payload`]: the payload (validated at submit) and the result.
//! - [`extract`]: questions from schema.org JSON-LD, every kind of choice
//!   control tied to its question text, or the payload's own selectors;
//!   linear in the page, capped.
//! - [`load`]: HTTP loading pinned to the address the guard checked,
//!   redirects re-checked hop by hop, a size cap, charset decoding.
//! - [`browser`]: the Chromium pool (one browser per process, a fresh
//!   incognito context per job, restarted when it crashes or has served
//!   its share).
//! - [`proxy`]: the filtering proxy every browser connection goes through.
//! - [`handler`]: the `Handler` impl, `render: auto` fallback, error
//!   classes and metrics.

pub mod browser;
pub mod extract;
pub mod handler;
pub mod load;
pub mod payload;
pub mod proxy;

pub use handler::{ScrapeConfig, ScrapeHandler};
pub use payload::{Question, Render, ScrapeOutput, ScrapePayload};
