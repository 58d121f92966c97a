//! One job's visit: a fresh incognito context behind the job's proxy, a
//! page created directly at the job's URL, waiting for the page to show its
//! quiz, and its HTML read back under the same cap as a plain HTTP page (a
//! page over it fails without its HTML ever crossing the DevTools socket).
//!
//! What extraction does not read (images, media, fonts, stylesheets) is
//! refused in the browser (the DevTools Fetch domain) and, over plain HTTP,
//! by the job's proxy, unless the job asks for a full render; whatever is
//! requested still goes through the job's proxy and its guard.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::cdp::{Cdp, CdpError, Event};
use super::launch::BYPASS_NOTHING;
use super::{BrowserConfig, Rendered, Wait};
use crate::proxy::REFUSED_META;

/// Why a visit ended without a page.
#[derive(Debug)]
pub(super) enum Failed {
    Cdp(CdpError),
    /// The main document did not load: Chromium's net error
    /// (`net::ERR_TUNNEL_CONNECTION_FAILED`, ...).
    Navigation(String),
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

/// Resource types extraction never reads; refused unless a job asks for a
/// full render.
const NOT_NEEDED: &[&str] = &["Image", "Media", "Font", "Stylesheet"];

/// Told how long each phase of a visit took (`context`, `page`,
/// `navigation`, `settle`, `close`).
pub(super) type Timing<'a> = &'a (dyn Fn(&'static str, Duration) + Send + Sync);

/// What the job's proxy answered for a URL (plain HTTP only).
pub(super) type StatusOf<'a> = &'a (dyn Fn(&str) -> Option<u16> + Send + Sync);

/// Disposes of the job's context however the visit ends, a timeout that
/// drops the visit included: the command is queued on the socket at once.
struct Context<'a> {
    cdp: &'a Cdp,
    id: String,
    disposed: bool,
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        if self.disposed {
            return;
        }
        drop(self.cdp.send(
            None,
            "Target.disposeBrowserContext",
            json!({"browserContextId": self.id}),
        ));
    }
}

pub(super) async fn visit(
    cdp: &Cdp,
    url: &str,
    wait: &Wait<'_>,
    cfg: &BrowserConfig,
    proxy: std::net::SocketAddr,
    status_of: StatusOf<'_>,
    timing: Timing<'_>,
) -> Result<Rendered, Failed> {
    // A context per job: no cookie, cache or storage crosses jobs, and the
    // job's requests go through the job's own proxy.
    let t = Instant::now();
    let created = cdp
        .call(
            None,
            "Target.createBrowserContext",
            json!({
                "disposeOnDetach": true,
                "proxyServer": format!("http://{proxy}"),
                "proxyBypassList": BYPASS_NOTHING,
            }),
        )
        .await?;
    let mut context = Context {
        cdp,
        id: str_at(&created, "browserContextId")?,
        disposed: false,
    };
    timing("context", t.elapsed());
    let loaded = load_page(cdp, &context.id, url, wait, cfg, status_of, timing).await;
    let t = Instant::now();
    // Awaited, so a job's page slot is free only once its context is gone.
    let disposed = cdp
        .call(
            None,
            "Target.disposeBrowserContext",
            json!({"browserContextId": context.id}),
        )
        .await;
    context.disposed = true;
    if let Err(e) = disposed {
        tracing::debug!(error = %e, "disposing of a job's browser context");
    }
    timing("close", t.elapsed());
    loaded
}

fn str_at(v: &Value, key: &str) -> Result<String, Failed> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Failed::Cdp(CdpError::Other(format!("no {key} in {v}"))))
}

/// Answers the page's refused requests for the page's whole life (a
/// request left paused would hold its `load`).
fn pump(cdp: Cdp, session: String, mut events: mpsc::UnboundedReceiver<Event>) -> Pump {
    Pump(tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if ev.method == "Fetch.requestPaused" {
                let id = ev.params.get("requestId").cloned().unwrap_or(Value::Null);
                drop(cdp.send(
                    Some(&session),
                    "Fetch.failRequest",
                    json!({"requestId": id, "errorReason": "BlockedByClient"}),
                ));
            }
        }
    }))
}

