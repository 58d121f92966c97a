//! The filtering proxy Chromium's pages go through. Chromium resolves names
//! itself, so watching its requests cannot stop a page from reaching inside
//! the network; every connection a job's browser context makes goes through
//! one of these instead (loopback not bypassed), is judged by the SSRF
//! guard, and is dialed to the address the guard checked. With [`DenyAll`]
//! as its guard it is the browser-wide proxy that refuses everything else.
//!
//! Plain HTTP arrives in absolute form and is forwarded as one request per
//! client connection (`Connection: close` both ways), so a kept-alive
//! connection cannot carry a second request to another host. HTTPS and
//! WebSockets arrive as `CONNECT host:port` and become a tunnel to the one
//! checked address. A refusal is a 403 page carrying
//! `<meta name="stevedore-refused">` (what a refused http navigation shows)
//! or, for CONNECT, a 403 Chromium turns into
//! `net::ERR_TUNNEL_CONNECTION_FAILED`; both are recorded so the loader can
//! tell a refusal from an unreachable host.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use stevedore_netguard::{AllowedUrl, GuardError, UrlGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The marker a refused http navigation's page carries.
pub const REFUSED_META: &str = "stevedore-refused";
const MAX_HEAD: usize = 64 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A page is done long before this; a tunnel left open by a page that was
/// closed must not hold a task forever.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
const REMEMBERED_REFUSALS: usize = 256;
/// What a page may upload in one request, as plain HTTP caps what a page
/// may be: a Content-Length is the page's word, not a promise.
pub const MAX_REQUEST_BODY: u64 = 5 * 1024 * 1024;

/// Opens the upstream connection. Tests swap it to prove a refused target
/// is never dialed without sending traffic anywhere but loopback.
#[async_trait]
pub trait Dial: Send + Sync + 'static {
    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDial;

#[async_trait]
impl Dial for TcpDial {
    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

/// The guard for the browser's own traffic (time sync, component and
/// search-engine preconnects, sign-in): nothing of it has any business on
/// the network, whatever the flags failed to switch off.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAll;

#[async_trait]
impl UrlGuard for DenyAll {
    async fn check(&self, _: &str) -> Result<AllowedUrl, GuardError> {
        Err(GuardError::Denied(
            "the browser's own background traffic is not let out".into(),
        ))
    }
}

/// One refusal: what was asked for and why it was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub target: String,
    pub reason: String,
}

/// The last few hundred refusals, oldest first: enough to explain a job's
/// failure without a page that keeps trying growing memory.
#[derive(Default)]
pub struct Refusals(Mutex<VecDeque<Refusal>>);

impl Refusals {
    pub fn push(&self, r: Refusal) {
        let mut recent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == REMEMBERED_REFUSALS {
            recent.pop_front();
        }
        recent.push_back(r);
    }

    pub fn all(&self) -> Vec<Refusal> {
        let recent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }
}

/// What the proxy answered for one plain-HTTP URL: how a page's main
/// document's status is known without the browser reporting it.
#[derive(Debug, Clone)]
struct Answer {
    url: String,
    status: u16,
    location: Option<String>,
}

const REMEMBERED_ANSWERS: usize = 256;

struct Shared {
    guard: Arc<dyn UrlGuard>,
    /// Turn away what extraction never reads (see [`not_needed`]).
    skip_resources: AtomicBool,
    answers: Mutex<VecDeque<Answer>>,
    /// The browser-wide deny-all proxy refuses Chromium's own chatter all
    /// day; only a page's refusals are worth an info line.
    quiet: bool,
    dial: Arc<dyn Dial>,
    log: Refusals,
}

