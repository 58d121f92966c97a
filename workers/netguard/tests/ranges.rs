//! The guard's decision function on the address forms that wrap or tunnel
//! to another address. Judged on the function only: no traffic is sent to
//! any of these addresses.

use std::net::IpAddr;

use stevedore_netguard::{is_forbidden, is_metadata, GuardError, NetGuard, UrlGuard};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn six_to_four_is_judged_by_the_ipv4_address_inside() {
    // 2002:AABB:CCDD:: carries AA.BB.CC.DD.
    for inside in [
        "2002:7f00:0001::",  // 127.0.0.1
        "2002:0a00:0001::1", // 10.0.0.1
        "2002:c0a8:0101::",  // 192.168.1.1
        "2002:a9fe:a9fe::",  // 169.254.169.254
        "2002:6440:0001::",  // 100.64.0.1
        "2002:0000:0000::",  // 0.0.0.0
    ] {
        assert!(is_forbidden(ip(inside)), "{inside}");
    }
    assert!(is_metadata(ip("2002:a9fe:a9fe::")));
    // A public relay address is a public address.
    assert!(
        !is_forbidden(ip("2002:5db8:d822::1")),
        "93.184.216.34 inside"
    );
}

#[test]
fn teredo_and_local_use_nat64_are_refused_whatever_they_carry() {
    for addr in [
        "2001::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001:0:5db8:d822::1",
        "64:ff9b:1::5db8:d822",
        "64:ff9b:1:ffff::1",
    ] {
        assert!(is_forbidden(ip(addr)), "{addr}");
    }
    // Neighbours of those prefixes are ordinary public addresses.
    assert!(!is_forbidden(ip("2001:4860::8888")));
    assert!(
        !is_forbidden(ip("64:ff9b::5db8:d822")),
        "well-known NAT64 of a public v4"
    );
}

#[test]
fn all_link_local_and_aws_ipv6_metadata_count_as_metadata() {
    for addr in [
        "169.254.0.1",
        "169.254.169.123",
        "169.254.170.2",
        "169.254.255.255",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "fd00:ec2:ffff::1",
        "::ffff:169.254.1.1",
        "64:ff9b::a9fe:0101",
    ] {
        assert!(is_metadata(ip(addr)), "{addr}");
        assert!(is_forbidden(ip(addr)), "{addr}");
    }
    assert!(!is_metadata(ip("169.253.1.1")));
    assert!(!is_metadata(ip("fd00:ec3::1")));
}

#[tokio::test]
async fn an_allowlist_entry_cannot_open_link_local_or_metadata() {
    let g = NetGuard::new("169.254.10.10:80, [fd00:ec2::23]:80, [2002:a9fe:a9fe::]:80");
    for url in [
        "http://169.254.10.10/",
        "http://[fd00:ec2::23]/",
        "http://[2002:a9fe:a9fe::]/",
    ] {
        assert!(
            matches!(g.check(url).await, Err(GuardError::Forbidden(..))),
            "{url}"
        );
    }
}
