//! The event stream on Postgres: every terminal event of 500 probe jobs
//! arrives once over SSE, a client that reconnects with `Last-Event-ID`
//! misses nothing and gets nothing twice, a notifier stopped and restarted
//! mid-run loses nothing, and the WebSocket carries the same stream; a
//! client that stops reading is told why (SSE `event: error` naming its
//! last id, WebSocket close 1013) and resumes from there.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use stevedore::fleet::{self, Roles};
use support::{fast_notify, fast_timing, submit_probes, Flavor, Opts, SseClient, TestFleet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const TERMINAL: &str = "types=job.succeeded,job.dead,job.cancelled";

/// Reads terminal events until every job in `ids` has one, counting each.
async fn collect(
    c: &mut SseClient,
    seen: &mut HashMap<Uuid, usize>,
    ids: &HashSet<Uuid>,
    stop_at: usize,
    last: &mut i64,
) {
    while seen.len() < stop_at {
        let e = c.next(60).await.expect("events keep coming");
        assert!(e.id > *last, "ids ascend: {} after {}", e.id, last);
        *last = e.id;
        let job: Uuid = e.data["job_id"]
            .as_str()
            .expect("job_id")
            .parse()
            .expect("uuid");
        assert!(ids.contains(&job));
        assert_eq!(e.event, "job.succeeded");
        assert_eq!(
            e.data["result"]["attempt"], 1,
            "terminal events carry the result"
        );
        *seen.entry(job).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_delivers_every_terminal_event_once_and_resumes_with_last_event_id() {
    let f = TestFleet::start_with(
        Flavor::Postgres,
        Opts {
            workers: vec![("probe".into(), 32)],
            ..Default::default()
        },
    )
    .await;
    let url = format!("{}/v1/events?{TERMINAL}", f.url);
    let mut c = SseClient::connect(&url, None).await;
    let ids: HashSet<Uuid> = submit_probes(&f, 500).await.into_iter().collect();
    let (mut seen, mut last) = (HashMap::new(), 0);
    collect(&mut c, &mut seen, &ids, 200, &mut last).await;
    drop(c);
    // Events keep landing while the client is away.
    let mut c = SseClient::connect(&url, Some(last)).await;
    collect(&mut c, &mut seen, &ids, ids.len(), &mut last).await;
    assert!(seen.values().all(|n| *n == 1), "every event exactly once");
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_stopped_and_restarted_mid_run_loses_no_event() {
    let f = TestFleet::start_with(
        Flavor::Postgres,
        Opts {
            workers: vec![("probe".into(), 16)],
            notifier: false,
            ..Default::default()
        },
    )
    .await;
    let notifier = || {
        Roles::new(fast_timing())
            .with_notifier()
            .with_notify(fast_notify(""))
    };
    let first = fleet::start(f.backend.clone(), fleet::default_kinds(), notifier())
        .await
        .expect("notifier");
    let mut c = SseClient::connect(&format!("{}/v1/events?{TERMINAL}", f.url), None).await;
    let ids: HashSet<Uuid> = submit_probes(&f, 500).await.into_iter().collect();
    let (mut seen, mut last) = (HashMap::new(), 0);
    collect(&mut c, &mut seen, &ids, 100, &mut last).await;
    first.shutdown().await;
    let second = fleet::start(f.backend.clone(), fleet::default_kinds(), notifier())
        .await
        .expect("notifier");
    collect(&mut c, &mut seen, &ids, ids.len(), &mut last).await;
    assert!(seen.values().all(|n| *n == 1), "every event exactly once");
    second.shutdown().await;
    f.shutdown().await;
}

/// The value of a `stevedore_stream_clients_dropped_total` series.
async fn dropped(f: &TestFleet, transport: &str) -> u64 {
    let m = f
        .http
        .get(format!("{}/metrics", f.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let series = format!(
        "stevedore_stream_clients_dropped_total{{reason=\"slow_client\",transport=\"{transport}\"}} "
    );
    m.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A connection with a tiny receive buffer, so the server's writes stall
/// as soon as the client stops reading.
async fn stalled_tcp(f: &TestFleet) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = f.url.trim_start_matches("http://").parse().expect("addr");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(2048).expect("rcvbuf");
    sock.connect(addr).await.expect("connect")
}

/// Undoes HTTP/1.1 chunked transfer coding (enough for a test's own reads).
fn dechunk(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let Some((_, mut rest)) = text.split_once("\r\n\r\n") else {
        return String::new();
    };
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_get_the_error_event_or_close_1013_and_resume() {
    let mut notify = fast_notify("");
    notify.stream_buffer = 64;
    let f = TestFleet::start_with(
        Flavor::Postgres,
        Opts {
            workers: vec![("probe".into(), 32)],
            notify,
            ..Default::default()
        },
    )
    .await;
    let ws_url = format!("{}/v1/stream?{TERMINAL}", f.url.replace("http://", "ws://"));
    let (mut reader, _) = tokio_tungstenite::connect_async(&ws_url).await.expect("ws");
    let mut last = 0i64;
    // Two stalled clients that do not read until the server gave up on them.
    let stalled_url = format!("{}/v1/stream", f.url.replace("http://", "ws://"));
    let (mut stalled_ws, _) = tokio_tungstenite::client_async(stalled_url, stalled_tcp(&f).await)
        .await
        .expect("ws");
    let mut stalled_sse = stalled_tcp(&f).await;
    stalled_sse
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");

    let ids: HashSet<Uuid> = submit_probes(&f, 1000).await.into_iter().collect();
    let watch_ws = async {
        support::eventually(60, "the stalled WebSocket is dropped", || async {
            dropped(&f, "ws").await > 0
        })
        .await;
        // The server allows its close frame a moment: read promptly now.
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stalled_ws.next())
                .await
                .expect("the stalled socket ends");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("ended without a close frame: {other:?}"),
            }
        }
    };
    let read_all = async {
        let mut seen = HashSet::new();
        while seen.len() < ids.len() {
            let msg = tokio::time::timeout(Duration::from_secs(60), reader.next())
                .await
                .expect("events keep coming");
            let Some(Ok(msg)) = msg else {
                // With a small buffer even this reader may be cut off during
                // a burst: it resumes where it was, as the display page does.
                let url = format!("{ws_url}&since={last}");
                reader = tokio_tungstenite::connect_async(&url).await.expect("ws").0;
                continue;
            };
            if let Message::Text(t) = msg {
                let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                let id = v["id"].as_i64().expect("id");
                assert!(id > last, "ids ascend");
                last = id;
                let job: Uuid = v["job_id"].as_str().expect("job_id").parse().expect("uuid");
                assert!(seen.insert(job), "each terminal event once");
            }
        }
    };
    let (close, ()) = tokio::join!(watch_ws, read_all);
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1013, "{close:?}");
    assert!(
        close
            .reason
            .as_str()
            .starts_with("slow_client: resume with since="),
        "{close:?}"
    );

    support::eventually(30, "the stalled SSE client is dropped", || async {
        dropped(&f, "sse").await > 0
    })
    .await;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let frames = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stalled_sse.read(&mut buf))
            .await
            .expect("the SSE body ends")
            .expect("read");
        raw.extend_from_slice(&buf[..n]);
        // The body ends with the last chunk once the error frame is out.
        if n == 0 || raw.ends_with(b"\r\n0\r\n\r\n") {
            break dechunk(&raw);
        }
    };
    let line = |frame: &str, key: &str| -> Option<String> {
        frame
            .lines()
            .find_map(|l| Some(l.strip_prefix(key)?.trim().to_owned()))
    };
    let frames: Vec<&str> = frames.split("\n\n").filter(|f| !f.is_empty()).collect();
    let (error, before) = frames.split_last().expect("frames");
    assert_eq!(
        line(error, "event:").as_deref(),
        Some("error"),
        "the last frame: {error}"
    );
    let data: serde_json::Value = line(error, "data:")
        .and_then(|d| serde_json::from_str(&d).ok())
        .expect("error data");
    assert_eq!(data["error"], "slow_client");
    let last_seen: i64 = before
        .iter()
        .rev()
        .find_map(|f| line(f, "id:"))
        .and_then(|id| id.parse().ok())
        .expect("events before the error");
    assert_eq!(
        data["last_event_id"], last_seen,
        "it names the last id sent"
    );
    // Resuming from there picks up right after it.
    let mut c = SseClient::connect(&format!("{}/v1/events", f.url), Some(last_seen)).await;
    let next = c.next(10).await.expect("the stream resumes");
    assert!(next.id > last_seen, "{} after {last_seen}", next.id);
    f.shutdown().await;
}