/// A running proxy on a loopback port; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(guard: Arc<dyn UrlGuard>, dial: Arc<dyn Dial>) -> io::Result<Self> {
        Self::start_on(loopback()?, guard, dial)
    }

    /// On a listener of the caller's (one bound inside the browser's
    /// network namespace, so the browser can reach this proxy and nothing
    /// else). The listener must be non-blocking.
    pub fn start_on(
        listener: std::net::TcpListener,
        guard: Arc<dyn UrlGuard>,
        dial: Arc<dyn Dial>,
    ) -> io::Result<Self> {
        Self::spawn(listener, guard, dial, false)
    }

    /// The browser-wide proxy: refuses everything, logs at debug level.
    pub async fn deny_all() -> io::Result<Self> {
        Self::deny_all_on(loopback()?)
    }

    pub fn deny_all_on(listener: std::net::TcpListener) -> io::Result<Self> {
        Self::spawn(listener, Arc::new(DenyAll), Arc::new(TcpDial), true)
    }

    fn spawn(
        listener: std::net::TcpListener,
        guard: Arc<dyn UrlGuard>,
        dial: Arc<dyn Dial>,
        quiet: bool,
    ) -> io::Result<Self> {
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            guard,
            skip_resources: AtomicBool::new(false),
            answers: Mutex::default(),
            quiet,
            dial,
            log: Refusals::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    // Out of descriptors, most likely: back off, don't spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let served = tokio::time::timeout(CONNECTION_LIFETIME, serve(conn, &s)).await;
                    if let Ok(Err(e)) = served {
                        tracing::debug!(error = %e, "proxy connection ended");
                    }
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, answer plain-HTTP requests for images, media, fonts
    /// and stylesheets with a 403 of this proxy's own, never dialing: a
    /// job that does not render in full never needs them. (The browser
    /// refuses them too, https included; this closes the moment before
    /// it starts to.)
    pub fn skip_resources(&self) {
        self.shared.skip_resources.store(true, Ordering::SeqCst);
    }

    /// The status this proxy last answered for `url` over plain HTTP,
    /// redirects followed: the main document's status when `url` is the
    /// page's. None for https (tunnelled, unseen) or a URL never fetched.
    pub fn status_of(&self, url: &str) -> Option<u16> {
        let answers = self
            .shared
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut url = stevedore_netguard::Url::parse(url).ok()?;
        for _ in 0..20 {
            let a = answers.iter().rev().find(|a| a.url == url.as_str())?;
            match (&a.location, a.status) {
                (Some(loc), 300..=399) => url = url.join(loc).ok()?,
                _ => return Some(a.status),
            }
        }
        None
    }

    /// What this proxy refused, oldest first (the last few hundred).
    pub fn refusals(&self) -> Vec<Refusal> {
        self.shared.log.all()
    }
}

impl Shared {
    fn answered(&self, a: Answer) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() == REMEMBERED_ANSWERS {
            answers.pop_front();
        }
        answers.push_back(a);
    }

    fn record(&self, target: &str, reason: &str) {
        if self.quiet {
            tracing::debug!(target, reason, "proxy refused the browser's own connection");
        } else {
            tracing::info!(target, reason, "proxy refused a page's connection");
        }
        self.log.push(Refusal {
            target: target.to_owned(),
            reason: reason.to_owned(),
        });
    }
}

fn loopback() -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Reads until the end of the head; returns the buffer and the head's length.
async fn read_head<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<(Vec<u8>, usize)> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(HEAD_TIMEOUT, r.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "head timed out"))??;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((buf, end + 4));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Headers that describe the hop, not the message: never forwarded.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// A request for something only a full render needs, by what Chromium
/// says it is for (`Sec-Fetch-Dest`, sent to trustworthy origins) or, where
/// it does not say, what it accepts (images and stylesheets).
fn not_needed(headers: &[httparse::Header]) -> bool {
    let value = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    if let Some(dest) = value("sec-fetch-dest") {
        return matches!(
            dest.trim(),
            "image" | "font" | "style" | "audio" | "video" | "track"
        );
    }
    value("accept").is_some_and(|a| a.starts_with("image/") || a.starts_with("text/css"))
}

fn push_header(out: &mut Vec<u8>, h: &httparse::Header) {
    out.extend_from_slice(h.name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(h.value);
    out.extend_from_slice(b"\r\n");
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn refuse(
    client: &mut TcpStream,
    shared: &Shared,
    target: &str,
    reason: &str,
) -> io::Result<()> {
    shared.record(target, reason);
    let body = format!(
        "<!doctype html><title>Refused</title><meta name=\"{REFUSED_META}\" content=\"{}\"><p>Refused by the stevedore proxy.</p>",
        html_escape(reason)
    );
    let resp = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nProxy-Connection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(resp.as_bytes()).await?;
    client.shutdown().await
}

async fn bad_gateway(client: &mut TcpStream, why: &str) -> io::Result<()> {
    let resp = format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}",
        why.len()
    );
    client.write_all(resp.as_bytes()).await?;
    client.shutdown().await
}

