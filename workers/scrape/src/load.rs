//! Plain HTTP page loading through the SSRF guard: every hop is checked,
//! the connection goes to the address the guard checked (no second DNS
//! lookup, so rebinding fails), redirects are followed by hand and checked
//! again, the body is capped while it streams, and its charset decoded.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use reqwest::redirect::Policy;
use stevedore_netguard::{GuardError, UrlGuard};

const MAX_REDIRECTS: usize = 5;
/// A site's Retry-After is a hint, not an order: one asking for a week must
/// not park a job (and its slot in the queue) for a week.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub timeout: Duration,
    pub max_bytes: usize,
}

#[derive(Debug)]
pub struct Page {
    pub final_url: String,
    pub html: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("refused by the SSRF guard: {0}")]
    Refused(GuardError),
    #[error("cannot resolve the host: {0}")]
    Unresolvable(GuardError),
    #[error("HTTP {status} from {url}")]
    Status {
        status: u16,
        url: String,
        retry_after: Option<Duration>,
    },
    #[error("{message}")]
    Transport { message: String, retryable: bool },
    #[error("page larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

impl From<GuardError> for LoadError {
    /// A name that does not resolve may resolve later; anything else the
    /// guard says is a refusal.
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::Unresolvable(_) => LoadError::Unresolvable(e),
            other => LoadError::Refused(other),
        }
    }
}

fn transport(e: reqwest::Error) -> LoadError {
    LoadError::Transport {
        retryable: e.is_timeout() || e.is_connect() || e.is_request() || e.is_body(),
        message: format!("loading failed: {e}"),
    }
}

pub async fn load(guard: &dyn UrlGuard, url: &str, cfg: &LoadConfig) -> Result<Page, LoadError> {
    let mut current = url.to_owned();
    for _ in 0..=MAX_REDIRECTS {
        let allowed = guard.check(&current).await.map_err(LoadError::from)?;
        // A client per hop, pinned to the checked address: reqwest never
        // resolves the name itself, so a DNS answer that changes between
        // the check and the connect cannot redirect the request inside.
        let client = reqwest::Client::builder()
            // An HTTP_PROXY in the environment would re-resolve the name
            // at the proxy, past the pin.
            .no_proxy()
            .redirect(Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .resolve(&allowed.host, allowed.addr)
            .build()
            .map_err(transport)?;
        let resp = client
            .get(allowed.url.clone())
            .header(USER_AGENT, "stevedore-scrape/0.1")
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| LoadError::Transport {
                    message: format!("redirect {status} without a Location"),
                    retryable: false,
                })?;
            current = allowed
                .url
                .join(location)
                .map_err(|e| LoadError::Transport {
                    message: format!("bad redirect target {location:?}: {e}"),
                    retryable: false,
                })?
                .to_string();
            continue;
        }
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            return Err(LoadError::Status {
                status: status.as_u16(),
                url: current,
                retry_after,
            });
        }
        if resp
            .content_length()
            .is_some_and(|n| n > cfg.max_bytes as u64)
        {
            return Err(LoadError::TooLarge(cfg.max_bytes));
        }
        let charset = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| {
                ct.split(';')
                    .find_map(|p| p.trim().strip_prefix("charset="))
            })
            .map(|c| c.trim_matches('"').to_owned());
        let mut resp = resp;
        let mut body = Vec::new();
        // Stop reading at the cap: a server that lies about (or omits) its
        // length cannot make the worker buffer more than that.
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > cfg.max_bytes {
                return Err(LoadError::TooLarge(cfg.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(Page {
            final_url: current,
            html: decode(&body, charset.as_deref()),
        });
    }
    Err(LoadError::TooManyRedirects)
}

/// Retry-After in seconds, clamped to [`MAX_RETRY_AFTER`]; anything else
/// (a date, garbage) leaves the retry to the usual backoff.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs = value.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Decodes with the header's charset, else a `<meta charset>` in the first
/// KiB, else UTF-8 (invalid bytes replaced).
pub fn decode(body: &[u8], header_charset: Option<&str>) -> String {
    let sniffed = || {
        let head = String::from_utf8_lossy(&body[..body.len().min(1024)]).to_ascii_lowercase();
        let at = head.find("charset=")?;
        let rest = head[at + 8..].trim_start_matches(['"', '\'']);
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))?;
        Some(rest[..end].to_owned())
    };
    let label = header_charset.map(str::to_owned).or_else(sniffed);
    let encoding = label
        .and_then(|l| encoding_rs::Encoding::for_label(l.as_bytes()))
        .unwrap_or(encoding_rs::UTF_8);
    encoding.decode(body).0.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_by_header_then_meta_then_utf8() {
        let latin1 = b"<p>caf\xe9</p>";
        assert_eq!(decode(latin1, Some("iso-8859-1")), "<p>caf\u{e9}</p>");
        let meta = b"<meta charset=\"windows-1252\"><p>\x93q\x94</p>";
        assert!(decode(meta, None).contains("\u{201c}q\u{201d}"));
        assert_eq!(decode("h\u{e9}".as_bytes(), None), "h\u{e9}");
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("604800"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after(&u64::MAX.to_string()),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
    }
}
