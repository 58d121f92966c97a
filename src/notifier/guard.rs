//! The SSRF guard of webhook targets: the shared `stevedore-netguard`
//! crate, which the scrape kind uses as well.

pub use stevedore_netguard::{
    is_forbidden, is_metadata, AllowedUrl, GuardError, NetGuard, UrlGuard,
};
