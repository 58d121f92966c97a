//! Standard Webhooks signing: secrets are `whsec_` + base64 of the key; a
//! delivery carries `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
//!
//! A job's own webhook without a secret is signed with its tenant's secret
//! ([`Secret::for_tenant`]), derived from the deployment's
//! `STEVEDORE_WEBHOOK_SECRET`: the deployment secret itself never signs a
//! URL a caller names, and one tenant's signatures do not verify under
//! another tenant's secret.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";

/// A signing key that parsed as `whsec_<base64>` of 24 to 64 bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn parse(s: &str) -> Result<Self, String> {
        let b64 = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("must start with {PREFIX}"))?;
        let key = STANDARD
            .decode(b64)
            .map_err(|_| format!("must be {PREFIX} followed by base64"))?;
        if !(24..=64).contains(&key.len()) {
            return Err("the key must be 24 to 64 bytes".into());
        }
        Ok(Self(key))
    }

    /// A fresh random secret, as its `whsec_` text.
    pub fn generate() -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!("{PREFIX}{}", STANDARD.encode(key))
    }

    /// The tenant's signing secret: HMAC-SHA256 of the tenant's name under
    /// this (deployment) secret, so it is stable, needs no storage, and
    /// reveals nothing of the deployment secret or of another tenant's.
    pub fn for_tenant(&self, tenant: &str) -> Self {
        // HMAC accepts keys of any length; this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return Self(Vec::new());
        };
        mac.update(b"stevedore tenant webhook secret v1\0");
        mac.update(tenant.as_bytes());
        Self(mac.finalize().into_bytes().to_vec())
    }

    /// The `whsec_` text of this secret (to hand to a receiver).
    pub fn to_text(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// The `webhook-signature` header value.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &str) -> String {
        // HMAC accepts keys of any length; this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
        mac.update(body.as_bytes());
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specification_example() {
        // The example of the Standard Webhooks reference implementations.
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let sig = s.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(Secret::parse("nope").is_err());
        assert!(Secret::parse(&Secret::generate()).is_ok());
    }

    #[test]
    fn tenant_secrets_differ_per_tenant_and_from_the_root() {
        let root = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let (a, b) = (root.for_tenant("a"), root.for_tenant("b"));
        let sig = |s: &Secret| s.sign("msg_1", 1, "{}");
        assert_ne!(sig(&a), sig(&b));
        assert_ne!(sig(&a), sig(&root));
        assert_eq!(sig(&a), sig(&root.for_tenant("a")), "stable");
        let text = a.to_text();
        assert_eq!(sig(&Secret::parse(&text).expect("whsec_")), sig(&a));
    }
}
