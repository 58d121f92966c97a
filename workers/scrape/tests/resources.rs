//! What the browser fetches for a job, in real Chromium: extraction reads
//! only the DOM, so a page's images, media, fonts and stylesheets are never
//! requested unless the job asks for a full render; and with the page
//! created straight at its URL, the main document's status and final URL
//! are still what the job reports.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use stevedore_handler::JobError;
use stevedore_scrape::{ScrapeConfig, ScrapeHandler};
use support::{scrape, MOODLE};

type Hits = Arc<Mutex<HashMap<String, usize>>>;

/// The Moodle quiz with one of each kind of resource extraction does not
/// need; the font is used by the text, so a full render fetches it.
fn heavy_page() -> String {
    MOODLE.replace(
        "</head>",
        r#"<link rel="stylesheet" href="/r/style.css">
<style>@font-face { font-family: quiz; src: url(/r/font.woff2); } body { font-family: quiz; }</style>
</head>"#,
    )
    .replace(
        "</body>",
        r#"<img src="/r/photo.png"><video src="/r/clip.mp4" preload="auto" autoplay muted></video></body>"#,
    )
}

async fn site() -> (u16, Hits) {
    let hits: Hits = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let app = Router::new()
        .route("/heavy", get(|| async { Html(heavy_page()) }))
        .route(
            "/r/{name}",
            get(
                |State(hits): State<Hits>, Path(name): Path<String>| async move {
                    *hits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(name)
                        .or_default() += 1;
                    ([(header::CACHE_CONTROL, "no-store")], "").into_response()
                },
            ),
        )
        .route("/moodle", get(|| async { Html(MOODLE) }))
        .route("/gone", get(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/gone-with-page",
            get(|| async { (StatusCode::NOT_FOUND, Html(MOODLE)) }),
        )
        .route(
            "/broken",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route("/moved", get(|| async { Redirect::permanent("/moodle") }))
        .route(
            "/moved-away",
            get(|| async { Redirect::temporary("/gone") }),
        )
        .with_state(hits.clone());
    tokio::spawn(async move { axum::serve(l, app).await });
    (port, hits)
}

fn handler(port: u16) -> ScrapeHandler {
    let mut cfg = ScrapeConfig {
        allow_hosts: format!("127.0.0.1:{port}"),
        ..ScrapeConfig::default()
    };
    cfg.browser.timeout = Duration::from_secs(20);
    ScrapeHandler::new(cfg, &prometheus::Registry::new()).expect("handler")
}

fn fetched(hits: &Hits) -> HashMap<String, usize> {
    hits.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[tokio::test]
async fn images_media_fonts_and_stylesheets_are_never_fetched_unless_a_full_render_is_asked() {
    let (port, hits) = site().await;
    let h = handler(port);
    let url = format!("http://127.0.0.1:{port}/heavy");

    let (res, _) = scrape(&h, json!({"url": url, "render": "browser"})).await;
    assert_eq!(res.expect("scraped").questions.len(), 5);
    // Late requests would arrive after the job; give them the chance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fetched(&hits), HashMap::new(), "nothing but the page");

    let (res, _) = scrape(
        &h,
        json!({"url": url, "render": "browser", "full_render": true}),
    )
    .await;
    assert_eq!(res.expect("scraped").questions.len(), 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = fetched(&hits);
    for name in ["style.css", "photo.png", "font.woff2"] {
        assert!(got.contains_key(name), "{name} not fetched: {got:?}");
    }
}

#[tokio::test]
async fn the_main_documents_status_and_final_url_are_reported() {
    let (port, _) = site().await;
    let h = handler(port);
    let at = |path: &str| format!("http://127.0.0.1:{port}{path}");

    // An error status, with Chromium's own error page or the site's.
    for path in ["/gone", "/gone-with-page", "/moved-away"] {
        let (res, _) = scrape(&h, json!({"url": at(path), "render": "browser"})).await;
        assert!(
            matches!(res, Err(JobError::Permanent { ref message }) if message.contains("HTTP 404")),
            "{path}: {res:?}"
        );
    }
    let (res, _) = scrape(&h, json!({"url": at("/broken"), "render": "browser"})).await;
    assert!(
        matches!(res, Err(JobError::Retryable { ref message, .. }) if message.contains("HTTP 500")),
        "{res:?}"
    );
    let (res, _) = scrape(&h, json!({"url": at("/moved"), "render": "browser"})).await;
    let out = res.expect("followed the redirect");
    assert_eq!(out.final_url, at("/moodle"));
    assert_eq!(out.questions.len(), 5);
}
