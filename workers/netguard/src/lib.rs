//! The SSRF guard shared by scraping and webhook delivery: resolve the
//! host, refuse addresses that reach inside the network, and hand back the
//! checked address so the request connects to exactly that address (no
//! second lookup an attacker's DNS could answer differently).
//!
//! Rules: only http and https;
//! loopback, private, link-local, CGNAT, multicast, unspecified, broadcast,
//! reserved and documentation ranges are refused; IPv4-mapped,
//! IPv4-compatible, well-known NAT64 and 6to4 forms are judged by the IPv4
//! address inside; Teredo and the local-use NAT64 prefix are refused outright
//! (what they reach is decided by a relay or translator we cannot see); and
//! link-local / cloud metadata addresses (all of `169.254.0.0/16`,
//! `fd00:ec2::/32`) are refused even when allowlisted.
//!
//! An allowlist (`host:port`, comma-separated; the core reads
//! `STEVEDORE_SCRAPE_ALLOW_HOSTS` and `STEVEDORE_WEBHOOK_ALLOW_HOSTS`) lets
//! named local servers through. An entry matches the URL's literal host and
//! port, never what a name resolves to: `127.0.0.1:8099` admits
//! `http://127.0.0.1:8099/` but not a name whose DNS answer is 127.0.0.1.
//! [`OwnListeners`] are the process's own listening addresses (its API, its
//! metrics): a guard given them refuses every URL that would land there,
//! allowlisted or not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
pub use url::Url;

mod listeners;
pub use listeners::{reaches, OwnListeners};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardError {
    #[error("not a valid URL: {0}")]
    BadUrl(String),
    #[error("only http and https are allowed")]
    Scheme,
    #[error("{0} resolves to a forbidden address ({1})")]
    Forbidden(String, IpAddr),
    /// The address is one this process listens on (its API, its metrics).
    #[error("{0} reaches this process's own listener ({1})")]
    OwnListener(String, SocketAddr),
    #[error("cannot resolve {0}")]
    Unresolvable(String),
    /// Refused by policy whatever the address (a guard that allows nothing).
    #[error("{0}")]
    Denied(String),
}

/// A URL that passed the guard, with the address to connect to.
#[derive(Debug, Clone)]
pub struct AllowedUrl {
    pub url: Url,
    pub host: String,
    pub addr: SocketAddr,
}

/// "Resolve and check this URL, give me the pinned address."
#[async_trait]
pub trait UrlGuard: Send + Sync + 'static {
    async fn check(&self, url: &str) -> Result<AllowedUrl, GuardError>;
}

/// Name resolution, injectable so tests can play a DNS server whose
/// answers change between lookups without touching the system resolver.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn resolve(&self, name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver, through tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((name, port)).await?.collect())
    }
}

/// The rules above, with an allowlist of `host:port`.
#[derive(Clone)]
pub struct NetGuard {
    allow: Vec<String>,
    resolver: Arc<dyn Resolve>,
    own: OwnListeners,
}

impl Default for NetGuard {
    fn default() -> Self {
        Self::new("")
    }
}

impl std::fmt::Debug for NetGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetGuard")
            .field("allow", &self.allow)
            .field("own", &self.own)
            .finish()
    }
}

impl NetGuard {
    pub fn new(allow_hosts: &str) -> Self {
        Self::with_resolver(allow_hosts, Arc::new(SystemResolver))
    }

    /// An allowlist entry names a `host:port` as written in URLs
    /// (`[::1]:8099` for an IPv6 literal).
    pub fn with_resolver(allow_hosts: &str, resolver: Arc<dyn Resolve>) -> Self {
        let allow = allow_hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(allow_entry)
            .collect();
        Self {
            allow,
            resolver,
            own: OwnListeners::default(),
        }
    }

    /// Refuses whatever reaches these listeners, allowlisted or not.
    pub fn refusing(mut self, own: OwnListeners) -> Self {
        self.own = own;
        self
    }
}

/// An allowlist entry spelled as a parsed URL spells its host and port
/// (lower case, `[::ffff:7f00:1]` for `[::ffff:127.0.0.1]`, `127.0.0.1` for
/// `2130706433`), so that it matches the URLs the parser takes for the same
/// literal host. An entry without a port, or that no URL would have, stays
/// as written and matches nothing.
fn allow_entry(raw: &str) -> String {
    let raw = raw.to_ascii_lowercase();
    let has_port = raw
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    let parsed = Url::parse(&format!("http://{raw}/"))
        .ok()
        .filter(|u| has_port && u.path() == "/" && u.username().is_empty() && u.query().is_none());
    match parsed
        .as_ref()
        .and_then(|u| Some((u.host_str()?, u.port_or_known_default()?)))
    {
        Some((host, port)) => format!("{host}:{port}"),
        None => raw,
    }
}

