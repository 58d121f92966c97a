//! Who may do what: API keys, their scopes and tenants. A key is `sk_` and
//! 256 random bits (base64url); it is shown once when created and only its
//! HMAC-SHA256 under the deployment's auth secret is stored, so a copy of
//! the database does not hand out working keys and a leaked hash cannot be
//! replayed against another deployment. No I/O here: the stores keep the
//! records, `api::auth` checks requests.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::ToSchema;

/// What a key may do; each scope includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Get and list jobs, follow the stream, read stats and dead letters.
    Read,
    /// Also submit jobs and cancel its tenant's jobs.
    Submit,
    /// Also replay and purge dead letters, manage webhooks and keys.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Submit => "submit",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "submit" => Ok(Self::Submit),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown scope {other:?}: read, submit or admin")),
        }
    }
}

/// The tenant of a deployment that runs without keys (dev mode,
/// `--insecure-no-auth`), and of jobs submitted before keys existed.
pub const DEFAULT_TENANT: &str = "default";

/// Tenants are names people type: short, and safe in logs and URLs.
pub fn check_tenant(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("a tenant is 1 to 64 letters, digits, '-', '_' or '.'".into())
    }
}

/// A key's request rate: at most `limit` requests per `window_secs`,
/// written `100/s`, `6000/m` or `10000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Rate {
    pub limit: u32,
    pub window_secs: u32,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a rate like 100/s, 6000/m or 10000/h");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let limit: u32 = n.trim().parse().map_err(|_| bad())?;
        let window_secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        if limit == 0 {
            return Err(bad());
        }
        Ok(Self { limit, window_secs })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.window_secs {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.limit)
    }
}

/// Who is asking: the key's tenant and scope (`key_id` is `None` when the
/// deployment runs without keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Option<uuid::Uuid>,
    pub tenant: String,
    pub scope: Scope,
    /// The key's request rate, if it has one.
    pub rate: Option<Rate>,
    /// Its submits are refused while its tenant has this many jobs waiting.
    pub max_queued: Option<i64>,
}

impl Principal {
    /// Everything, in the default tenant: dev mode and `--insecure-no-auth`.
    pub fn open() -> Self {
        Self {
            key_id: None,
            tenant: DEFAULT_TENANT.to_owned(),
            scope: Scope::Admin,
            rate: None,
            max_queued: None,
        }
    }
}

/// The server-side secret keys are hashed under. Its value never appears
/// in `Debug` output or logs.
#[derive(Clone)]
pub struct AuthSecret(Vec<u8>);

impl fmt::Debug for AuthSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthSecret(..)")
    }
}

pub const KEY_PREFIX: &str = "sk_";
const MIN_SECRET_LEN: usize = 32;