/// Aborts the event pump when the visit ends, however it ends.
struct Pump(tokio::task::JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn load_page(
    cdp: &Cdp,
    context: &str,
    url: &str,
    wait: &Wait<'_>,
    cfg: &BrowserConfig,
    status_of: StatusOf<'_>,
    timing: Timing<'_>,
) -> Result<Rendered, Failed> {
    let t = Instant::now();
    // Asked before the page exists, so its attachment is never missed.
    let attached = cdp.expect_page(context);
    // Created at the URL: no blank page to set up and navigate away from.
    cdp.call(
        None,
        "Target.createTarget",
        json!({"url": url, "browserContextId": context}),
    )
    .await?;
    let page = attached.await.map_err(|_| CdpError::Closed)?;
    let session = page.session.clone();
    let s = Some(session.as_str());
    // Sent together and handled in order: one round trip. A page created
    // at its URL may already be requesting by now; over plain HTTP the
    // job's proxy turns the same resources away from the first request.
    let mut setup = Vec::new();
    if !wait.full_render {
        let patterns: Vec<Value> = NOT_NEEDED
            .iter()
            .map(|t| json!({"resourceType": t, "requestStage": "Request"}))
            .collect();
        setup.push(cdp.send(s, "Fetch.enable", json!({"patterns": patterns})));
    }
    setup.push(cdp.send(s, "Runtime.runIfWaitingForDebugger", json!({})));
    let _pump = pump(cdp.clone(), session.clone(), page.events);
    futures::future::try_join_all(setup).await?;
    timing("page", t.elapsed());

    let t = Instant::now();
    let first = read(cdp, &session, cfg.max_bytes).await?;
    timing("navigation", t.elapsed());
    let loaded = settle(cdp, &session, url, wait, cfg, first, status_of, timing).await;
    cdp.forget(&session);
    loaded
}

/// From `load` to the page the caller wants: `wait_for`, `wait_ms`, then
/// re-reading until `ready` accepts it or the settle time runs out.
#[allow(clippy::too_many_arguments)]
async fn settle(
    cdp: &Cdp,
    session: &str,
    url: &str,
    wait: &Wait<'_>,
    cfg: &BrowserConfig,
    first: Read,
    status_of: StatusOf<'_>,
    timing: Timing<'_>,
) -> Result<Rendered, Failed> {
    // The main document's status: the job's proxy saw it over plain HTTP;
    // over https (a tunnel to the proxy) the page's navigation timing
    // says it, when a document was shown at all.
    let status = status_of(url).or(first.status.filter(|s| *s > 0));
    if let Some(failed) = first.error {
        // Chromium shows its own error page for a failed navigation, and
        // for an error status with an empty body; the status is what the
        // caller needs to classify it.
        return match status.filter(|s| *s >= 400) {
            Some(status) => Ok(Rendered {
                final_url: url.to_owned(),
                html: String::new(),
                status: Some(status),
            }),
            None => Err(Failed::Navigation(failed)),
        };
    }
    let t = Instant::now();
    let mut page = first;
    if wait.selector.is_some() || wait.ms.is_some() {
        if let Some(selector) = wait.selector {
            // Polled, not event-driven: a selector that never appears ends
            // in the job's timeout like any slow page.
            let js = format!(
                "(() => {{ try {{ return !!document.querySelector({}); }} catch (e) {{ return false; }} }})()",
                json!(selector)
            );
            while evaluate(cdp, session, &js, false).await? != Value::Bool(true) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(ms) = wait.ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        page = read(cdp, session, cfg.max_bytes).await?;
    }
    let settled = tokio::time::Instant::now() + cfg.settle;
    // An error page or the proxy's refusal will not turn into a quiz.
    let error_page = status.is_some_and(|s| s >= 400);
    loop {
        if error_page || refused_page(&page.html).is_some() {
            break;
        }
        let (ready, back) = ready_off_runtime(wait, page.html).await?;
        page.html = back;
        if ready || tokio::time::Instant::now() >= settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = read(cdp, session, cfg.max_bytes).await?;
    }
    timing("settle", t.elapsed());
    Ok(Rendered {
        final_url: if page.url.is_empty() {
            url.to_owned()
        } else {
            page.url
        },
        html: page.html,
        status,
    })
}

/// The value of `js` in the page's main world.
async fn evaluate(cdp: &Cdp, session: &str, js: &str, wait: bool) -> Result<Value, Failed> {
    let r = cdp
        .call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": wait}),
        )
        .await?;
    if let Some(e) = r.get("exceptionDetails") {
        return Err(Failed::Cdp(CdpError::Other(format!("evaluating: {e}"))));
    }
    Ok(r.pointer("/result/value").cloned().unwrap_or(Value::Null))
}

/// The caller's readiness check on a blocking thread, within
/// [`READY_BUDGET`]: extraction is CPU work, and a huge page must not stall
/// the runtime that sends this worker's heartbeats.
async fn ready_off_runtime(wait: &Wait<'_>, html: String) -> Result<(bool, String), Failed> {
    let ready = wait.ready.clone();
    let job = tokio::task::spawn_blocking(move || (ready(&html), html));
    match tokio::time::timeout(READY_BUDGET, job).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(Failed::Cdp(CdpError::Other(format!(
            "extraction failed: {e}"
        )))),
        Err(_) => Err(Failed::Slow(READY_BUDGET)),
    }
}

