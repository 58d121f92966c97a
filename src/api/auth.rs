//! The API's gate, in front of every route: who is asking (`Authorization:
//! Bearer sk_...`, looked up by its keyed hash), whether the route allows
//! that scope, and the browser rules that hold with or without keys
//! (JSON-only POST and DELETE, an `Origin` allowlist on the streams, and
//! security headers on every response).
//!
//! Which scope a route needs is [`required`]: one table, so a new route
//! cannot be left open by forgetting a layer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::limits::RateCheck;
use super::AppState;
use crate::auth::{bearer, constant_time_eq, AuthSecret, Principal, Rate, Scope};
use crate::store::keys::KeyStore;

/// A looked-up key is trusted this long: a revoked key stops working on
/// every API process within it.
const CACHE_TTL: Duration = Duration::from_secs(2);
/// Past this many cached lookups the cache starts over (bounds memory
/// against a flood of made-up keys).
const CACHE_MAX: usize = 10_000;

/// How requests are let in.
#[derive(Clone)]
pub enum Access {
    /// Everyone may do everything in the default tenant: dev mode (loopback
    /// only) and `--insecure-no-auth`.
    Open,
    Keys(Arc<KeyGate>),
}

impl Access {
    pub fn keys(store: Arc<dyn KeyStore>, secret: AuthSecret) -> Self {
        Self::with_rates(store, secret, None)
    }

    /// Keys whose request rates are counted in Redis (`stevedore api`).
    pub fn with_rates(
        store: Arc<dyn KeyStore>,
        secret: AuthSecret,
        rates: Option<super::limits::KeyRates>,
    ) -> Self {
        Self::Keys(Arc::new(KeyGate {
            store,
            secret,
            cache: Mutex::default(),
            rates,
        }))
    }
}

type Cache = HashMap<String, (Option<Principal>, Instant)>;

pub struct KeyGate {
    store: Arc<dyn KeyStore>,
    secret: AuthSecret,
    cache: Mutex<Cache>,
    rates: Option<super::limits::KeyRates>,
}

impl KeyGate {
    async fn principal(&self, key: &str) -> Result<Option<Principal>, super::ApiError> {
        self.by_hash(self.secret.hash(key)).await
    }

    /// The live key behind a stream ticket.
    async fn by_ticket(&self, ticket: &str) -> Result<Option<Principal>, super::ApiError> {
        match self
            .secret
            .check_ticket(ticket, chrono::Utc::now().timestamp())
        {
            Some(hash) => self.by_hash(hash).await,
            None => Ok(None),
        }
    }

    async fn by_hash(&self, hash: String) -> Result<Option<Principal>, super::ApiError> {
        if let Some((p, at)) = self.lock().get(&hash) {
            if at.elapsed() < CACHE_TTL {
                return Ok(p.clone());
            }
        }
        let found = self.store.key_by_hash(&hash).await?.map(|k| Principal {
            key_id: Some(k.id),
            tenant: k.tenant,
            scope: k.scope,
            rate: k.rate,
            max_queued: k.max_queued,
        });
        let mut cache = self.lock();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(hash, (found.clone(), Instant::now()));
        Ok(found)
    }

    /// Counts this request against the key's rate, if it has one.
    async fn count(&self, p: &Principal) -> Option<(Rate, RateCheck)> {
        let (rates, id, rate) = (self.rates.as_ref()?, p.key_id?, p.rate?);
        match rates.hit(id, rate).await {
            Ok(check) => Some((rate, check)),
            // Counting needs Redis; rather than refuse every keyed request
            // while it is away, the limit lapses and says so.
            Err(e) => {
                tracing::warn!(error = %e, "Rate limit not counted: Redis unreachable.");
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a plain map behind.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The scope a route needs, by method and route template; `None` for the
/// routes anyone may call (health, the pages and their assets, the OpenAPI
/// document; `/metrics` has its own token).
pub fn required(method: &Method, route: &str) -> Option<Scope> {
    if !route.starts_with("/v1/") {
        return None;
    }
    // Asking for a stream ticket is how a read key opens the stream.
    let reading = method == Method::GET || method == Method::HEAD || route == "/v1/stream-tickets";
    let admin = route.starts_with("/v1/webhook")
        || route.starts_with("/v1/keys")
        || route.starts_with("/v1/pools")
        || route.starts_with("/v1/concurrency-limits")
        || (route.starts_with("/v1/dead-letters") && !reading);
    Some(if admin {
        Scope::Admin
    } else if reading {
        Scope::Read
    } else {
        Scope::Submit
    })
}

fn refuse(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut r = super::error::respond(status, code, message);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Browsers send `Origin` on WebSocket handshakes and cross-site requests;
/// clients that are not browsers send none and are judged by their key.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let same = origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host);
    same || allowed.iter().any(|a| a == origin)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// A stream route: the one place a `?ticket=` stands in for the key, the
/// `Origin` rule applies, and (in `limits`) no deadline does.
pub(super) fn is_stream(route: &str) -> bool {
    route == "/v1/stream" || route == "/v1/events"
}

fn ticket_param(req: &Request) -> Option<String> {
    let q = req.uri().query()?;
    let url = reqwest::Url::parse(&format!("http://q/?{q}")).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned())
}

/// The gate itself (a route layer, so the matched route is known).
pub async fn gate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let method = req.method().clone();
    let Some(scope) = required(&method, &route) else {
        return next.run(req).await;
    };
    // A form on any web page can POST to a local API; it cannot send JSON
    // without a CORS preflight this API never grants.
    if (method == Method::POST || method == Method::PUT || method == Method::DELETE)
        && !is_json(req.headers())
    {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        );
    }
    if is_stream(&route) && !origin_allowed(req.headers(), &s.allowed_origins) {
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this page's origin may not open the stream (see STEVEDORE_ALLOWED_ORIGINS)",
        );
    }
    let principal = match &s.access {
        Access::Open => Principal::open(),
        Access::Keys(gate) => {
            let key = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            let found = match (key, is_stream(&route).then(|| ticket_param(&req)).flatten()) {
                (Some(key), _) => gate.principal(key).await,
                (None, Some(ticket)) => gate.by_ticket(&ticket).await,
                (None, None) => {
                    return refuse(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "send Authorization: Bearer <API key> (see `stevedore keys create`)",
                    )
                }
            };
            match found {
                Ok(Some(p)) => p,
                Ok(None) => {
                    return refuse(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "this API key (or stream ticket) is not valid, expired or was revoked",
                    )
                }
                Err(e) => return e.into_response(),
            }
        }
    };
    if principal.scope < scope {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "this key's scope is {}; this route needs {scope}",
                principal.scope
            ),
        );
    }
    let limited = match &s.access {
        Access::Keys(gate) => gate.count(&principal).await,
        Access::Open => None,
    };
    if let Some((rate, check)) = &limited {
        if !check.allowed {
            let mut r = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!("this key may make {rate} requests; retry after the Retry-After seconds"),
            );
            super::limits::rate_headers(&mut r, *rate, check);
            return r;
        }
    }
    req.extensions_mut().insert(principal);
    let mut r = next.run(req).await;
    if let Some((rate, check)) = &limited {
        super::limits::rate_headers(&mut r, *rate, check);
    }
    r
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct StreamTicket {
    /// Pass as `?ticket=` to `/v1/stream` or `/v1/events`; `null` when the
    /// API runs without keys (the streams then need none).
    pub ticket: Option<String>,
    pub expires_in: i64,
}