impl AuthSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> anyhow::Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            bail!("the auth secret must be at least {MIN_SECRET_LEN} bytes (e.g. `openssl rand -hex 32`)");
        }
        Ok(Self(bytes))
    }

    /// From `STEVEDORE_AUTH_SECRET`, or the file `STEVEDORE_AUTH_SECRET_FILE`
    /// names (trailing newline ignored). `None` when neither is set.
    pub fn from_settings(value: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<Self>> {
        match (value.filter(|v| !v.is_empty()), file) {
            (Some(_), Some(_)) => {
                bail!("set STEVEDORE_AUTH_SECRET or STEVEDORE_AUTH_SECRET_FILE, not both")
            }
            (Some(v), None) => Self::new(v.as_bytes().to_vec())
                .context("STEVEDORE_AUTH_SECRET")
                .map(Some),
            (None, Some(path)) => {
                let raw = std::fs::read(path).with_context(|| {
                    format!("reading STEVEDORE_AUTH_SECRET_FILE {}", path.display())
                })?;
                let trimmed = raw.trim_ascii_end().to_vec();
                Self::new(trimmed)
                    .context("STEVEDORE_AUTH_SECRET_FILE")
                    .map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    /// The stored form of a key: hex HMAC-SHA256.
    pub fn hash(&self, key: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(key.as_bytes());
        hex(&mac.finalize().into_bytes())
    }
}

/// Compares secrets without an early exit, so the time taken does not say
/// how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// How long a stream ticket opens the stream: enough for a page to open
/// its WebSocket right after asking, too short to be worth stealing.
pub const TICKET_SECS: i64 = 30;
const TICKET_PREFIX: &str = "tk_";

impl AuthSecret {
    /// A stream ticket for the key with this stored hash, valid until
    /// `now + TICKET_SECS` (browsers cannot put a header on a WebSocket, so
    /// the page asks for one with its key and passes it as `?ticket=`).
    pub fn ticket(&self, key_hash: &str, now: i64) -> String {
        let body = format!("{key_hash}.{}", now + TICKET_SECS);
        format!("{TICKET_PREFIX}{body}.{}", self.sign_ticket(&body))
    }

    /// The key hash a ticket stands for, if it is ours and not expired.
    pub fn check_ticket(&self, ticket: &str, now: i64) -> Option<String> {
        let rest = ticket.strip_prefix(TICKET_PREFIX)?;
        let (body, mac) = rest.rsplit_once('.')?;
        let (hash, until) = body.split_once('.')?;
        let until: i64 = until.parse().ok()?;
        let same = constant_time_eq(self.sign_ticket(body).as_bytes(), mac.as_bytes());
        (same && now <= until).then(|| hash.to_owned())
    }

    fn sign_ticket(&self, body: &str) -> String {
        // A separate domain from key hashes: a ticket's MAC can never pass
        // as a key's hash or the other way round.
        self.hash(&format!("stream-ticket\n{body}"))
    }
}

/// A new key: the text to show once, and what to store.
pub struct GeneratedKey {
    pub key: String,
    pub hash: String,
    /// The first characters, stored so people can tell keys apart in a list.
    pub prefix: String,
}

pub fn generate(secret: &AuthSecret) -> GeneratedKey {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    GeneratedKey {
        hash: secret.hash(&key),
        prefix: key[..KEY_PREFIX.len() + 6].to_owned(),
        key,
    }
}

/// The bearer token of an `Authorization` header value, if it looks like a
/// key at all (anything else is refused without a lookup).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(KEY_PREFIX) && token.len() <= 128)
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> AuthSecret {
        AuthSecret::new(vec![7u8; 32]).expect("test setup")
    }

    #[test]
    fn keys_are_long_random_and_only_their_hash_is_kept() {
        let s = secret();
        let a = generate(&s);
        let b = generate(&s);
        assert!(a.key.starts_with("sk_"));
        // 256 bits in unpadded base64url is 43 characters.
        assert_eq!(a.key.len(), 3 + 43);
        assert_ne!(a.key, b.key);
        assert_eq!(a.hash, s.hash(&a.key));
        assert!(!a.hash.contains(&a.key[3..]));
        assert!(a.key.starts_with(&a.prefix));
        let other = AuthSecret::new(vec![8u8; 32]).expect("test setup");
        assert_ne!(other.hash(&a.key), a.hash, "the hash depends on the secret");
    }

    #[test]
    fn short_secrets_and_both_settings_are_refused() {
        assert!(AuthSecret::new(b"short".to_vec()).is_err());
        assert!(AuthSecret::from_settings(Some("x"), Some(Path::new("/nope"))).is_err());
        assert!(AuthSecret::from_settings(None, None)
            .expect("test setup")
            .is_none());
        assert!(AuthSecret::from_settings(Some(""), None)
            .expect("test setup")
            .is_none());
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("secret");
        std::fs::write(&f, format!("{}\n", "a".repeat(40))).expect("test setup");
        let s = AuthSecret::from_settings(None, Some(&f))
            .expect("read")
            .expect("set");
        assert_eq!(
            s.hash("k"),
            AuthSecret::new("a".repeat(40))
                .expect("test setup")
                .hash("k")
        );
    }

    #[test]
    fn scopes_include_the_ones_before_them() {
        assert!(Scope::Admin > Scope::Submit && Scope::Submit > Scope::Read);
        assert_eq!("submit".parse::<Scope>(), Ok(Scope::Submit));
        assert!("root".parse::<Scope>().is_err());
    }

    #[test]
    fn only_bearer_keys_are_looked_up() {
        assert_eq!(bearer("Bearer sk_abc"), Some("sk_abc"));
        assert_eq!(bearer("bearer  sk_abc "), Some("sk_abc"));
        assert_eq!(bearer("Basic sk_abc"), None);
        assert_eq!(bearer("Bearer abc"), None);
        assert_eq!(bearer(&format!("Bearer sk_{}", "a".repeat(200))), None);
    }

    #[test]
    fn tickets_open_the_stream_briefly_and_cannot_be_forged() {
        let s = secret();
        let t = s.ticket("abc", 1_000);
        assert_eq!(s.check_ticket(&t, 1_000).as_deref(), Some("abc"));
        assert_eq!(
            s.check_ticket(&t, 1_000 + TICKET_SECS).as_deref(),
            Some("abc")
        );
        assert_eq!(s.check_ticket(&t, 1_001 + TICKET_SECS), None, "expired");
        let longer = t.replace(&format!(".{}.", 1_000 + TICKET_SECS), ".99999999999.");
        assert_eq!(s.check_ticket(&longer, 1_000), None, "its expiry is signed");
        let other = AuthSecret::new(vec![9u8; 32]).expect("test setup");
        assert_eq!(other.check_ticket(&t, 1_000), None, "another deployment's");
        assert_eq!(s.check_ticket("tk_abc.2000", 1_000), None);
        assert_eq!(s.check_ticket("sk_whatever", 1_000), None);
    }

    #[test]
    fn rates_read_as_people_write_them() {
        assert_eq!(
            "100/s".parse(),
            Ok(Rate {
                limit: 100,
                window_secs: 1
            })
        );
        assert_eq!(
            "6000/m".parse(),
            Ok(Rate {
                limit: 6000,
                window_secs: 60
            })
        );
        assert_eq!(
            "5/h".parse::<Rate>().map(|r| r.to_string()),
            Ok("5/h".into())
        );
        for bad in ["0/s", "100", "100/d", "x/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tenants_are_plain_names() {
        assert!(check_tenant("acme-01.eu").is_ok());
        assert!(check_tenant("").is_err());
        assert!(check_tenant("a b").is_err());
        assert!(check_tenant(&"x".repeat(65)).is_err());
    }
}
