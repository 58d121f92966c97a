//! Starting one Chromium: its profile (owned by the user it runs as), its
//! command line, the DevTools URL read off its stderr, and the CDP
//! connection, through a forwarder when the browser sits in its own network
//! namespace (its DevTools port is on that namespace's loopback).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::cdp::{Cdp, Driver};
use super::isolate::Isolation;
use super::netns::{self, Netns};
use super::{BrowserConfig, BrowserError};
use crate::proxy::Proxy;

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Everything but the per-job proxy: those flags are given per context.
const FLAGS: &[&str] = &[
    "headless",
    "hide-scrollbars",
    "mute-audio",
    "remote-debugging-port=0",
    "disable-extensions",
    "disable-gpu",
    "disable-background-networking",
    "disable-background-timer-throttling",
    "disable-backgrounding-occluded-windows",
    "disable-renderer-backgrounding",
    "disable-breakpad",
    "disable-component-update",
    "disable-default-apps",
    "disable-dev-shm-usage",
    "disable-hang-monitor",
    "disable-popup-blocking",
    "disable-prompt-on-repost",
    "disable-sync",
    "metrics-recording-only",
    "password-store=basic",
    "use-mock-keychain",
    "no-first-run",
    "no-default-browser-check",
    "disable-domain-reliability",
    "dns-prefetch-disable",
    "disable-search-engine-choice-screen",
    "no-service-autorun",
    "disable-client-side-phishing-detection",
    "enable-features=NetworkService,NetworkServiceInProcess",
    // One list: Chromium honours only the last --disable-features. The
    // first group is background chatter (time sync, hints, media routing,
    // translation) that costs CPU per context and would only be refused by
    // the deny-all proxy anyway. The second is work done for every job's
    // context and thrown away with it: each context gets a browser window
    // whose omnibox popup is a WebUI page of its own (two more pages and a
    // renderer per job), and a spare renderer kept ready for the context's
    // next navigation, which never comes. Together they were more than
    // half of the browser's CPU per job.
    "disable-features=Translate,TranslateUI,OptimizationHints,OptimizationGuideModelDownloading,OptimizationHintsFetching,NetworkTimeServiceQuerying,MediaRouter,DialMediaRouteProvider,CertificateTransparencyComponentUpdater,AutofillServerCommunication,LensOverlay,PaintHolding,InterestFeedContentSuggestions,WebUIOmniboxPopup,WebUIOmniboxAimPopup,WebUIOmniboxFullPopup,SpareRendererForSitePerProcess",
    // Without it WebRTC sends STUN straight past the proxy.
    "webrtc-ip-handling-policy=disable_non_proxied_udp",
    "force-webrtc-ip-handling-policy",
    "lang=en-US",
];

/// Chromium bypasses proxies for loopback unless told not to; loopback is
/// exactly what the guard must see.
pub(super) const BYPASS_NOTHING: &str = "<-loopback>";

/// One running browser with its proxy, namespace and profile directory.
pub(super) struct Live {
    pub cdp: Cdp,
    driver: Driver,
    /// Where the browser's own traffic goes to be refused.
    _background: Proxy,
    pub netns: Option<Netns>,
    pub child: tokio::process::Child,
    pub pid: Option<u32>,
    pub served: AtomicU64,
    side_tasks: Vec<JoinHandle<()>>,
    pub profile: tempfile::TempDir,
}

impl Live {
    pub fn is_dead(&self) -> bool {
        // The connection marks itself dead before it fails the pending
        // commands: a job that sees its command fail then sees this.
        self.cdp.is_dead() || self.driver.reader.is_finished()
    }

    /// A loopback listener where this browser can reach it.
    pub fn listener(&self) -> std::io::Result<std::net::TcpListener> {
        netns::listener(self.netns.as_ref())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        for t in &self.side_tasks {
            t.abort();
        }
    }
}

