//! The process's own listening addresses ([`OwnListeners`]) and the
//! decision whether a connection lands on one of them ([`reaches`]): a
//! guard given them refuses those addresses whatever its allowlist says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

/// The addresses this process listens on, shared by the guards that must
/// keep away from them. It grows while the process starts: a listener on
/// port 0 only has its address once bound, after the guards were built.
#[derive(Debug, Clone, Default)]
pub struct OwnListeners(Arc<RwLock<Vec<SocketAddr>>>);

impl OwnListeners {
    pub fn add(&self, addr: SocketAddr) {
        let mut all = self.0.write().unwrap_or_else(|p| p.into_inner());
        if !all.contains(&addr) {
            all.push(addr);
        }
    }

    /// Whether a connection to `target` would land on one of them.
    pub fn reached_by(&self, target: SocketAddr) -> bool {
        let all = self.0.read().unwrap_or_else(|p| p.into_inner());
        all.iter().any(|l| reaches(*l, target, is_local_address))
    }
}

/// The decision function for own listeners: does a connection to `target`
/// land on a socket bound to `listener`? `is_local` says whether an address
/// belongs to this host. A listener on a wildcard address (`0.0.0.0`, `::`,
/// which on Linux also takes IPv4) is reached through any local address;
/// one on a given address only through it. Connecting to an unspecified
/// address goes to loopback, and an IPv6 form wrapping an IPv4 address
/// (mapped, NAT64, 6to4) counts as that address, which may refuse more
/// than reaches the listener, never less.
pub fn reaches(
    listener: SocketAddr,
    target: SocketAddr,
    is_local: impl Fn(IpAddr) -> bool,
) -> bool {
    if listener.port() != target.port() {
        return false;
    }
    let t = match canonical(target.ip()) {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let l = canonical(listener.ip());
    if l.is_unspecified() {
        is_local(t)
    } else {
        l == t
    }
}

/// The IPv4 address behind an IPv6 wrapper form, else the address itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => crate::mapped_v4(&v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether an address is this host's: the kernel lets a socket bind only
/// to its own addresses (all of 127/8 among them). Errs towards "local"
/// where non-local binds are allowed (`ip_nonlocal_bind`), which refuses
/// more, never less.
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn a_listener_is_reached_by_its_address_its_wrappers_and_the_unspecified_address() {
        let local =
            |ip: IpAddr| ip.is_loopback() || ip == "10.0.0.5".parse::<IpAddr>().expect("ip");
        let api = addr("127.0.0.1:8080");
        for t in ["127.0.0.1:8080", "[::ffff:127.0.0.1]:8080", "0.0.0.0:8080"] {
            assert!(reaches(api, addr(t), local), "{t}");
        }
        for t in [
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "[::1]:8080",
            "10.0.0.5:8080",
        ] {
            assert!(!reaches(api, addr(t), local), "{t}");
        }
        let v6 = addr("[::1]:8080");
        assert!(reaches(v6, addr("[::]:8080"), local));
        assert!(!reaches(v6, addr("127.0.0.1:8080"), local));
        // A wildcard listener takes every local address, of either family.
        for wildcard in ["0.0.0.0:9100", "[::]:9100"] {
            for t in [
                "127.0.0.1:9100",
                "127.9.9.9:9100",
                "10.0.0.5:9100",
                "[::1]:9100",
                "0.0.0.0:9100",
            ] {
                assert!(reaches(addr(wildcard), addr(t), local), "{wildcard} {t}");
            }
            for t in ["10.0.0.6:9100", "93.184.216.34:9100", "127.0.0.1:9101"] {
                assert!(!reaches(addr(wildcard), addr(t), local), "{wildcard} {t}");
            }
        }
    }
}
