//! Servers for the scrape tests, all on loopback: the fixture site (the
//! only allowlisted host) and canaries that only count who reached them.
//! Nothing refused may ever reach a canary; tests assert on its counters,
//! not only on the error they got.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;
use stevedore_handler::{parse_payload, Handler, JobContext, JobError};
use stevedore_scrape::{ScrapeHandler, ScrapeOutput, ScrapePayload};

pub const MOODLE: &str = include_str!("../../../../fixtures/quiz/moodle-multichoice.html");
pub const SPA: &str = include_str!("../../../../fixtures/quiz/spa-rendered.html");

/// Counts TCP connections and UDP datagrams; answers nothing.
pub struct Canary {
    pub port: u16,
    pub udp_port: u16,
    tcp: Arc<AtomicUsize>,
    udp: Arc<AtomicUsize>,
}

impl Canary {
    pub async fn start() -> Self {
        Self::on("127.0.0.1".parse().expect("ip"), 0).await
    }

    /// On a given loopback address and port (a rebinding test puts it on
    /// 127.0.0.2 at the fixture site's port).
    pub async fn on(ip: IpAddr, port: u16) -> Self {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .expect("bind canary");
        let port = l.local_addr().expect("addr").port();
        let u = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind udp canary");
        let udp_port = u.local_addr().expect("addr").port();
        let (tcp, udp) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let t = tcp.clone();
        tokio::spawn(async move {
            while let Ok((_s, from)) = l.accept().await {
                eprintln!("canary reached over TCP from {from}");
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        let d = udp.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = u.recv_from(&mut buf).await {
                eprintln!("canary reached over UDP from {from}");
                d.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            port,
            udp_port,
            tcp,
            udp,
        }
    }

    /// Connections plus datagrams, after a moment for late arrivals.
    pub async fn reached(&self) -> usize {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.tcp.load(Ordering::SeqCst) + self.udp.load(Ordering::SeqCst)
    }
}

/// A quiz page whose script then tries every way out to the canary.
fn leaky(canary: &str, udp_port: u16) -> String {
    format!(
        r#"<!doctype html><title>Leaky quiz</title>
<fieldset><legend>Which port is the canary on?</legend>
<label><input type="radio" name="q1"> The first</label>
<label><input type="radio" name="q1"> The second</label></fieldset>
<img src="http://{canary}/img"><img src="http://localhost.:{canary_port}/img2">
<iframe src="http://{canary}/frame"></iframe>
<script>
const out = [];
fetch("http://{canary}/fetch", {{mode: "no-cors"}}).catch(e => out.push("fetch"));
fetch("https://{canary}/tls", {{mode: "no-cors"}}).catch(e => out.push("tls"));
try {{ const ws = new WebSocket("ws://{canary}/ws"); ws.onerror = () => out.push("ws"); }} catch (e) {{}}
navigator.sendBeacon("http://{canary}/beacon", "x");
const pc = new RTCPeerConnection({{iceServers: [{{urls: "stun:127.0.0.1:{udp_port}"}}]}});
pc.createDataChannel("d");
pc.createOffer().then(o => pc.setLocalDescription(o));
setTimeout(() => {{ const d = document.createElement("div"); d.id = "done"; document.body.appendChild(d); }}, 1500);
</script>"#,
        canary_port = canary.rsplit(':').next().unwrap_or_default(),
    )
}

/// A quiz page whose script tries every loopback port in `ports` directly
/// (fetch over http and https, WebSocket, an image, WebRTC over UDP and
/// TCP), as a page would to reach the worker's Postgres, Redis, RabbitMQ.
fn services(ports: &[u16]) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"<!doctype html><title>Services quiz</title>
<fieldset><legend>Which service answers?</legend>
<label><input type="radio" name="q1"> Postgres</label>
<label><input type="radio" name="q1"> Redis</label></fieldset>
<script>
for (const p of [{ports}]) {{
  const at = "127.0.0.1:" + p;
  fetch("http://" + at + "/", {{mode: "no-cors"}}).catch(() => {{}});
  fetch("https://" + at + "/", {{mode: "no-cors"}}).catch(() => {{}});
  try {{ new WebSocket("ws://" + at + "/"); }} catch (e) {{}}
  const img = new Image(); img.src = "http://" + at + "/img"; document.body.appendChild(img);
  const pc = new RTCPeerConnection({{iceServers: [
    {{urls: "stun:" + at}},
    {{urls: "turn:" + at + "?transport=tcp", username: "u", credential: "c"}},
    {{urls: "turn:" + at + "?transport=udp", username: "u", credential: "c"}}]}});
  pc.createDataChannel("d");
  pc.createOffer().then(o => pc.setLocalDescription(o));
}}
setTimeout(() => {{ const d = document.createElement("div"); d.id = "done"; document.body.appendChild(d); }}, 2000);
</script>"#
    )
}

/// A quiz page that gathers its WebRTC candidates (no ICE server: nothing
/// is sent) and writes what it found into its title.
pub const WEBRTC: &str = r#"<!doctype html><title>gathering</title>
<fieldset><legend>What did WebRTC find?</legend>
<label><input type="radio" name="q1"> Nothing</label>
<label><input type="radio" name="q1"> Host candidates</label></fieldset>
<script>
const found = {udp: 0, tcp: 0};
const pc = new RTCPeerConnection({iceServers: []});
pc.createDataChannel("d");
const finish = () => {
  document.title = "udp=" + found.udp + " tcp=" + found.tcp;
  const d = document.createElement("div"); d.id = "done"; document.body.appendChild(d);
};
pc.onicecandidate = (e) => {
  if (!e.candidate) return finish();
  const c = e.candidate.candidate.toLowerCase();
  if (c.includes(" udp ")) found.udp++;
  if (c.includes(" tcp ")) found.tcp++;
};
pc.createOffer().then(o => pc.setLocalDescription(o));
setTimeout(finish, 3000);
</script>"#;

#[derive(Clone)]
struct Site {
    canary: String,
    udp_port: u16,
    port: u16,
}

/// The fixture site on `127.0.0.1`; `canary` is where its traps point.
pub async fn fixtures(canary: &Canary) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let site = Site {
        canary: format!("127.0.0.1:{}", canary.port),
        udp_port: canary.udp_port,
        port,
    };
    let app = Router::new()
        .route(
            "/moodle",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], MOODLE) }),
        )
        .route("/spa", get(|| async { Html(SPA) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Html(MOODLE)
            }),
        )
        .route(
            "/empty",
            get(|| async { "<html><body><p>No quiz here.</p></body></html>" }),
        )
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/broken",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route(
            "/busy",
            get(|| async {
                (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "7")]).into_response()
            }),
        )
        .route("/huge", get(|| async { "x".repeat(64 * 1024) }))
        .route(
            "/to-canary",
            get(|State(s): State<Site>| async move {
                Redirect::temporary(&format!("http://{}/", s.canary))
            }),
        )
        .route(
            "/to-canary-tls",
            get(|State(s): State<Site>| async move {
                Redirect::temporary(&format!("https://{}/", s.canary))
            }),
        )
        .route(
            "/to-moodle",
            get(|| async { Redirect::permanent("/moodle") }),
        )
        .route(
            "/leaky",
            get(|State(s): State<Site>| async move { Html(leaky(&s.canary, s.udp_port)) }),
        )
        .route(
            "/services",
            get(|Query(q): Query<std::collections::HashMap<String, String>>| async move {
                let ports: Vec<u16> = q
                    .get("ports")
                    .map(|p| p.split(',').filter_map(|p| p.parse().ok()).collect())
                    .unwrap_or_default();
                Html(services(&ports))
            }),
        )
        .route("/webrtc", get(|| async { Html(WEBRTC) }))
        .route(
            "/huge-dom",
            get(|| async {
                Html(format!(
                    "{MOODLE}<script>document.body.appendChild(Object.assign(document.createElement('pre'), \
                     {{textContent: 'x'.repeat({})}}));</script>",
                    20 * 1024 * 1024
                ))
            }),
        )
        .route(
            "/rebind",
            get(|State(s): State<Site>| async move {
                Html(format!(
                    "{MOODLE}<img src=\"http://rebind.test:{}/after-rebinding\">",
                    s.port
                ))
            }),
        )
        .with_state(site);
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

/// The context of a first attempt that nobody cancels.
pub fn first_attempt() -> JobContext {
    JobContext::new(Default::default(), 1, Default::default())
}

pub async fn scrape(
    h: &ScrapeHandler,
    payload: serde_json::Value,
) -> (Result<ScrapeOutput, JobError>, JobContext) {
    let p: ScrapePayload = parse_payload(&payload).expect("valid payload");
    let ctx = first_attempt();
    (h.run(&ctx, p).await, ctx)
}

pub fn assert_refused<T: std::fmt::Debug>(what: &str, res: &Result<T, JobError>) {
    match res {
        Err(JobError::Permanent { message }) => {
            assert!(message.contains("refused"), "{what}: {message}")
        }
        other => panic!("{what} was not refused: {other:?}"),
    }
}
