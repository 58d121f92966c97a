//! A small DevTools-protocol client: one WebSocket to the browser, flat
//! sessions, commands pipelined (a job sends its page's setup commands
//! together instead of one round trip each), events routed to the session
//! they belong to.
//!
//! Why not a general-purpose CDP crate: those attach to and set up every
//! page they see (a dozen sequential round trips, lifecycle and isolated
//! worlds we never read), which was most of a warm job's time. Here a page
//! is set up only with what the loader reads.
//!
//! Pages are found by auto-attach: the browser session asks for every new
//! page to be attached (paused until told to run). Whoever creates a page
//! in a browser context says so first ([`Cdp::expect_page`]); the reader
//! task then opens that page's event channel before it reads the next
//! message, so no event sent on the page's session is missed. Pages nobody
//! expects (a page's popups, the browser's first tab) are let run and left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// One event: its method and parameters.
#[derive(Debug)]
pub struct Event {
    pub method: String,
    pub params: Value,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CdpError {
    /// The browser answered the command with an error.
    #[error("{method}: {message}")]
    Command { method: String, message: String },
    /// The socket is gone: the browser exited or crashed.
    #[error("the browser's devtools socket closed")]
    Closed,
    #[error("{0}")]
    Other(String),
}

type Reply = oneshot::Sender<Result<Value, CdpError>>;

/// A page attached for a job: its session and the events sent on it.
pub struct Attached {
    pub session: String,
    pub events: mpsc::UnboundedReceiver<Event>,
}

#[derive(Default)]
struct Routes {
    pending: HashMap<u64, (String, Reply)>,
    sessions: HashMap<String, mpsc::UnboundedSender<Event>>,
    /// Browser context id → who waits for the first page created in it.
    expected: HashMap<String, oneshot::Sender<Attached>>,
}

struct Shared {
    next_id: AtomicU64,
    /// The routing tables: a std mutex, held only to insert or take an
    /// entry, never across an await.
    routes: Mutex<Routes>,
    dead: AtomicBool,
    out: mpsc::UnboundedSender<Message>,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> oneshot::Receiver<Result<Value, CdpError>> {
        let (tx, rx) = oneshot::channel();
        if self.dead.load(Ordering::SeqCst) {
            let _ = tx.send(Err(CdpError::Closed));
            return rx;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        // Registered before it is sent: the answer cannot overtake it.
        self.routes().pending.insert(id, (method.to_owned(), tx));
        if self.out.send(Message::text(msg.to_string())).is_err() {
            if let Some((_, tx)) = self.routes().pending.remove(&id) {
                let _ = tx.send(Err(CdpError::Closed));
            }
        }
        rx
    }
}

/// The connection; cheap to clone.
#[derive(Clone)]
pub struct Cdp {
    shared: Arc<Shared>,
}

/// What keeps the connection running; dropping it closes the socket.
pub struct Driver {
    pub reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Cdp {
    pub async fn connect(url: &str) -> Result<(Self, Driver), CdpError> {
        // Without TCP_NODELAY a command written while the previous one is
        // still unacknowledged waits for the browser's delayed ACK (~40 ms
        // on Linux): most of a job's close phase, and some of its setup.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .map_err(|e| CdpError::Other(format!("connecting to {url}: {e}")))?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut queue) = mpsc::unbounded_channel::<Message>();
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            routes: Mutex::default(),
            dead: AtomicBool::new(false),
            out,
        });
        let writer = tokio::spawn(async move {
            while let Some(m) = queue.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let s = shared.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let text = match m {
                    Message::Text(t) => t,
                    Message::Close(_) => break,
                    _ => continue,
                };
                match serde_json::from_str::<Value>(text.as_str()) {
                    Ok(v) => dispatch(&s, v),
                    Err(e) => tracing::debug!(error = %e, "unreadable devtools message"),
                }
            }
            // Set before the pending commands fail, so a job that sees its
            // command fail also sees the browser dead (a crash, not a
            // page error).
            s.dead.store(true, Ordering::SeqCst);
            let mut routes = s.routes();
            for (_, (_, tx)) in routes.pending.drain() {
                let _ = tx.send(Err(CdpError::Closed));
            }
            routes.sessions.clear();
            routes.expected.clear();
        });
        let cdp = Self { shared };
        // Every new page attached, paused before its first request.
        cdp.call(
            None,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true}),
        )
        .await?;
        Ok((cdp, Driver { reader, writer }))
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Sends a command now; the answer is awaited separately, so several
    /// commands can be in flight at once.
    pub fn send(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> impl std::future::Future<Output = Result<Value, CdpError>> + Send + 'static {
        let rx = self.shared.send(session, method, params);
        async move { rx.await.unwrap_or(Err(CdpError::Closed)) }
    }

    pub async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, CdpError> {
        self.send(session, method, params).await
    }

    /// The first page created in `context` from now on is handed over,
    /// still paused, with every event sent on its session.
    pub fn expect_page(&self, context: &str) -> oneshot::Receiver<Attached> {
        let (tx, rx) = oneshot::channel();
        self.shared.routes().expected.insert(context.to_owned(), tx);
        rx
    }

    /// Stops routing a session's events (its page is closed).
    pub fn forget(&self, session: &str) {
        self.shared.routes().sessions.remove(session);
    }
}

fn dispatch(s: &Shared, v: Value) {
    if let Some(id) = v.get("id").and_then(Value::as_u64) {
        let Some((method, tx)) = s.routes().pending.remove(&id) else {
            return;
        };
        let answer = match v.get("error") {
            Some(e) => Err(CdpError::Command {
                method,
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_owned(),
            }),
            None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
        };
        let _ = tx.send(answer);
        return;
    }
    let Some(method) = v.get("method").and_then(Value::as_str) else {
        return;
    };
    let params = v.get("params").cloned().unwrap_or(Value::Null);
    let session = v.get("sessionId").and_then(Value::as_str);
    match (session, method) {
        (None, "Target.attachedToTarget") => attached(s, params),
        (None, "Target.detachedFromTarget") => {
            if let Some(id) = params.get("sessionId").and_then(Value::as_str) {
                s.routes().sessions.remove(id);
            }
        }
        (Some(session), _) => {
            let routes = s.routes();
            if let Some(tx) = routes.sessions.get(session) {
                let _ = tx.send(Event {
                    method: method.to_owned(),
                    params,
                });
            }
        }
        _ => {}
    }
}

/// A page was attached: handed to the job that created it, or, when nobody
/// expects it (a page's popup, the browser's first tab, a worker), let run
/// as it would without a debugger.
fn attached(s: &Shared, params: Value) {
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let Some(session) = str_of(&params, "sessionId") else {
        return;
    };
    let info = params.get("targetInfo").cloned().unwrap_or(Value::Null);
    let waiting = params
        .get("waitingForDebugger")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let is_page = str_of(&info, "type").as_deref() == Some("page");
    let context = str_of(&info, "browserContextId").unwrap_or_default();
    let mut routes = s.routes();
    if is_page {
        if let Some(tx) = routes.expected.remove(&context) {
            let (etx, events) = mpsc::unbounded_channel();
            routes.sessions.insert(session.clone(), etx);
            drop(routes);
            let _ = tx.send(Attached { session, events });
            return;
        }
    }
    drop(routes);
    if waiting {
        drop(s.send(Some(&session), "Runtime.runIfWaitingForDebugger", json!({})));
    }
    drop(s.send(
        None,
        "Target.detachFromTarget",
        json!({"sessionId": session}),
    ));
}