pub(super) async fn launch(cfg: &BrowserConfig, iso: &Isolation) -> Result<Live, BrowserError> {
    let fail = |e: &dyn std::fmt::Display| BrowserError::Launch(e.to_string());
    if !cfg.chrome.exists() {
        return Err(fail(&format!("{} not found", cfg.chrome.display())));
    }
    let netns = if iso.netns {
        Some(Netns::create().map_err(|e| fail(&e))?)
    } else {
        None
    };
    let background = Proxy::deny_all_on(netns::listener(netns.as_ref()).map_err(|e| fail(&e))?)
        .map_err(|e| fail(&e))?;
    // Each browser its own profile: a shared one makes the second browser
    // fail on Chromium's SingletonLock. It doubles as Chromium's HOME.
    let profile = tempfile::Builder::new()
        .prefix("stevedore-chromium-")
        .tempdir()
        .map_err(|e| fail(&e))?;
    if let Some((uid, gid)) = iso.run_as {
        std::os::unix::fs::chown(profile.path(), Some(uid), Some(gid)).map_err(|e| fail(&e))?;
    }
    let mut cmd = iso.command(&cfg.chrome, netns.as_ref(), profile.path());
    cmd.args(FLAGS.iter().map(|f| format!("--{f}")))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--proxy-server=http://{}", background.addr()))
        .arg(format!("--proxy-bypass-list={BYPASS_NOTHING}"));
    if !iso.sandbox {
        cmd.args(["--no-sandbox", "--disable-setuid-sandbox"]);
    }
    cmd.arg("about:blank");
    let mut child = cmd.spawn().map_err(|e| fail(&e))?;
    // The launchers exec into Chromium, so this is the browser itself.
    let pid = child.id();
    let stderr = child.stderr.take().ok_or_else(|| fail(&"no stderr"))?;
    let (ws, drain) = tokio::time::timeout(LAUNCH_TIMEOUT, devtools_url(stderr))
        .await
        .map_err(|_| fail(&format!("no DevTools URL within {LAUNCH_TIMEOUT:?}")))??;
    let mut side_tasks = vec![drain];
    let ws = match &netns {
        Some(ns) => {
            let (url, forward) = forward_devtools(ns, &ws).await.map_err(|e| fail(&e))?;
            side_tasks.push(forward);
            url
        }
        None => ws,
    };
    let (cdp, driver) = Cdp::connect(&ws).await.map_err(|e| fail(&e))?;
    Ok(Live {
        cdp,
        driver,
        _background: background,
        netns,
        child,
        pid,
        served: AtomicU64::new(0),
        side_tasks,
        profile,
    })
}

/// Reads stderr up to the DevTools line, then keeps draining it (a full
/// pipe would stall Chromium) into debug logs.
async fn devtools_url(
    stderr: tokio::process::ChildStderr,
) -> Result<(String, JoinHandle<()>), BrowserError> {
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| BrowserError::Launch(e.to_string()))?;
        let Some(line) = line else {
            return Err(BrowserError::Launch(format!(
                "Chromium exited: {}",
                seen.join(" | ")
            )));
        };
        if let Some(url) = line.trim().strip_prefix("DevTools listening on ") {
            let url = url.to_owned();
            let drain = tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::trace!(line, "chromium");
                }
            });
            return Ok((url, drain));
        }
        if seen.len() < 20 {
            seen.push(line);
        }
    }
}

/// A loopback port in the worker's namespace that leads to `ws`'s port in
/// the browser's: the CDP client connects here.
async fn forward_devtools(ns: &Netns, ws: &str) -> std::io::Result<(String, JoinHandle<()>)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let rest = ws.strip_prefix("ws://").ok_or_else(|| bad(ws))?;
    let (authority, path) = rest.split_once('/').ok_or_else(|| bad(ws))?;
    let inner: SocketAddr = authority.parse().map_err(|_| bad(ws))?;
    let outer = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/{path}", outer.local_addr()?);
    let ns = Arc::new(ns.try_clone()?);
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = outer.accept().await {
            let ns = ns.clone();
            tokio::spawn(async move {
                let inside = tokio::task::spawn_blocking(move || ns.connect(inner)).await;
                let Ok(Ok(inside)) = inside else { return };
                let Ok(mut inside) = TcpStream::from_std(inside) else {
                    return;
                };
                // Each hop relays DevTools messages as they come; Nagle would
                // hold one back for the other side's delayed ACK.
                let _ = client.set_nodelay(true);
                let _ = inside.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut inside).await;
            });
        }
    });
    Ok((url, task))
}

/// Closes the browser and reaps it.
pub(super) async fn close(live: &mut Live) {
    if !live.is_dead() {
        let _ = live
            .cdp
            .call(None, "Browser.close", serde_json::json!({}))
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(5), live.child.wait())
        .await
        .is_err()
    {
        let _ = live.child.kill().await;
    }
}