async fn serve(mut client: TcpStream, shared: &Shared) -> io::Result<()> {
    // A response goes out as head then body, in separate writes: with Nagle
    // on, the body waits for the browser's delayed ACK of the head (~40 ms).
    let _ = client.set_nodelay(true);
    let (buf, head_len) = read_head(&mut client).await?;
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&buf[..head_len])
        .map_err(|e| bad(&e.to_string()))?;
    let method = req.method.ok_or_else(|| bad("no method"))?.to_owned();
    let target = req.path.ok_or_else(|| bad("no target"))?.to_owned();

    if method.eq_ignore_ascii_case("CONNECT") {
        // The guard judges URLs; the tunnel's scheme does not matter to it
        // beyond being allowed, the explicit port is what counts.
        let allowed = match shared.guard.check(&format!("https://{target}/")).await {
            Ok(a) => a,
            Err(e) => return refuse(&mut client, shared, &target, &e.to_string()).await,
        };
        let mut upstream = match shared.dial.dial(allowed.addr).await {
            Ok(u) => u,
            Err(e) => return bad_gateway(&mut client, &e.to_string()).await,
        };
        let _ = upstream.set_nodelay(true);
        client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
        upstream.write_all(&buf[head_len..]).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        return Ok(());
    }

    let url = match stevedore_netguard::Url::parse(&target) {
        Ok(u) if u.scheme() == "http" => u,
        _ => return refuse(&mut client, shared, &target, "not an absolute http URL").await,
    };
    if shared.skip_resources.load(Ordering::SeqCst) && not_needed(req.headers) {
        let resp = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        client.write_all(resp).await?;
        return client.shutdown().await;
    }
    let allowed = match shared.guard.check(url.as_str()).await {
        Ok(a) => a,
        Err(e) => return refuse(&mut client, shared, &target, &e.to_string()).await,
    };
    let mut body_len = 0u64;
    let mut out = format!(
        "{method} {}{} HTTP/1.1\r\n",
        url.path(),
        url.query().map(|q| format!("?{q}")).unwrap_or_default()
    )
    .into_bytes();
    for h in req.headers.iter() {
        if hop_by_hop(h.name) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Streaming uploads are rare from a quiz page; refusing them
            // keeps the one-request-per-connection rule simple to enforce.
            return refuse(
                &mut client,
                shared,
                &target,
                "chunked request bodies are not proxied",
            )
            .await;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad("bad content-length"))?;
        }
        push_header(&mut out, h);
    }
    if body_len > MAX_REQUEST_BODY {
        let why =
            format!("request body of {body_len} bytes is over the {MAX_REQUEST_BODY}-byte cap");
        return refuse(&mut client, shared, &target, &why).await;
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut upstream = match shared.dial.dial(allowed.addr).await {
        Ok(u) => u,
        Err(e) => return bad_gateway(&mut client, &e.to_string()).await,
    };
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&out).await?;
    // Only this request's body goes upstream, streamed rather than held:
    // whatever the client sends after it is never read, so it cannot reach
    // the checked address.
    let early = &buf[head_len..];
    let early = &early[..early.len().min(body_len as usize)];
    upstream.write_all(early).await?;
    let rest = body_len - early.len() as u64;
    let sent = tokio::io::copy(&mut (&mut client).take(rest), &mut upstream).await?;
    if sent < rest {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }

    let (rbuf, rhead_len) = read_head(&mut upstream).await?;
    let mut rheaders = [httparse::EMPTY_HEADER; 96];
    let mut resp = httparse::Response::new(&mut rheaders);
    resp.parse(&rbuf[..rhead_len])
        .map_err(|e| bad(&e.to_string()))?;
    let code = resp.code.ok_or_else(|| bad("no status"))?;
    shared.answered(Answer {
        url: url.to_string(),
        status: code,
        location: resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("location"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::to_owned),
    });
    let mut head = format!("HTTP/1.1 {} {}\r\n", code, resp.reason.unwrap_or("")).into_bytes();
    for h in resp.headers.iter().filter(|h| !hop_by_hop(h.name)) {
        push_header(&mut head, h);
    }
    head.extend_from_slice(b"Connection: close\r\nProxy-Connection: close\r\n\r\n");
    client.write_all(&head).await?;
    client.write_all(&rbuf[rhead_len..]).await?;
    // Upstream was asked to close after its response, so this ends with it.
    tokio::io::copy(&mut upstream, &mut client).await?;
    client.shutdown().await
}
