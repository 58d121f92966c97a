//! The event stream: `GET /v1/events` (Server-Sent Events) and
//! `GET /v1/stream` (WebSocket), with the same JSON messages. A client
//! resumes with `Last-Event-ID` (SSE) or `since` (both): it first gets the
//! final events it missed from the database, then the live ones from the
//! hub, each exactly once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::stream::Stream;
use futures::{SinkExt, StreamExt};
use stevedore_handler::FieldError;

use super::{ApiError, AppState};
use crate::auth::Principal;
use crate::model::event::{Event, EventFilter};
use crate::notifier::hub::{ClientGauge, Subscription, SLOW_CLIENT};
use crate::store::events::EventStore;

/// How long one WebSocket write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(15);

/// Query of both stream routes (documentation; parsed by hand because `job`
/// repeats).
#[derive(utoipa::IntoParams)]
#[allow(dead_code)]
pub struct StreamQuery {
    /// Only events of jobs of this kind.
    kind: Option<String>,
    /// Only events of these jobs and their children (repeat the parameter).
    job: Option<Vec<uuid::Uuid>>,
    /// Comma-separated event types, e.g. `job.succeeded,job.dead`.
    types: Option<String>,
    /// Resume after this event id (SSE also reads `Last-Event-ID`).
    since: Option<i64>,
    /// Without `since`: start with up to this many (≤ 1000) recent events.
    recent: Option<i64>,
    /// A ticket from `POST /v1/stream-tickets`, for browsers, which cannot
    /// send `Authorization` on a WebSocket.
    ticket: Option<String>,
}

/// Where a client starts: after an event id, or this many ids back.
enum Start {
    Since(i64),
    Recent(i64),
    Live,
}

fn parse_query(raw: Option<String>, headers: &HeaderMap) -> Result<(EventFilter, Start), ApiError> {
    let raw = raw.unwrap_or_default();
    let url = reqwest::Url::parse(&format!("http://q/?{raw}"))
        .map_err(|e| ApiError::BadParam(FieldError::new("query", e.to_string())))?;
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    for (k, _) in &pairs {
        if !["kind", "job", "types", "since", "recent", "ticket"].contains(&k.as_str()) {
            return Err(ApiError::BadParam(FieldError::new(
                k.clone(),
                "unknown parameter",
            )));
        }
    }
    let filter = EventFilter::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|(f, m)| ApiError::BadParam(FieldError::new(f, m)))?;
    let header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let since = pairs
        .iter()
        .find(|(k, _)| k == "since")
        .map(|(_, v)| v.clone())
        .or(header)
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::BadParam(FieldError::new("since", "must be an event id")))
        })
        .transpose()?;
    let recent = pairs
        .iter()
        .find(|(k, _)| k == "recent")
        .map(|(_, v)| match v.trim().parse::<i64>() {
            Ok(n) if (0..=1000).contains(&n) => Ok(n),
            _ => Err(ApiError::BadParam(FieldError::new(
                "recent",
                "must be 0 to 1000",
            ))),
        })
        .transpose()?;
    let start = match (since, recent) {
        (Some(s), _) => Start::Since(s),
        (None, Some(n)) => Start::Recent(n),
        (None, None) => Start::Live,
    };
    Ok((filter, start))
}

/// One client's position: the backfill still to read, then the live feed.
struct Feed {
    store: Arc<dyn EventStore>,
    filter: EventFilter,
    sub: Subscription,
    /// Backfill has read up to here (stops at `sub.from`).
    read_upto: i64,
    /// Last id sent: everything at or below it is skipped.
    last: i64,
    pending: VecDeque<Event>,
    shutdown: tokio_util::sync::CancellationToken,
}

/// Why a feed ended.
enum End {
    SlowClient,
    Shutdown,
}

impl Feed {
    fn new(s: &AppState, filter: EventFilter, start: Start) -> Result<Self, ApiError> {
        let sub = s.hub.subscribe(filter.clone()).ok_or_else(|| {
            ApiError::Unavailable("the event stream has not reached the database yet".into())
        })?;
        let start = match start {
            Start::Since(id) => id,
            Start::Recent(n) => (sub.from - n).max(0),
            Start::Live => sub.from,
        };
        Ok(Self {
            store: s.events.clone(),
            filter,
            read_upto: start.min(sub.from),
            last: start,
            sub,
            pending: VecDeque::new(),
            shutdown: s.shutdown.clone(),
        })
    }

    /// The next event, or why the feed ended.
    async fn next(&mut self) -> Result<Result<Event, End>, crate::store::StoreError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.last = e.id;
                return Ok(Ok(e));
            }
            if self.read_upto < self.sub.from {
                let page = self
                    .store
                    .events_between(self.read_upto, self.sub.from, 500)
                    .await?;
                self.read_upto = page.last().map_or(self.sub.from, |e| e.id);
                self.pending.extend(
                    page.into_iter()
                        .filter(|e| e.id > self.last && self.filter.matches(e)),
                );
                continue;
            }
            let next = tokio::select! {
                e = self.sub.rx.recv() => e,
                () = self.shutdown.cancelled() => return Ok(Err(End::Shutdown)),
            };
            match next {
                Some(e) if e.id > self.last => {
                    self.last = e.id;
                    return Ok(Ok((*e).clone()));
                }
                Some(_) => continue,
                None => return Ok(Err(End::SlowClient)),
            }
        }
    }
}