/// One look at the page once it has loaded.
struct Read {
    html: String,
    url: String,
    /// The main document's status from its navigation timing (0 when the
    /// browser does not know it).
    status: Option<u16>,
    /// Chromium's error page is showing: the navigation failed with this.
    error: Option<String>,
}

/// Waits for the page's `load`, then reads its HTML (with its doctype),
/// URL and status in one round trip, unless the HTML is longer than `max`
/// (then only its length crosses the socket). Until the job's document
/// replaces the page's initial blank one, the call waits; the replacement
/// ends it with an error, and it is made again in the new document.
async fn read(cdp: &Cdp, session: &str, max: usize) -> Result<Read, Failed> {
    #[derive(serde::Deserialize)]
    struct Capped {
        html: Option<String>,
        len: usize,
        url: String,
        status: Option<u16>,
        error: Option<String>,
    }
    let js = format!(
        "new Promise(done => {{ \
           if (location.href === 'about:blank') return; \
           const read = () => {{ \
             const nav = performance.getEntriesByType('navigation')[0]; \
             const status = nav && nav.responseStatus; \
             if (document.URL.startsWith('chrome-error:')) {{ \
               const code = (document.documentElement.outerHTML.match(/(net::)?ERR_[A-Z_]+/) || ['the navigation failed'])[0]; \
               return done({{len: 0, url: location.href, status, error: code}}); }} \
             let h = ''; if (document.doctype) h = new XMLSerializer().serializeToString(document.doctype); \
             if (document.documentElement) h += document.documentElement.outerHTML; \
             done(h.length > {max} ? {{len: h.length, url: location.href, status}} : {{html: h, len: h.length, url: location.href, status}}); }}; \
           if (document.readyState === 'complete') read(); else addEventListener('load', read, {{once: true}}); }})"
    );
    let value = loop {
        match evaluate(cdp, session, &js, true).await {
            Ok(v) => break v,
            // The document went away under the call (the blank page
            // replaced, the page navigating itself): ask the new one.
            Err(Failed::Cdp(CdpError::Command { message, .. })) => {
                tracing::trace!(message, "page replaced while read; again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let capped: Capped = serde_json::from_value(value)
        .map_err(|e| Failed::Cdp(CdpError::Other(format!("reading the page: {e}"))))?;
    let read = |html| Read {
        html,
        url: capped.url.clone(),
        status: capped.status,
        error: capped.error.clone(),
    };
    match capped.html {
        // UTF-16 units undercount bytes: the decoded string is checked too.
        Some(html) if html.len() <= max => Ok(read(html)),
        Some(html) => Err(Failed::TooLarge(html.len(), max)),
        None if capped.error.is_some() => Ok(read(String::new())),
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
