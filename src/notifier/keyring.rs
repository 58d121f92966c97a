//! Webhook secrets at rest: the endpoints' (`webhooks.secret`) and the
//! jobs' own (`secret` inside `jobs.webhook`) are stored sealed with
//! AES-256-GCM under the webhook key, and opened only by the deliverer
//! when it signs. This module owns the key settings, the stored format and
//! the re-encryption pass ([`reseal_all`]) that `stevedore webhooks
//! rotate-key` runs.
//!
//! Stored format: `enc:v1:<key id>:<base64 of nonce ‖ ciphertext ‖ tag>`,
//! where the key id is 8 hex digits of SHA-256 over the key, so a reader
//! picks the right key (current or previous) without trying each. A value
//! without the `enc:v1:` prefix is a row written before encryption (or
//! without a key): it is read as plain text, and re-encrypted by the next
//! rotation pass. No migration rewrites them, because the migration runner
//! holds no key.
//!
//! Keys: `STEVEDORE_WEBHOOK_KEY` (or `_FILE`) is the current key, base64 of
//! 32 random bytes (`openssl rand -base64 32`); `STEVEDORE_WEBHOOK_KEY_PREVIOUS`
//! (or `_FILE`) is still accepted for reading during a rotation. Without a
//! current key, secrets are stored in plain text and a warning is logged at
//! start; `stevedore dev` instead keeps a generated key in
//! `<data dir>/webhook.key` ([`dev_key_file`]).

use std::path::{Path, PathBuf};

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::events::{EventStore, SecretOwner};
use crate::store::StoreResult;

const PREFIX: &str = "enc:v1:";
/// Binds a ciphertext to its purpose: a sealed webhook secret cannot be
/// passed off as some other value sealed under the same key.
const AAD: &[u8] = b"stevedore webhook secret v1";
const NONCE_LEN: usize = 12;

/// One AES-256 key and its id.
#[derive(Clone)]
struct Key {
    id: String,
    cipher: Aes256Gcm,
}

impl Key {
    fn parse(text: &str, setting: &str) -> anyhow::Result<Self> {
        let raw = STANDARD
            .decode(text.trim())
            .with_context(|| format!("{setting}: must be base64 of 32 random bytes"))?;
        if raw.len() != 32 {
            bail!(
                "{setting}: must be base64 of 32 random bytes (got {} bytes; \
                 make one with `openssl rand -base64 32`)",
                raw.len()
            );
        }
        let digest = Sha256::digest(&raw);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let cipher = Aes256Gcm::new_from_slice(&raw).context("AES-256 key")?;
        Ok(Self { id, cipher })
    }
}

/// Why a stored secret could not be opened.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpenError {
    #[error("sealed under key {0}, which is neither STEVEDORE_WEBHOOK_KEY nor STEVEDORE_WEBHOOK_KEY_PREVIOUS")]
    UnknownKey(String),
    #[error("sealed secret is damaged or was sealed under another key")]
    Damaged,
}

/// The current key (sealing and opening) and the previous one (opening).
#[derive(Clone, Default)]
pub struct Keyring {
    current: Option<Key>,
    previous: Option<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.as_ref().map(|k| &k.id))
            .field("previous", &self.previous.as_ref().map(|k| &k.id))
            .finish()
    }
}

/// A key given as a value or as a file, `name` being the value's setting.
fn read_setting(
    value: Option<&str>,
    file: Option<&Path>,
    name: &str,
) -> anyhow::Result<Option<Key>> {
    let file = file.filter(|p| !p.as_os_str().is_empty());
    match (value.filter(|v| !v.is_empty()), file) {
        (Some(_), Some(_)) => bail!("set {name} or {name}_FILE, not both"),
        (Some(v), None) => Key::parse(v, name).map(Some),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {name}_FILE {}", path.display()))?;
            Key::parse(&text, &format!("{name}_FILE")).map(Some)
        }
        (None, None) => Ok(None),
    }
}

