//! The filtering proxy on its own, spoken to over raw TCP: names that
//! resolve inside the network are refused without a connection being
//! opened (the dialer records every attempt and never leaves loopback),
//! and a client connection carries exactly one request.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use stevedore_netguard::{NetGuard, Resolve};
use stevedore_scrape::proxy::{Dial, Proxy};
use support::{fixtures, Canary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every name resolves to one address.
struct Always(IpAddr);

#[async_trait]
impl Resolve for Always {
    async fn resolve(&self, _: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(vec![SocketAddr::new(self.0, port)])
    }
}

/// Records every dial; only loopback is ever really connected.
#[derive(Default)]
struct Recording(Mutex<Vec<SocketAddr>>);

#[async_trait]
impl Dial for Recording {
    async fn dial(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(addr);
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::other("the test never leaves loopback"));
        }
        TcpStream::connect(addr).await
    }
}

async fn exchange(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

const GET_INSIDE: &str = "GET http://inside.test/ HTTP/1.1\r\nHost: inside.test\r\n\r\n";

#[tokio::test]
async fn names_resolving_inside_the_network_are_refused_before_any_dial() {
    for ip in [
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "fd00::1",
        "64:ff9b::a00:1",
        "64:ff9b::a9fe:a9fe",
        "::ffff:192.168.1.1",
    ] {
        let ip: IpAddr = ip.parse().expect("ip");
        let dial = Arc::new(Recording::default());
        let guard = Arc::new(NetGuard::with_resolver("", Arc::new(Always(ip))));
        let proxy = Proxy::start(guard, dial.clone()).await.expect("proxy");
        let plain = exchange(proxy.addr(), GET_INSIDE).await;
        assert!(plain.starts_with("HTTP/1.1 403"), "{ip}: {plain}");
        assert!(plain.contains("stevedore-refused"), "{ip}");
        let tunnel = exchange(proxy.addr(), "CONNECT inside.test:443 HTTP/1.1\r\n\r\n").await;
        assert!(tunnel.starts_with("HTTP/1.1 403"), "{ip}: {tunnel}");
        assert_eq!(proxy.refusals().len(), 2, "{ip}");
        assert!(dial.0.lock().expect("lock").is_empty(), "{ip} was dialed");

        // Allowlisting the name lets a private address through, to exactly
        // the address that was checked; metadata stays refused.
        let guard = Arc::new(NetGuard::with_resolver(
            "inside.test:80",
            Arc::new(Always(ip)),
        ));
        let proxy = Proxy::start(guard, dial.clone()).await.expect("proxy");
        let r = exchange(proxy.addr(), GET_INSIDE).await;
        let dialed = dial.0.lock().expect("lock").clone();
        if stevedore_netguard::is_metadata(ip) {
            assert!(r.starts_with("HTTP/1.1 403"), "{ip}: {r}");
            assert!(dialed.is_empty(), "{ip} was dialed");
        } else {
            assert!(r.starts_with("HTTP/1.1 502"), "{ip}: {r}");
            assert_eq!(dialed, vec![SocketAddr::new(ip, 80)]);
        }
        dial.0.lock().expect("lock").clear();
    }
}

#[tokio::test]
async fn a_client_connection_carries_one_request_only() {
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let guard = Arc::new(NetGuard::new(&format!("127.0.0.1:{port}")));
    let proxy = Proxy::start(guard, Arc::new(Recording::default()))
        .await
        .expect("proxy");
    // A second request pipelined behind an allowed one, to a host that is
    // not allowed, must go nowhere: not to the canary, not upstream.
    let both = format!(
        "GET http://127.0.0.1:{port}/moodle HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n\
         GET http://127.0.0.1:{c}/ HTTP/1.1\r\nHost: 127.0.0.1:{c}\r\n\r\n",
        c = canary.port
    );
    let r = exchange(proxy.addr(), &both).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(
        r.matches("HTTP/1.1 ").count(),
        1,
        "one response, then close"
    );
    assert!(r.contains("Connection: close"));
    assert!(
        r.ends_with(support::MOODLE),
        "the whole page, nothing after it"
    );
    assert_eq!(canary.reached().await, 0);
    assert!(
        proxy.refusals().is_empty(),
        "the second request was never read"
    );
}
