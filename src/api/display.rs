//! The display page at `GET /`: a live view of jobs arriving and finishing,
//! analyze results as questions with animated confidence bars (under the
//! result's `notice` when a tiny offline model answered), queue depth
//! per pool and the dead-letter count. Plain HTML, CSS and JavaScript
//! embedded in the binary: no build step, no CDN, works offline. The page
//! follows `/v1/stream` and reconnects (resuming with `since`) by itself.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("display/index.html");
const SCRIPT: &str = include_str!("display/app.js");
const STYLE: &str = include_str!("display/style.css");
/// Shared by the display and the console: asks for an API key when the API
/// has keys, and trades it for stream tickets.
const KEY_SCRIPT: &str = include_str!("key.js");

pub async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

pub async fn key_script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        KEY_SCRIPT,
    )
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}