/// A short-lived ticket that opens the event stream for the asking key
/// (browsers cannot send `Authorization` on a WebSocket).
#[utoipa::path(post, path = "/v1/stream-tickets", security(("api_key" = [])), responses(
    (status = 200, body = StreamTicket),
    (status = 401, body = super::error::ErrorBody),
    (status = 415, body = super::error::ErrorBody)))]
pub async fn stream_ticket(State(s): State<AppState>, req: Request) -> Json<StreamTicket> {
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match (&s.access, key) {
        (Access::Keys(gate), Some(key)) => Json(StreamTicket {
            ticket: Some(
                gate.secret
                    .ticket(&gate.secret.hash(key), chrono::Utc::now().timestamp()),
            ),
            expires_in: crate::auth::TICKET_SECS,
        }),
        _ => Json(StreamTicket {
            ticket: None,
            expires_in: 0,
        }),
    }
}

/// `/metrics` with `STEVEDORE_METRICS_TOKEN` set needs that bearer token:
/// the refusal when it is missing or wrong.
pub fn metrics_refusal(s: &AppState, headers: &HeaderMap) -> Option<Response> {
    let want = s.metrics_token.as_ref()?;
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    (!constant_time_eq(got.as_bytes(), want.as_bytes())).then(|| {
        refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <STEVEDORE_METRICS_TOKEN>",
        )
    })
}

/// Headers every response carries: the pages load only their own scripts
/// and styles and cannot be framed; nothing is sniffed or leaks a referrer.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_v1_route_needs_a_scope_and_the_right_one() {
        use Method as M;
        assert_eq!(required(&M::GET, "/v1/jobs/{id}"), Some(Scope::Read));
        assert_eq!(required(&M::GET, "/v1/stream"), Some(Scope::Read));
        assert_eq!(required(&M::GET, "/v1/dead-letters"), Some(Scope::Read));
        assert_eq!(required(&M::POST, "/v1/jobs"), Some(Scope::Submit));
        assert_eq!(
            required(&M::POST, "/v1/jobs/{id}/cancel"),
            Some(Scope::Submit)
        );
        assert_eq!(
            required(&M::POST, "/v1/dead-letters/{id}/replay"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required(&M::DELETE, "/v1/dead-letters/{id}"),
            Some(Scope::Admin)
        );
        assert_eq!(required(&M::GET, "/v1/webhooks"), Some(Scope::Admin));
        assert_eq!(
            required(&M::GET, "/v1/webhook-deliveries"),
            Some(Scope::Admin)
        );
        assert_eq!(required(&M::POST, "/v1/stream-tickets"), Some(Scope::Read));
        assert_eq!(required(&M::GET, "/healthz"), None);
        assert_eq!(required(&M::GET, "/"), None);
    }

    #[test]
    fn streams_take_their_own_origin_and_listed_ones() {
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&h, &[]), "no Origin: not a browser");
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(origin_allowed(&h, &[]));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(&h, &[]));
        assert!(origin_allowed(&h, &["https://evil.example".to_owned()]));
    }

    #[test]
    fn json_means_the_media_type_not_a_substring() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; x=application/json"),
        );
        assert!(!is_json(&h));
    }
}
