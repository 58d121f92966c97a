//! `stevedore up`: the supervisor starts api, dispatcher and N workers per
//! pool, restarts a crashed child with a growing backoff, and stops
//! everything on SIGTERM.

mod support;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use support::procs::{free_port, wait_port, Proc};

fn pid_of(log: &str, name: &str) -> Vec<i32> {
    let needle = format!("[up] started {name} pid ");
    log.lines()
        .filter_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .collect()
}

/// The delays `up` announced before restarting `name`, in order.
fn restart_delays(log: &str, name: &str) -> Vec<std::time::Duration> {
    let needle = format!("[up] {name} exited");
    log.lines()
        .filter(|l| l.starts_with(&needle))
        .filter_map(|l| {
            let d = l.rsplit("restarting in ").next()?.trim();
            if let Some(ms) = d.strip_suffix("ms") {
                ms.parse()
                    .ok()
                    .map(|v: f64| std::time::Duration::from_secs_f64(v / 1000.0))
            } else {
                d.strip_suffix('s')?
                    .parse()
                    .ok()
                    .map(std::time::Duration::from_secs_f64)
            }
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_scales_pools_restarts_crashed_children_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = support::fresh_pg_database().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("DATABASE_URL", db.clone()),
        (
            "STEVEDORE_REDIS_PREFIX",
            format!("sdt:{}", uuid::Uuid::now_v7().simple()),
        ),
        ("STEVEDORE_LEASE_SECS", "2".into()),
        ("STEVEDORE_HEARTBEAT_SECS", "0.5".into()),
        ("STEVEDORE_LOST_AFTER_SECS", "3".into()),
    ];
    let args = [
        "up",
        "--insecure-no-auth",
        "--scale",
        "probe=2",
        "--listen",
        &listen,
        "--concurrency",
        "8",
        "--grace-secs",
        "10",
    ];
    let mut up = Proc::stevedore(&args, &env, dir.path(), "up");
    wait_port(port, 60).await;
    support::eventually(30, "both workers started", || async {
        pid_of(&up.log(), "probe-2").len() == 1
    })
    .await;
    let log = up.log();
    for name in ["api", "dispatcher", "notifier", "probe-1", "probe-2"] {
        assert_eq!(pid_of(&log, name).len(), 1, "{name} started once:\n{log}");
    }

    let http = reqwest::Client::new();
    let jobs: Vec<_> = (0..200)
        .map(|_| json!({"kind": "probe", "payload": {"sleep_ms": 50}}))
        .collect();
    let resp = http
        .post(format!("http://{listen}/v1/jobs/batch"))
        .json(&json!({"jobs": jobs}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);

    // Three crashes in a row: each restart waits longer than the last, and
    // no sooner than it says.
    for n in 1..=3 {
        let victim = *pid_of(&up.log(), "probe-1").last().expect("pid");
        kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill worker");
        let killed = std::time::Instant::now();
        support::eventually(30, "the crashed worker is restarted", || async {
            pid_of(&up.log(), "probe-1").len() == n + 1
        })
        .await;
        let delays = restart_delays(&up.log(), "probe-1");
        assert_eq!(delays.len(), n, "{}", up.log());
        assert!(
            killed.elapsed() >= delays[n - 1],
            "restarted after {:?}, sooner than the {:?} it announced",
            killed.elapsed(),
            delays[n - 1]
        );
    }
    let delays = restart_delays(&up.log(), "probe-1");
    assert!(
        delays[0] >= std::time::Duration::from_millis(500),
        "{delays:?}"
    );
    assert!(
        delays[0] < delays[1] && delays[1] < delays[2],
        "the backoff grows: {delays:?}"
    );

    let pg = sqlx::PgPool::connect(&db).await.expect("db");
    support::eventually(60, "every job succeeded", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(&pg)
            .await
            .unwrap_or(0);
        n == 200
    })
    .await;

    let children: Vec<i32> = ["api", "dispatcher", "notifier", "probe-1", "probe-2"]
        .iter()
        .filter_map(|n| pid_of(&up.log(), n).last().copied())
        .collect();
    up.signal(Signal::SIGTERM);
    let status = up.wait_exit(60).await;
    assert!(status.success(), "up exits cleanly: {status}\n{}", up.log());
    assert!(up.log().contains("[up] all stopped"));
    for pid in children {
        assert!(!alive(pid), "child {pid} was stopped");
    }
    pg.close().await;
    support::drop_database(&db).await;
}

/// A role started before its database waits for it (and says so) instead
/// of exiting, then serves once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_waits_for_a_database_that_is_not_up_yet() {
    use support::faultproxy::{FaultProxy, Mode};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = support::fresh_pg_database().await;
    let proxy = FaultProxy::start(5432).await;
    proxy.set(Mode::Reset);
    let name = db.rsplit('/').next().expect("database name");
    let url = format!("postgres://postgres@127.0.0.1:{}/{name}", proxy.port);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("DATABASE_URL", url),
        (
            "STEVEDORE_REDIS_PREFIX",
            format!("sdt:{}", uuid::Uuid::now_v7().simple()),
        ),
    ];
    let mut api = Proc::stevedore(
        &["api", "--insecure-no-auth", "--listen", &listen],
        &env,
        dir.path(),
        "api",
    );
    support::eventually(
        20,
        "the api logs that it waits for the database",
        || async { api.log().contains("Database not ready") },
    )
    .await;
    assert!(
        api.running(),
        "still up while the database is away:\n{}",
        api.log()
    );

    proxy.set(Mode::Pass);
    wait_port(port, 60).await;
    let ready = reqwest::get(format!("http://{listen}/readyz"))
        .await
        .expect("readyz");
    assert!(ready.status().is_success(), "{:?}", ready.text().await);
    api.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(api.wait_exit(20).await.success());
    support::drop_database(&db).await;
}
