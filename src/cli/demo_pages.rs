//! Quiz pages for `stevedore dev --demo` and `stevedore bench-scrape`,
//! embedded in the binary so the newcomer's first scrape needs no network.
//! They are served at `/demo/quiz/{name}` by a loopback listener of their
//! own ([`serve`]), never by the API: allowlisting them for scraping must
//! not let pages reach the API.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const PAGES: [(&str, &str); 3] = [
    (
        "moodle-multichoice.html",
        include_str!("../../fixtures/quiz/moodle-multichoice.html"),
    ),
    (
        "jsonld-quiz.html",
        include_str!("../../fixtures/quiz/jsonld-quiz.html"),
    ),
    (
        "spa-rendered.html",
        include_str!("../../fixtures/quiz/spa-rendered.html"),
    ),
];

/// Names of the embedded pages.
pub fn pages() -> impl Iterator<Item = &'static str> {
    PAGES.iter().map(|(n, _)| *n)
}

pub fn router() -> Router {
    Router::new().route("/demo/quiz/{name}", get(page))
}

/// Serves the pages, and nothing else, on an ephemeral port of `loopback`
/// until the process ends; returns the address.
pub async fn serve(loopback: IpAddr) -> anyhow::Result<SocketAddr> {
    anyhow::ensure!(
        loopback.is_loopback(),
        "the demo pages are served on loopback only, not {loopback}"
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(loopback, 0))
        .await
        .context("binding the demo pages' listener")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router()).await {
            tracing::error!(error = %e, "The demo pages' server failed.");
        }
    });
    Ok(addr)
}

async fn page(Path(name): Path<String>) -> Response {
    match PAGES.iter().find(|(n, _)| *n == name) {
        Some((_, html)) => {
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], *html).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such demo page").into_response(),
    }
}