impl Keyring {
    /// From the settings; a previous key without a current one is refused
    /// (it would leave new secrets unsealed in the middle of a rotation).
    pub fn from_settings(
        current: Option<&str>,
        current_file: Option<&Path>,
        previous: Option<&str>,
        previous_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let current = read_setting(current, current_file, "STEVEDORE_WEBHOOK_KEY")?;
        let previous = read_setting(previous, previous_file, "STEVEDORE_WEBHOOK_KEY_PREVIOUS")?;
        if current.is_none() && previous.is_some() {
            bail!("STEVEDORE_WEBHOOK_KEY_PREVIOUS is set but STEVEDORE_WEBHOOK_KEY is not");
        }
        Ok(Self { current, previous })
    }

    /// A keyring with one fresh random key (tests).
    pub fn random() -> Self {
        Self {
            current: Key::parse(&generate_key(), "random key").ok(),
            previous: None,
        }
    }

    /// Whether new secrets are sealed (false: stored in plain text).
    pub fn seals(&self) -> bool {
        self.current.is_some()
    }

    /// The id of the current key, if any.
    pub fn current_id(&self) -> Option<&str> {
        self.current.as_ref().map(|k| k.id.as_str())
    }

    /// The stored form of `secret`: sealed under the current key, or the
    /// plain text when no key is configured.
    pub fn seal(&self, secret: &str) -> String {
        let Some(key) = &self.current else {
            return secret.to_owned();
        };
        let mut nonce = [0u8; NONCE_LEN];
        // A fresh random 96-bit nonce per value: with at most a few million
        // secrets per key the chance of a repeat stays far below GCM's bound.
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: secret.as_bytes(),
            aad: AAD,
        };
        match key
            .cipher
            .encrypt(GenericArray::from_slice(&nonce), payload)
        {
            Ok(ct) => {
                let mut blob = nonce.to_vec();
                blob.extend_from_slice(&ct);
                format!("{PREFIX}{}:{}", key.id, STANDARD.encode(blob))
            }
            // Only on a message over GCM's 64 GiB limit: never for a secret.
            Err(_) => secret.to_owned(),
        }
    }

    /// The plain secret of a stored value (plain text rows pass as they are).
    pub fn open(&self, stored: &str) -> Result<String, OpenError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let (id, b64) = rest.split_once(':').ok_or(OpenError::Damaged)?;
        let key = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or_else(|| OpenError::UnknownKey(id.to_owned()))?;
        let blob = STANDARD.decode(b64).map_err(|_| OpenError::Damaged)?;
        if blob.len() < NONCE_LEN {
            return Err(OpenError::Damaged);
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let payload = Payload { msg: ct, aad: AAD };
        let plain = key
            .cipher
            .decrypt(GenericArray::from_slice(nonce), payload)
            .map_err(|_| OpenError::Damaged)?;
        String::from_utf8(plain).map_err(|_| OpenError::Damaged)
    }

    /// Whether a stored value is not yet sealed under the current key.
    pub fn needs_reseal(&self, stored: &str) -> bool {
        match &self.current {
            None => false,
            Some(k) => !stored.starts_with(&format!("{PREFIX}{}:", k.id)),
        }
    }
}

/// A new key as its setting's text (base64 of 32 random bytes).
pub fn generate_key() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    STANDARD.encode(key)
}