/// The IPv4 address an IPv6 form stands for, where the IPv6 address is
/// only a wrapper around it (mapped, compatible, NAT64 64:ff9b::/96, 6to4).
pub(crate) fn mapped_v4(v6: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0];
    let mapped = s[0..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff;
    let compat = s[0..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified();
    if s[0] == 0x2002 {
        // 6to4 carries the relay's IPv4 address in bits 16..48.
        return Some(v4(s[1], s[2]));
    }
    (nat64 || mapped || compat).then(|| v4(s[6], s[7]))
}

/// Prefixes whose destination is chosen by a relay or translator: the
/// address says nothing we can judge, so they are refused whole.
fn v6_tunnelled(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    let teredo = s[0] == 0x2001 && s[1] == 0;
    // RFC 8215 local-use NAT64: a site's own translator, any IPv4 behind it.
    let nat64_local = s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1;
    teredo || nat64_local
}

/// Link-local and cloud metadata endpoints: refused even when allowlisted.
/// All of 169.254.0.0/16 (not only .169.254: clouds put DNS, time and
/// instance services there too), AWS's fd00:ec2::/32, Alibaba's
/// 100.100.100.200, and any IPv6 form wrapping one of them.
pub fn is_metadata(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 169 && o[1] == 254) || v4 == Ipv4Addr::new(100, 100, 100, 200)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] == 0xfd00 && s[1] == 0x0ec2)
                || mapped_v4(&v6).is_some_and(|v4| is_metadata(IpAddr::V4(v4)))
        }
    }
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (64..128).contains(&o[1])) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking
        || o[0] >= 240 // reserved
}

/// The decision function: may a request go to this address?
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => {
            if v6_tunnelled(&v6) {
                return true;
            }
            if let Some(v4) = mapped_v4(&v6) {
                return v4_forbidden(v4);
            }
            let s0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s0 & 0xfe00) == 0xfc00 // unique local
                || (s0 & 0xffc0) == 0xfe80 // link-local
                || (s0 & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s0 == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
                || s0 == 0x0100 // discard-only 100::/64
        }
    }
}

