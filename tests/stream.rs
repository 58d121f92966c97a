//! The event stream on Postgres: every terminal event of 500 probe jobs
//! arrives once over SSE, a client that reconnects with `Last-Event-ID`
//! misses nothing and gets nothing twice, a notifier stopped and restarted
//! mid-run loses nothing, and the WebSocket carries the same stream and cuts
//! off a client that never reads.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use stevedore::fleet::{self, Roles};
use support::{fast_notify, fast_timing, submit_probes, Flavor, Opts, SseClient, TestFleet};
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
    let notifier = || Roles {
        api: None,
        dispatcher: None,
        workers: vec![],
        notifier: true,
        notify: fast_notify(""),
        timing: fast_timing(),
        metrics: None,
        demo_pages: false,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_streams_events_and_drops_a_client_that_never_reads() {
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
    // The stalled client: a tiny receive buffer, and it never reads.
    let addr: std::net::SocketAddr = f.url.trim_start_matches("http://").parse().expect("addr");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(2048).expect("rcvbuf");
    let tcp = sock.connect(addr).await.expect("connect");
    let stalled_url = format!("{}/v1/stream", f.url.replace("http://", "ws://"));
    let (stalled, _) = tokio_tungstenite::client_async(stalled_url, tcp)
        .await
        .expect("ws");

    let ids: HashSet<Uuid> = submit_probes(&f, 1000).await.into_iter().collect();
    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let msg = tokio::time::timeout(Duration::from_secs(60), reader.next())
            .await
            .expect("events keep coming");
        let Some(Ok(msg)) = msg else {
            // With a small buffer even this reader may be cut off during a
            // burst: it resumes where it was, as the display page does.
            let url = format!("{ws_url}&since={last}");
            reader = tokio_tungstenite::connect_async(&url).await.expect("ws").0;
            continue;
        };
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            let id = v["id"].as_i64().expect("id");
            assert!(id > last, "ids ascend");
            last = id;
            let job: Uuid = v["job_id"].as_str().expect("job_id").parse().expect("uuid");
            assert!(seen.insert(job), "each terminal event once");
        }
    }
    support::eventually(30, "the stalled client is dropped", || async {
        let m = f
            .http
            .get(format!("{}/metrics", f.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        m.lines().any(|l| {
            l.starts_with(
                "stevedore_stream_clients_dropped_total{reason=\"slow_client\",transport=\"ws\"}",
            ) && !l.ends_with(" 0")
        })
    })
    .await;
    drop(stalled);
    f.shutdown().await;
}
