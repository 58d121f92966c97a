//! The newcomer's command, for real: `stevedore dev --demo` on the embedded
//! store runs a probe with a retry, scrapes the Moodle page and analyzes it
//! with the local model (saying plainly that a tiny model guessed the
//! answers), and renders the script-built quiz in headless
//! Chromium. The quiz pages come from a listener of their own, not from the
//! API; empty settings (as compose passes them) leave the defaults, the
//! local model among them. Killing the process outright takes its browser
//! with it.

mod support;

use nix::sys::signal::Signal;
use support::procs::{free_port, wait_port, Proc};

/// Pids of the processes whose parent is `parent` and whose name says
/// Chromium.
fn chromium_children(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split
            // after its closing parenthesis.
            let (comm, rest) = stat.split_once(") ")?;
            let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && comm.contains("chrom")).then_some(pid)
        })
        .collect()
}

/// Gone, or a zombie nobody has reaped yet.
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .split_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_demo_scrapes_analyzes_and_renders_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let args = [
        "dev",
        "--demo",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ];
    // Empty settings, as compose passes `${NAME:-}`, are no settings: the
    // local model answers and every default holds.
    let empty = [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "STEVEDORE_ANALYZE_RPM",
        "STEVEDORE_BROWSER_PAGES",
        "STEVEDORE_SCRAPE_ALLOW_HOSTS",
        "STEVEDORE_ALLOW_HOSTS",
    ]
    .map(|k| (k, String::new()));
    let dev = Proc::stevedore(&args, &empty, dir.path(), "dev");
    wait_port(port, 60).await;
    support::eventually(300, "the demo finished", || async {
        let log = dev.log();
        log.contains("demo: done") || log.contains("demo failed")
    })
    .await;
    let log = dev.log();
    assert!(!log.contains("demo failed"), "{log}");
    assert!(log.contains("5 questions from Quiz 3"), "{log}");
    assert!(log.contains("provider local"), "{log}");
    // Said before the answers, in the words a newcomer reads.
    let note = log
        .find("  note: answered by SmolLM2-135M-Instruct")
        .unwrap_or_else(|| panic!("the demo says who answered: {log}"));
    assert!(
        log[note..].contains("a tiny offline model — expect guesses")
            && log.find("% confident)").is_some_and(|first| first > note),
        "{log}"
    );
    assert_eq!(log.matches("% confident)").count(), 5, "{log}");
    assert!(
        log.contains("3 questions from Live quiz, rendered with browser"),
        "{log}"
    );
    assert!(log.contains("- A residual is defined as ..."), "{log}");
    let page = log
        .split("demo: scraping ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("the demo names the page it scrapes: {log}"));
    assert!(
        page.starts_with("http://127.0.0.1:") && !page.starts_with(&format!("http://{listen}/")),
        "the pages are not the API's: {page}"
    );
    let from_api = reqwest::get(format!("http://{listen}/demo/quiz/moodle-multichoice.html"))
        .await
        .expect("ask the API");
    assert_eq!(from_api.status(), reqwest::StatusCode::NOT_FOUND);
    assert!(
        !log.contains("deprecated"),
        "an empty old setting is no setting: {log}"
    );

    let browsers = chromium_children(dev.pid().as_raw());
    assert_eq!(
        browsers.len(),
        1,
        "one browser for the process: {browsers:?}"
    );
    dev.signal(Signal::SIGKILL);
    support::eventually(10, "the browser died with its worker", || async {
        browsers.iter().all(|p| dead(*p))
    })
    .await;
}