fn sse_frame(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.id.to_string())
        .event(e.event_type.clone())
        .data(e.to_json())
}

fn slow_message(last: i64) -> String {
    serde_json::json!({"error": "slow_client", "message": SLOW_CLIENT, "last_event_id": last})
        .to_string()
}

/// Job events as Server-Sent Events: `id:` is the event id, `event:` its
/// type, `data:` the JSON event. A client too slow to keep up gets an
/// `event: error` naming the last id it got, and the stream ends.
#[utoipa::path(get, path = "/v1/events", params(StreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "`text/event-stream` of job events", body = crate::model::event::Event, content_type = "text/event-stream"),
              (status = 400, description = "Bad filter", body = super::error::ErrorBody)))]
pub async fn sse(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let (mut filter, start) = parse_query(raw, &headers)?;
    filter.tenant = Some(who.tenant);
    let feed = Feed::new(&s, filter, start)?;
    let gauge = ClientGauge::new("sse");
    let stream = futures::stream::unfold(Some((feed, gauge)), |state| async move {
        let (mut feed, gauge) = state?;
        match feed.next().await {
            Ok(Ok(e)) => Some((Ok(sse_frame(&e)), Some((feed, gauge)))),
            Ok(Err(End::Shutdown)) => None,
            Ok(Err(End::SlowClient)) => {
                gauge.dropped("slow_client");
                let frame = SseEvent::default()
                    .event("error")
                    .data(slow_message(feed.last));
                Some((Ok(frame), None))
            }
            Err(e) => {
                tracing::warn!(error = %e, "Stream backfill failed; closing the stream.");
                let msg = serde_json::json!({"error": "unavailable", "last_event_id": feed.last});
                Some((
                    Ok(SseEvent::default().event("error").data(msg.to_string())),
                    None,
                ))
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The same events as JSON text frames over a WebSocket, with ping/pong
/// keepalive. A slow client is closed with code 1013 and a reason.
#[utoipa::path(get, path = "/v1/stream", params(StreamQuery), responses(
    (status = 101, description = "WebSocket of job events (JSON text frames)", body = crate::model::event::Event),
    (status = 400, description = "Bad filter, or not a WebSocket handshake (`websocket_required`)", body = super::error::ErrorBody),
    (status = 426, description = "The connection cannot be upgraded to a WebSocket (`websocket_required`)", body = super::error::ErrorBody)))]
pub async fn ws(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (mut filter, start) = parse_query(raw, &headers)?;
    filter.tenant = Some(who.tenant);
    // axum's own refusal is plain text; every answer of the API is JSON.
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return Ok(super::error::respond(
                e.status(),
                "websocket_required",
                &e.body_text(),
            ))
        }
    };
    let feed = Feed::new(&s, filter, start)?;
    Ok(upgrade
        .on_upgrade(move |socket| serve_ws(socket, feed))
        .into_response())
}

async fn serve_ws(socket: WebSocket, mut feed: Feed) {
    let gauge = ClientGauge::new("ws");
    let (mut sink, mut inbound) = socket.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    let mut awaiting_pong = false;
    let overflow = feed.sub.overflow.clone();
    let reason = loop {
        tokio::select! {
            biased;
            () = overflow.cancelled() => break Some(("slow_client", 1013)),
            msg = inbound.next() => match msg {
                Some(Ok(Message::Pong(_))) => awaiting_pong = false,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if awaiting_pong {
                    break Some(("keepalive", 1001));
                }
                awaiting_pong = true;
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            next = feed.next() => match next {
                Ok(Ok(e)) => {
                    // Not raced with the other branches, so an event taken
                    // from the feed is never dropped by a cancelled send; the
                    // overflow and a write timeout still end a stuck client.
                    let send = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(e.to_json().into())));
                    tokio::select! {
                        r = send => match r {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break None,
                            Err(_) => break Some(("slow_client", 1013)),
                        },
                        () = overflow.cancelled() => break Some(("slow_client", 1013)),
                    }
                }
                Ok(Err(End::SlowClient)) => break Some(("slow_client", 1013)),
                Ok(Err(End::Shutdown)) => break Some(("shutdown", 1001)),
                Err(e) => {
                    tracing::warn!(error = %e, "Stream backfill failed; closing the socket.");
                    break Some(("unavailable", 1011));
                }
            },
        }
    };
    if let Some((why, code)) = reason {
        gauge.dropped(why);
        // Close frame reasons are limited to 123 bytes: keep it short.
        let text = format!("{why}: resume with since={}", feed.last);
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: text.into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
    }
}
