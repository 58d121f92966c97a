//! The OpenAPI document served at `/openapi.json`. Its paths come from the
//! same `routes!` registrations that build the router (see
//! [`super::documented`]), so a route cannot exist undocumented; this
//! module adds what every route shares: the document's head, the bearer
//! scheme, and the answers the layers in front of the handlers give (the
//! key gate, the JSON-only rule, body parsing, load shedding), so each
//! handler's annotation lists only the answers of its own.

use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, Response};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stevedore",
        description = "Submit jobs, follow them, schedule them, manage dead letters and webhooks. \
            Every error is `{\"error\": {\"code\", \"message\", \"field\"?}}`; `field` names the \
            offending body field or parameter."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerKeys),
    security(("api_key" = []))
)]
struct Head;

/// Every `/v1` route takes `Authorization: Bearer sk_...` (see
/// `api::auth::required` for the scope each needs); `/metrics` takes its
/// own token.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An API key from `stevedore keys create`; its scope (read, submit, admin) decides the routes it may call."
                .into(),
        );
        components.add_security_scheme("api_key", SecurityScheme::Http(scheme));
        let mut metrics = Http::new(HttpAuthScheme::Bearer);
        metrics.description =
            Some("`STEVEDORE_METRICS_TOKEN`, when the API is started with one.".into());
        components.add_security_scheme("metrics_token", SecurityScheme::Http(metrics));
    }
}

/// The document's head: title, schemes and the error body, without paths.
pub fn head() -> utoipa::openapi::OpenApi {
    Head::openapi()
}

/// Completes the document the router's registrations built: the answers
/// every route shares, and no key asked of the routes outside `/v1`.
pub fn finish(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in operations(item) {
            shared_answers(path, method, op);
        }
    }
    doc
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("get", item.get.as_mut()),
        ("put", item.put.as_mut()),
        ("post", item.post.as_mut()),
        ("delete", item.delete.as_mut()),
        ("patch", item.patch.as_mut()),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.map(|op| (m, op)))
}

fn error(description: &str) -> Response {
    let mut r = Response::new(description);
    r.content.insert(
        "application/json".into(),
        Content::new(Some(Ref::from_schema_name("ErrorBody"))).into(),
    );
    r
}

/// Adds an answer unless the handler documented that status itself (its
/// description is the more precise one).
fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| error(description).into());
}

/// The answers of the layers in front of a handler, by what the route
/// takes: `api::limits` (every route), `api::auth::gate` (`/v1`),
/// `api::parse_body` (bodies), `api::query` and `api::parse_id`
/// (parameters).
fn shared_answers(path: &str, method: &str, op: &mut Operation) {
    add(
        op,
        "503",
        "A dependency is down, too many requests are in flight, or the request took too long \
         (`unavailable`, `overloaded`, `timeout`); retry later",
    );
    if !path.starts_with("/v1/") {
        // No key (`/metrics` says what it takes itself): an empty list
        // overrides the document-wide bearer rule.
        op.security
            .get_or_insert_with(Vec::<SecurityRequirement>::new);
        return;
    }
    add(
        op,
        "401",
        "No API key, or one that is not valid, expired or was revoked (`unauthorized`)",
    );
    add(
        op,
        "403",
        "The key's scope (or tenant) may not use this route (`forbidden`)",
    );
    add(
        op,
        "429",
        "The key's request rate is used up (`rate_limited`), or a submit would pass the \
         tenant's cap on waiting jobs (`queue_full`); see `Retry-After`",
    );
    if matches!(method, "post" | "put" | "delete") {
        add(
            op,
            "415",
            "`Content-Type` is not `application/json` (`unsupported_media_type`), \
             also on a POST or DELETE without a body",
        );
    }
    if op.request_body.is_some() {
        add(op, "400", "The body is not JSON (`invalid_json`)");
        add(op, "413", "The body is over 1 MiB (`body_too_large`)");
        add(
            op,
            "422",
            "JSON of the wrong shape, or a value out of range (`invalid_job`); `field` names it",
        );
    }
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_params = !params.is_empty();
    let in_path = params.iter().any(|p| match p {
        utoipa::openapi::RefOr::T(p) => p.parameter_in == ParameterIn::Path,
        utoipa::openapi::RefOr::Ref(_) => false,
    });
    if has_params {
        add(
            op,
            "400",
            "A path or query parameter is malformed or unknown (`invalid_parameter`); `field` names it",
        );
    }
    if in_path {
        add(op, "404", "Nothing by that name or id in the key's tenant");
    }
}
