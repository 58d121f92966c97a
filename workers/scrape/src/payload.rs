//! The scrape payload and result.

use serde::{Deserialize, Serialize};
use stevedore_handler::{FieldError, Payload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Render {
    /// HTTP first; a browser only when HTTP finds no questions.
    #[default]
    Auto,
    Http,
    Browser,
}

/// CSS selectors for pages the built-in extractors do not understand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selectors {
    /// One element per question.
    pub question: String,
    /// The question's text, inside `question`.
    pub text: String,
    /// Each option, inside `question`.
    pub option: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapePayload {
    pub url: String,
    #[serde(default)]
    pub render: Render,
    pub wait_for: Option<String>,
    pub wait_ms: Option<u64>,
    /// In the browser, also load images, media, fonts and stylesheets
    /// (for a page whose script needs them to build its quiz); by default
    /// they are refused, as extraction reads only the DOM.
    #[serde(default)]
    pub full_render: bool,
    pub selectors: Option<Selectors>,
    /// A job to submit with the extracted questions when the scrape
    /// succeeds, e.g. `{"kind": "analyze"}` (other fields are passed on).
    pub then: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Payload for ScrapePayload {
    fn validate(&self) -> Result<(), FieldError> {
        let url = stevedore_netguard::Url::parse(&self.url)
            .map_err(|e| FieldError::new("url", format!("not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FieldError::new(
                "url",
                "only http and https URLs can be scraped",
            ));
        }
        if self.wait_ms.is_some_and(|w| w > 30_000) {
            return Err(FieldError::new("wait_ms", "must be at most 30000"));
        }
        if let Some(s) = &self.selectors {
            for (field, sel) in [
                ("question", &s.question),
                ("text", &s.text),
                ("option", &s.option),
            ] {
                scraper::Selector::parse(sel).map_err(|e| {
                    FieldError::new(
                        format!("selectors.{field}"),
                        format!("not a CSS selector: {e}"),
                    )
                })?;
            }
        }
        if let Some(then) = &self.then {
            match then.get("kind").and_then(|k| k.as_str()) {
                Some(_) => {}
                None => return Err(FieldError::new("then.kind", "a chained job needs a kind")),
            }
            if then.contains_key("questions") {
                return Err(FieldError::new(
                    "then.questions",
                    "filled in from the scrape",
                ));
            }
        }
        Ok(())
    }
}

/// One extracted question. `correct` only when the page itself says which
/// option is right (schema.org `acceptedAnswer`); never guessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub text: String,
    pub options: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correct: Option<usize>,
    /// How it was found: `json-ld`, `selectors`, or the option kind and
    /// what tied the text to it, e.g. `radio+legend`. Left out of the
    /// question as passed on (the analyze payload has no such field); the
    /// result's `method` sums it up.
    #[serde(skip)]
    pub method: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScrapeOutput {
    pub url: String,
    pub final_url: String,
    pub title: String,
    pub rendered_with: &'static str,
    pub questions: Vec<Question>,
    /// How the questions were found, e.g. `radio+legend, select+label`.
    pub method: String,
    /// Where the extractor guessed (an option without a label, options
    /// without a question that were left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `host:` and the URL's registrable domain (`www.bbc.co.uk` →
/// `host:bbc.co.uk`), or its host itself when it has none (an IP address,
/// `localhost`): the concurrency key of a scrape job.
pub fn site_key(url: &str) -> Option<String> {
    let url = stevedore_netguard::Url::parse(url).ok()?;
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    let site = match url.domain() {
        Some(_) => psl::domain_str(&host).map_or(host.clone(), str::to_owned),
        None => host,
    };
    Some(format!("host:{site}"))
}

#[cfg(test)]
mod tests {
    use super::site_key;

    #[test]
    fn a_site_is_its_registrable_domain() {
        for (url, key) in [
            ("https://www.bbc.co.uk/quiz", "host:bbc.co.uk"),
            ("https://quiz.Example.COM./a", "host:example.com"),
            ("https://example.com:8443/", "host:example.com"),
            ("http://127.0.0.1:8080/q", "host:127.0.0.1"),
            ("http://[::1]:8080/q", "host:[::1]"),
            ("http://localhost/q", "host:localhost"),
        ] {
            assert_eq!(site_key(url).as_deref(), Some(key), "{url}");
        }
        assert_eq!(site_key("not a url"), None);
    }
}
