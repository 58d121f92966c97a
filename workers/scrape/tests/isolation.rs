//! What a page in Stevedore's Chromium can reach, checked on the real
//! browser: none of the worker's secrets in any Chromium process's
//! environment, no loopback service reachable (listeners that count
//! connections stand in for Postgres, Redis and RabbitMQ; the real ports
//! are tried too), no UDP ICE candidate, and a page that is too large fails
//! with a clear error while the worker's runtime keeps ticking.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use stevedore_scrape::browser::netns::Netns;
use stevedore_scrape::{ScrapeConfig, ScrapeHandler};
use support::{fixtures, scrape, Canary};

const SECRETS: &[(&str, &str)] = &[
    (
        "DATABASE_URL",
        "postgres://postgres:sekrit-db@127.0.0.1:5432/x",
    ),
    ("REDIS_URL", "redis://:sekrit-redis@127.0.0.1:6379"),
    ("AMQP_URL", "amqp://guest:sekrit-amqp@127.0.0.1:5672/%2f"),
    ("OPENAI_API_KEY", "sk-sekrit-openai"),
    ("STEVEDORE_WEBHOOK_SECRET", "sekrit-webhook"),
];

fn handler(port: u16) -> ScrapeHandler {
    let mut cfg = ScrapeConfig {
        allow_hosts: format!("127.0.0.1:{port}"),
        ..ScrapeConfig::default()
    };
    cfg.browser.timeout = Duration::from_secs(20);
    ScrapeHandler::new(cfg, &prometheus::Registry::new()).expect("handler")
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// The browser and every process under it, plus any process naming its
/// profile (crashpad handlers are re-parented away from the browser).
fn browser_processes(browser: u32, profile: &Path) -> BTreeSet<u32> {
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = BTreeSet::from([browser]);
    loop {
        let before = found.len();
        for &p in &all {
            if ppid(p).is_some_and(|pp| found.contains(&pp)) {
                found.insert(p);
            }
        }
        if found.len() == before {
            break;
        }
    }
    let profile = profile.to_string_lossy().into_owned();
    for &p in &all {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&profile) {
            found.insert(p);
        }
    }
    found
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
}

#[tokio::test]
async fn chromium_holds_none_of_the_workers_secrets_and_runs_apart_from_it() {
    for (k, v) in SECRETS {
        std::env::set_var(k, v);
    }
    // What any child of the worker would inherit (`/proc/self/environ`
    // shows only the environment the process started with).
    for (k, v) in SECRETS {
        assert_eq!(std::env::var(k).as_deref(), Ok(*v), "the worker has {k}");
    }
    let canary = Canary::start().await;
    let port = fixtures(&canary).await;
    let h = handler(port);
    let (res, _) = scrape(
        &h,
        json!({"url": format!("http://127.0.0.1:{port}/moodle"), "render": "browser"}),
    )
    .await;
    assert_eq!(res.expect("scraped").questions.len(), 5);

    let iso = h.browser().isolation().clone();
    eprintln!("this machine allows: {iso:?}");
    let pid = h.browser().pid().await.expect("a browser runs");
    let profile = h.browser().profile_dir().await.expect("a profile");
    let procs = browser_processes(pid, &profile);
    assert!(procs.len() >= 3, "browser, renderer and more: {procs:?}");
    let own_netns = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let root = status_field(std::process::id(), "Uid:").is_some_and(|u| u.starts_with("0\t"));
    for p in &procs {
        let Ok(environ) = std::fs::read(format!("/proc/{p}/environ")) else {
            continue; // exited meanwhile
        };
        let environ = String::from_utf8_lossy(&environ);
        for (k, v) in SECRETS {
            assert!(!environ.contains(v), "process {p} holds {k}'s value");
            assert!(
                !environ.split('\0').any(|e| e.starts_with(&format!("{k}="))),
                "process {p} has {k}"
            );
        }
        assert!(
            !environ.split('\0').any(|e| e.starts_with("STEVEDORE_")),
            "process {p} has a STEVEDORE_ variable"
        );
        if root {
            let uid = status_field(*p, "Uid:").unwrap_or_default();
            assert!(!uid.starts_with("0\t"), "process {p} runs as root: {uid}");
        }
        if iso.netns {
            let ns = std::fs::read_link(format!("/proc/{p}/ns/net")).expect("netns");
            assert_ne!(ns, own_netns, "process {p} shares the worker's network");
        }
        if iso.sandbox {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&cmdline).contains("--no-sandbox"),
                "process {p} runs without the sandbox although the kernel allows it"
            );
        }
    }
    if root {
        assert!(
            iso.run_as.is_some(),
            "as root, Chromium must run as another user"
        );
    }
}

#[tokio::test]
async fn a_page_reaches_no_loopback_service_and_still_scrapes() {
    // Stand-ins for Postgres, Redis and RabbitMQ that count every connection.
    let stand_ins = [
        Canary::start().await,
        Canary::start().await,
        Canary::start().await,
    ];
    let port = fixtures(&stand_ins[0]).await;
    let h = handler(port);
    let mut ports: Vec<u16> = stand_ins
        .iter()
        .flat_map(|c| [c.port, c.udp_port])
        .collect();
    ports.extend([5432, 6379, 5672]);
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (res, _) = scrape(
        &h,
        json!({"url": format!("http://127.0.0.1:{port}/services?ports={list}"),
               "render": "browser", "wait_for": "#done"}),
    )
    .await;
    assert_eq!(res.expect("the page itself scrapes").questions.len(), 1);
    for c in &stand_ins {
        assert_eq!(c.reached().await, 0, "a stand-in on {} was reached", c.port);
    }
    // The real services' ports were tried, and the proxy refused them.
    let refused: Vec<String> = h
        .browser()
        .refusals()
        .into_iter()
        .map(|r| r.target)
        .collect();
    for p in [5432, 6379, 5672] {
        assert!(
            refused
                .iter()
                .any(|t| t.contains(&format!("127.0.0.1:{p}"))),
            "{p} not tried: {refused:?}"
        );
    }

    // A renderer exploit skips the proxy: from inside the browser's network
    // namespace, the worker's loopback is not there at all.
    if h.browser().isolation().netns {
        let pid = h.browser().pid().await.expect("a browser runs");
        let ns = Netns::open(Path::new(&format!("/proc/{pid}/ns/net"))).expect("netns");
        for c in &stand_ins {
            let addr = ([127, 0, 0, 1], c.port).into();
            assert!(ns.connect(addr).is_err(), "{addr} reachable inside");
            assert_eq!(c.reached().await, 0);
        }
        for p in [5432, 6379, 5672] {
            let addr = ([127, 0, 0, 1], p).into();
            assert!(ns.connect(addr).is_err(), "{addr} reachable inside");
        }
    }
}