/// `stevedore dev`'s key: `<data_dir>/webhook.key`, created (mode 600) on
/// first use, so dev mode seals secrets with no setting at all. The file
/// sits beside the SQLite file it protects: it guards a copied database
/// file or backup, not a stolen data directory.
pub fn dev_key_file(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("webhook.key");
    if !path.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(&path) {
            Ok(mut f) => {
                use std::io::Write as _;
                writeln!(f, "{}", generate_key())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            // Another dev process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    Ok(path)
}

/// What a re-encryption pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ResealReport {
    /// Rewritten under the current key (plain or previous-key rows).
    pub resealed: u64,
    /// Already under the current key.
    pub current: u64,
    /// Sealed under a key this keyring does not hold, or damaged: left as
    /// they are, and their deliveries fail until the key is given back.
    pub unreadable: u64,
}

/// Re-encrypts every stored webhook secret (endpoints' and jobs') under the
/// current key, page by page. Each row is replaced only if it still holds
/// the value read, so a concurrent write is never overwritten; running it
/// twice is harmless.
pub async fn reseal_all(store: &dyn EventStore, keys: &Keyring) -> anyhow::Result<ResealReport> {
    if !keys.seals() {
        bail!("STEVEDORE_WEBHOOK_KEY (or STEVEDORE_WEBHOOK_KEY_FILE) must be set to re-encrypt");
    }
    let mut report = ResealReport::default();
    for owner in [SecretOwner::Webhook, SecretOwner::Job] {
        let mut after = uuid::Uuid::nil();
        loop {
            let page = store.stored_secrets(owner, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.0;
            for (id, stored) in &page {
                reseal_one(store, keys, owner, *id, stored, &mut report).await?;
            }
        }
    }
    Ok(report)
}

async fn reseal_one(
    store: &dyn EventStore,
    keys: &Keyring,
    owner: SecretOwner,
    id: uuid::Uuid,
    stored: &str,
    report: &mut ResealReport,
) -> StoreResult<()> {
    if !keys.needs_reseal(stored) {
        report.current += 1;
        return Ok(());
    }
    match keys.open(stored) {
        Ok(plain) => {
            if store
                .replace_secret(owner, id, stored, &keys.seal(&plain))
                .await?
            {
                report.resealed += 1;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, ?owner, %id, "A webhook secret cannot be opened; left as it is.");
            report.unreadable += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(current: &str, previous: Option<&str>) -> Keyring {
        Keyring::from_settings(Some(current), None, previous, None).expect("keys")
    }

    #[test]
    fn sealed_secrets_open_under_the_current_or_previous_key_only() {
        let (a, b) = (generate_key(), generate_key());
        let old = ring(&a, None);
        let sealed = old.seal("whsec_abc");
        assert!(sealed.starts_with("enc:v1:"), "{sealed}");
        assert!(!sealed.contains("whsec_abc"));
        assert_ne!(sealed, old.seal("whsec_abc"), "a fresh nonce each time");
        assert_eq!(old.open(&sealed).as_deref(), Ok("whsec_abc"));

        let rotating = ring(&b, Some(&a));
        assert_eq!(rotating.open(&sealed).as_deref(), Ok("whsec_abc"));
        assert!(rotating.needs_reseal(&sealed));
        assert!(!rotating.needs_reseal(&rotating.seal("x")));

        let new_only = ring(&b, None);
        assert!(matches!(
            new_only.open(&sealed),
            Err(OpenError::UnknownKey(_))
        ));
    }

    #[test]
    fn plain_rows_read_as_they_are_and_damage_is_caught() {
        let keys = ring(&generate_key(), None);
        assert_eq!(keys.open("whsec_legacy").as_deref(), Ok("whsec_legacy"));
        assert!(keys.needs_reseal("whsec_legacy"));
        let sealed = keys.seal("whsec_abc");
        let mut bad = sealed.clone().into_bytes();
        let n = bad.len() - 3;
        bad[n] = if bad[n] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).expect("ascii");
        assert_eq!(keys.open(&bad), Err(OpenError::Damaged));
        let none = Keyring::default();
        assert!(!none.seals() && !none.needs_reseal("whsec_x"));
        assert_eq!(none.seal("whsec_x"), "whsec_x", "no key: plain text");
    }

    #[test]
    fn key_settings_are_checked() {
        assert!(Keyring::from_settings(Some("c2hvcnQ="), None, None, None).is_err());
        let k = generate_key();
        assert!(Keyring::from_settings(None, None, Some(k.as_str()), None).is_err());
        let dir = tempfile::tempdir().expect("dir");
        let file = dev_key_file(dir.path()).expect("key file");
        let again = dev_key_file(dir.path()).expect("same file");
        assert_eq!(file, again);
        let a = Keyring::from_settings(None, Some(file.as_path()), None, None).expect("file key");
        let b = Keyring::from_settings(None, Some(again.as_path()), None, None).expect("file key");
        assert_eq!(a.current_id(), b.current_id(), "the file is kept");
        assert!(
            Keyring::from_settings(Some(k.as_str()), Some(file.as_path()), None, None).is_err()
        );
    }
}
