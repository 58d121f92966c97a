//! One job's visit: a fresh incognito context behind the job's proxy,
//! navigation, waiting for the page to show its quiz, and its HTML read
//! back under the same cap as a plain HTTP page (a page over it fails
//! without its HTML ever crossing the DevTools socket).

use std::time::Duration;

use chromiumoxide::browser::Browser;
use chromiumoxide::cdp::browser_protocol::network::{EventResponseReceived, ResourceType};
use chromiumoxide::cdp::browser_protocol::target::{
    CreateBrowserContextParams, CreateTargetParams,
};
use chromiumoxide::error::CdpError;
use futures::{FutureExt, StreamExt};

use super::launch::BYPASS_NOTHING;
use super::{BrowserConfig, Rendered, Wait};
use crate::proxy::REFUSED_META;

/// Why a visit ended without a page.
#[derive(Debug)]
pub(super) enum Failed {
    Cdp(CdpError),
    /// The page's HTML, in UTF-16 units as the page counts it, and the cap.
    TooLarge(usize, usize),
    /// Deciding whether the page is ready took longer than its budget.
    Slow(Duration),
}

impl From<CdpError> for Failed {
    fn from(e: CdpError) -> Self {
        Failed::Cdp(e)
    }
}

/// How long one look at a page (extraction, in the caller's `ready`) may
/// take: past it the page is not worth a worker's CPU.
pub(super) const READY_BUDGET: Duration = Duration::from_secs(5);

pub(super) async fn visit(
    browser: &Browser,
    url: &str,
    wait: &Wait<'_>,
    cfg: &BrowserConfig,
    proxy: std::net::SocketAddr,
) -> Result<Rendered, Failed> {
    // A context per job: no cookie, cache or storage crosses jobs, and the
    // job's requests go through the job's own proxy.
    let params = CreateBrowserContextParams::builder()
        .dispose_on_detach(true)
        .proxy_server(format!("http://{proxy}"))
        .proxy_bypass_list(BYPASS_NOTHING)
        .build();
    let t = std::time::Instant::now();
    let context = browser.create_browser_context(params).await?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "context created");
    let target = CreateTargetParams::builder()
        .url("about:blank")
        .browser_context_id(context.clone())
        .build()
        .map_err(CdpError::ChromeMessage)?;
    let loaded = async {
        let page = browser.new_page(target).await?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "page opened");
        let loaded = load_page(&page, url, wait, cfg).await;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "page loaded");
        let _ = page.close().await;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "page closed");
        loaded
    }
    .await;
    let _ = browser.dispose_browser_context(context).await;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "context disposed");
    loaded
}

async fn load_page(
    page: &chromiumoxide::Page,
    url: &str,
    wait: &Wait<'_>,
    cfg: &BrowserConfig,
) -> Result<Rendered, Failed> {
    // The main document's status, from the network events: the page's
    // navigation helpers also report iframes, whose refusals are not the
    // page's own status.
    let mut responses = page.event_listener::<EventResponseReceived>().await?;
    let main = page.mainframe().await?;
    let navigated = page.goto(url).await.map(|_| ());
    let mut status = None;
    while let Some(Some(ev)) = responses.next().now_or_never() {
        if ev.r#type == ResourceType::Document && ev.frame_id.is_some() && ev.frame_id == main {
            status = Some(ev.response.status as u16);
        }
    }
    if let Err(e) = navigated {
        // Chromium fails the navigation on an error status with an empty
        // body; the status is what the caller needs to classify it.
        return match status.filter(|s| *s >= 400) {
            Some(status) => Ok(Rendered {
                final_url: url.to_owned(),
                html: String::new(),
                status: Some(status),
            }),
            None => Err(e.into()),
        };
    }
    if let Some(selector) = wait.selector {
        // Polled, not event-driven: a selector that never appears ends in
        // the job's timeout like any slow page.
        while page.find_element(selector).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if let Some(ms) = wait.ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let settled = tokio::time::Instant::now() + cfg.settle;
    let mut html = content(page, cfg.max_bytes).await?;
    // An error page or the proxy's refusal will not turn into a quiz.
    let error_page = status.is_some_and(|s| s >= 400);
    loop {
        if error_page || refused_page(&html).is_some() {
            break;
        }
        let (ready, back) = ready_off_runtime(wait, html).await?;
        html = back;
        if ready || tokio::time::Instant::now() >= settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        html = content(page, cfg.max_bytes).await?;
    }
    Ok(Rendered {
        final_url: page.url().await?.unwrap_or_else(|| url.to_owned()),
        html,
        status,
    })
}

/// The caller's readiness check on a blocking thread, within
/// [`READY_BUDGET`]: extraction is CPU work, and a huge page must not stall
/// the runtime that sends this worker's heartbeats.
async fn ready_off_runtime(wait: &Wait<'_>, html: String) -> Result<(bool, String), Failed> {
    let ready = wait.ready.clone();
    let job = tokio::task::spawn_blocking(move || (ready(&html), html));
    match tokio::time::timeout(READY_BUDGET, job).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(Failed::Cdp(CdpError::msg(format!(
            "extraction failed: {e}"
        )))),
        Err(_) => Err(Failed::Slow(READY_BUDGET)),
    }
}

/// The page's HTML with its doctype, as `Page::content` reads it, unless it
/// is longer than `max` (then only its length crosses the socket).
async fn content(page: &chromiumoxide::Page, max: usize) -> Result<String, Failed> {
    #[derive(serde::Deserialize)]
    struct Capped {
        html: Option<String>,
        len: usize,
    }
    let js = format!(
        "(() => {{ let h = ''; if (document.doctype) h = new XMLSerializer().serializeToString(document.doctype); \
         if (document.documentElement) h += document.documentElement.outerHTML; \
         return h.length > {max} ? {{len: h.length}} : {{html: h, len: h.length}}; }})()"
    );
    let capped: Capped = page
        .evaluate(js)
        .await?
        .into_value()
        .map_err(|e| Failed::Cdp(CdpError::msg(format!("reading the page: {e}"))))?;
    match capped.html {
        // UTF-16 units undercount bytes: the decoded string is checked too.
        Some(html) if html.len() <= max => Ok(html),
        Some(html) => Err(Failed::TooLarge(html.len(), max)),
        None => Err(Failed::TooLarge(capped.len, max)),
    }
}

/// The reason on the proxy's refusal page, if that is what loaded.
pub(super) fn refused_page(html: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{REFUSED_META}\""))?;
    let rest = &html[at..];
    let start = rest.find("content=\"")? + 9;
    let end = rest[start..].find('"')?;
    Some(
        rest[start..start + end]
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reason_off_the_refusal_page() {
        let page = format!(
            "<html><head><meta name=\"{REFUSED_META}\" content=\"127.0.0.1 resolves to a &quot;forbidden&quot; address\"></head></html>"
        );
        assert_eq!(
            refused_page(&page).as_deref(),
            Some("127.0.0.1 resolves to a \"forbidden\" address")
        );
        assert_eq!(refused_page("<html><p>quiz</p></html>"), None);
    }
}
