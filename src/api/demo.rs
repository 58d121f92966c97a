//! Quiz pages for `stevedore dev --demo`, embedded in the binary so the
//! newcomer's first scrape needs no network: the dev process serves them at
//! `/demo/quiz/{name}` and scrapes them from itself.

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

async fn page(Path(name): Path<String>) -> Response {
    match PAGES.iter().find(|(n, _)| *n == name) {
        Some((_, html)) => {
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], *html).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such demo page").into_response(),
    }
}
