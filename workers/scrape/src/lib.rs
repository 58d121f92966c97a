//! The `scrape` job kind: load a quiz page over HTTP through the SSRF
//! guard and extract its questions and options, optionally chaining an
//! `analyze` job with what was found.
//!
//! # Layout
//! - [`payload`]: the payload (validated at submit) and the result.
//! - [`extract`]: questions from schema.org JSON-LD, radio/checkbox groups,
//!   ARIA radio groups, or the payload's own selectors.
//! - [`load`]: HTTP loading pinned to the address the guard checked,
//!   redirects re-checked hop by hop, a size cap, charset decoding.
//! - [`handler`]: the `Handler` impl, error classes and metrics.
//!
//! Pages that build their questions with script need a browser; this crate
//! does not drive one yet, so `render: "browser"` (and `auto` on such a
//! page) fails permanently with a message saying so.

pub mod extract;
pub mod handler;
pub mod load;
pub mod payload;

pub use handler::{ScrapeConfig, ScrapeHandler};
pub use payload::{Question, Render, ScrapeOutput, ScrapePayload};
