//! What a webhook URL shows and which host it counts against: user-info
//! (`https://user:pass@host/`) is a credential, so every listing (API,
//! CLI) and log shows it as `***`; deliveries are limited per receiving
//! host, so two URLs on one host share one limit.

use std::borrow::Cow;

/// The URL with any user-info replaced by `***`
/// (`https://user:pass@host/x` → `https://***@host/x`). Works on the text
/// itself, so a URL that does not parse is redacted too, and one without
/// user-info comes back unchanged.
pub fn redact(url: &str) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://") else {
        return Cow::Borrowed(url);
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last `@` of the authority ends the user-info (a password may hold
    // an unescaped `@`).
    match rest[..authority_len].rfind('@') {
        Some(at) => Cow::Owned(format!("{}***{}", &url[..start], &rest[at..])),
        None => Cow::Borrowed(url),
    }
}

/// For `#[serde(serialize_with)]` on a URL field that is shown.
pub fn serialize_redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact(url))
}

/// The host a delivery counts against: the URL's host, lower case, without
/// port or user-info; the whole URL when it has no host to take.
pub fn host_key(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match u.host_str() {
            Some(h) => h.to_ascii_lowercase(),
            None => url.to_owned(),
        },
        Err(_) => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_redacted_and_nothing_else_changes() {
        assert_eq!(
            redact("https://user:pa@ss@hooks.example:8443/x?y=1#z"),
            "https://***@hooks.example:8443/x?y=1#z"
        );
        assert_eq!(redact("http://token@h/"), "http://***@h/");
        assert_eq!(redact("https://h.example/a@b"), "https://h.example/a@b");
        assert_eq!(redact("https://h.example?q=a@b"), "https://h.example?q=a@b");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn urls_on_one_host_share_a_key() {
        assert_eq!(host_key("http://127.0.0.1:9000/a"), "127.0.0.1");
        assert_eq!(host_key("http://u:p@127.0.0.1:9001/b"), "127.0.0.1");
        assert_eq!(host_key("https://Hooks.Example/x"), "hooks.example");
        assert_eq!(host_key("http://[::1]:80/"), "[::1]");
        assert_ne!(
            host_key("https://a.example/"),
            host_key("https://b.example/")
        );
    }
}