#[async_trait]
impl UrlGuard for NetGuard {
    async fn check(&self, raw: &str) -> Result<AllowedUrl, GuardError> {
        let url = Url::parse(raw).map_err(|e| GuardError::BadUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(GuardError::Scheme);
        }
        let host = url
            .host_str()
            .ok_or_else(|| GuardError::BadUrl("no host".into()))?
            .to_ascii_lowercase();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| GuardError::BadUrl("no port".into()))?;
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        // The literal host as written in the URL: an entry names a server,
        // not the addresses a name may be pointed at later.
        let allowed = self.allow.contains(&format!("{host}:{port}"));
        // `localhost.` is `localhost`: a fully qualified name must not slip
        // past a check (or fail to resolve here and resolve elsewhere).
        let name = bare.trim_end_matches('.').to_owned();
        // RFC 6761: localhost names are loopback whatever DNS says.
        if !allowed && (name == "localhost" || name.ends_with(".localhost")) {
            return Err(GuardError::Forbidden(host, IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        let addrs: Vec<SocketAddr> = match name.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => self
                .resolver
                .resolve(&name, port)
                .await
                .map_err(|_| GuardError::Unresolvable(host.clone()))?,
        };
        // Every address the name resolves to must pass: picking the first
        // good one would let a name mixing public and private answers through
        // on a retry that happens to get the other order.
        for a in &addrs {
            if is_metadata(a.ip()) || (!allowed && is_forbidden(a.ip())) {
                return Err(GuardError::Forbidden(host, a.ip()));
            }
            if self.own.reached_by(*a) {
                return Err(GuardError::OwnListener(host, *a));
            }
        }
        let addr = *addrs
            .first()
            .ok_or_else(|| GuardError::Unresolvable(host.clone()))?;
        Ok(AllowedUrl {
            url,
            host: bare,
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_internal_forms_unless_allowlisted_and_metadata_always() {
        let g = NetGuard::new("127.0.0.1:8099, [::1]:8099, 169.254.169.254:80");
        for u in [
            "http://127.0.0.1:1/",
            "http://2130706433:1/",
            "http://[::ffff:127.0.0.1]:1/",
            "http://[64:ff9b::a00:1]/",
            "http://10.1.2.3/",
            "http://100.64.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://192.0.2.1/",
        ] {
            assert!(
                matches!(g.check(u).await, Err(GuardError::Forbidden(..))),
                "{u}"
            );
        }
        assert_eq!(
            g.check("ftp://example.com/").await.err(),
            Some(GuardError::Scheme)
        );
        assert!(g.check("http://127.0.0.1:8099/hook").await.is_ok());
        assert!(g.check("http://[::1]:8099/hook").await.is_ok());
        assert!(g.check("http://[0:0::1]:8099/hook").await.is_ok());
        assert!(is_forbidden("169.254.169.254".parse().expect("ip")));
        assert!(is_metadata("169.254.169.254".parse().expect("ip")));
        assert!(!is_forbidden("93.184.216.34".parse().expect("ip")));
        assert!(!is_forbidden("2606:4700::1111".parse().expect("ip")));
    }

    /// Answers from a list, one per lookup, like a DNS server rebinding.
    struct Scripted(std::sync::Mutex<Vec<IpAddr>>);

    #[async_trait]
    impl Resolve for Scripted {
        async fn resolve(&self, _: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            let mut answers = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let ip = answers.remove(0);
            Ok(vec![SocketAddr::new(ip, port)])
        }
    }

    fn scripted(answers: &[&str]) -> Arc<dyn Resolve> {
        let ips = answers.iter().map(|a| a.parse().expect("ip")).collect();
        Arc::new(Scripted(std::sync::Mutex::new(ips)))
    }

    #[tokio::test]
    async fn each_check_judges_the_answer_it_got_and_pins_it() {
        let g = NetGuard::with_resolver(
            "rebind.test:8099",
            scripted(&["127.0.0.1", "169.254.169.254"]),
        );
        let first = g
            .check("http://rebind.test:8099/")
            .await
            .expect("allowlisted name");
        assert_eq!(first.addr, "127.0.0.1:8099".parse().expect("addr"));
        assert!(matches!(
            g.check("http://rebind.test:8099/").await,
            Err(GuardError::Forbidden(_, ip)) if ip == "169.254.169.254".parse::<IpAddr>().expect("ip")
        ));
    }

    #[tokio::test]
    async fn an_address_entry_does_not_admit_names_resolving_to_it() {
        let g = NetGuard::with_resolver("127.0.0.1:8099", scripted(&["127.0.0.1"]));
        assert!(matches!(
            g.check("http://evil.test:8099/").await,
            Err(GuardError::Forbidden(..))
        ));
        assert!(g.check("http://127.0.0.1:8099/").await.is_ok());
        // Nor another port of an allowlisted host.
        assert!(matches!(
            g.check("http://127.0.0.1:8100/").await,
            Err(GuardError::Forbidden(..))
        ));
    }

    #[tokio::test]
    async fn a_listed_name_is_admitted_by_its_name_not_by_what_it_resolves_to() {
        let g =
            NetGuard::with_resolver("receiver.test:8099", scripted(&["127.0.0.1", "127.0.0.1"]));
        assert!(g.check("http://receiver.test:8099/").await.is_ok());
        // The same address under its own literal is not listed.
        assert!(matches!(
            g.check("http://127.0.0.1:8099/").await,
            Err(GuardError::Forbidden(..))
        ));
        assert!(matches!(
            g.check("http://other.test:8099/").await,
            Err(GuardError::Forbidden(..))
        ));
    }

    #[test]
    fn entries_are_spelled_as_parsed_urls_spell_their_hosts() {
        for (entry, spelled) in [
            ("127.0.0.1:8099", "127.0.0.1:8099"),
            ("2130706433:8099", "127.0.0.1:8099"),
            ("[::FFFF:127.0.0.1]:8099", "[::ffff:7f00:1]:8099"),
            ("Receiver.Test:80", "receiver.test:80"),
            // No port, or not a host and port: kept, and matching nothing.
            ("receiver.test", "receiver.test"),
            ("receiver.test:80/path", "receiver.test:80/path"),
        ] {
            assert_eq!(allow_entry(entry), spelled, "{entry}");
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[tokio::test]
    async fn own_listeners_are_refused_even_when_allowlisted_or_named() {
        let own = OwnListeners::default();
        let g = NetGuard::with_resolver(
            "127.0.0.1:8080, [::ffff:127.0.0.1]:8080, 0.0.0.0:8080, api.test:8080, 127.0.0.1:8081, 127.0.0.2:9100",
            scripted(&["127.0.0.1"]),
        )
        .refusing(own.clone());
        assert!(
            g.check("http://127.0.0.1:8080/").await.is_ok(),
            "not yet listening"
        );
        own.add(addr("127.0.0.1:8080"));
        for u in [
            "http://127.0.0.1:8080/v1/jobs",
            "http://[::ffff:127.0.0.1]:8080/",
            "http://0.0.0.0:8080/",
            "http://api.test:8080/",
        ] {
            assert!(
                matches!(g.check(u).await, Err(GuardError::OwnListener(..))),
                "{u}"
            );
        }
        assert!(g.check("http://127.0.0.1:8081/").await.is_ok());
        // A wildcard listener (a worker's metrics) is refused on any
        // loopback address, which the kernel routes to it.
        assert!(g.check("http://127.0.0.2:9100/").await.is_ok());
        own.add(addr("0.0.0.0:9100"));
        assert!(matches!(
            g.check("http://127.0.0.2:9100/").await,
            Err(GuardError::OwnListener(..))
        ));
    }

    #[tokio::test]
    async fn names_resolving_inside_are_refused_and_metadata_even_when_allowlisted() {
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "fd00::1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "::ffff:10.0.0.1",
        ] {
            let g = NetGuard::with_resolver("", scripted(&[ip]));
            assert!(
                matches!(
                    g.check("http://inside.test/").await,
                    Err(GuardError::Forbidden(..))
                ),
                "{ip}"
            );
        }
        let g = NetGuard::with_resolver("meta.test:80", scripted(&["169.254.169.254"]));
        assert!(matches!(
            g.check("http://meta.test/").await,
            Err(GuardError::Forbidden(..))
        ));
        let g = NetGuard::with_resolver("", scripted(&["93.184.216.34"]));
        assert!(g.check("http://public.test/").await.is_ok());
    }
}
