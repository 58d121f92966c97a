//! `stevedore bench` runs end to end: with `--broker` it starts its own
//! fleet (here the embedded one, and Postgres + RabbitMQ) and reports every
//! job finished with its figures.

mod support;

use std::process::Command;

fn bench(args: &[&str], env: &[(&str, String)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .arg("bench")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("STEVEDORE_LOG", "warn")
        .output()
        .expect("stevedore bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every figure the bench prints is a finite number: the value after each
/// of `marks` on the line that starts with `line`.
fn figures(out: &str, line: &str, marks: &[&str]) -> Vec<f64> {
    let l = out
        .lines()
        .find(|l| l.starts_with(line))
        .unwrap_or_else(|| panic!("no {line:?} line in: {out}"));
    marks
        .iter()
        .map(|m| {
            let after = l
                .split_once(m)
                .unwrap_or_else(|| panic!("no {m:?} in {l:?}"))
                .1;
            let v: f64 = after
                .split_whitespace()
                .next()
                .and_then(|t| t.trim_end_matches(['s', ':', ',']).parse().ok())
                .unwrap_or_else(|| panic!("no number after {m:?} in {l:?}"));
            assert!(v.is_finite() && v >= 0.0, "{m:?} is {v} in {l:?}");
            v
        })
        .collect()
}

/// The figures a user reads: all finite, rates above zero, p50 <= p99.
fn check_figures(out: &str, jobs: usize) {
    let sub = figures(out, "submitted", &["submitted", "jobs in", ": "]);
    assert_eq!(sub[0] as usize, jobs, "{out}");
    assert!(sub[2] > 0.0, "submit rate: {out}");
    let e2e = figures(
        out,
        "end to end:",
        &["end to end:", "jobs in", "finished): "],
    );
    assert_eq!(e2e[0] as usize, jobs, "{out}");
    assert!(e2e[1] > 0.0 && e2e[2] > 0.0, "span and jobs/s: {out}");
    let l = out
        .lines()
        .find(|l| l.starts_with("submit->start ms:"))
        .unwrap_or_else(|| panic!("no latency line in: {out}"));
    let words: Vec<&str> = l.split_whitespace().collect();
    let p: Vec<f64> = words
        .windows(2)
        .filter(|w| w[0] == "p50" || w[0] == "p99")
        .map(|w| w[1].parse().unwrap_or(f64::NAN))
        .collect();
    assert_eq!(p.len(), 4, "{l}");
    assert!(p.iter().all(|v| v.is_finite() && *v >= 0.0), "{l}");
    assert!(p[0] <= p[1] && p[2] <= p[3], "p50 <= p99: {l}");
    assert!(p[0] <= p[2], "a job starts before it is done: {l}");
}

#[test]
fn bench_spawns_its_own_fleet_and_reports_every_job() {
    let out = bench(
        // Three requests, one per priority (0, 10, 20): every job is
        // still counted and finished.
        &[
            "--broker",
            "embedded",
            "--jobs",
            "300",
            "--batch",
            "100",
            "--priorities",
            "3",
        ],
        &[],
    );
    check_figures(&out, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_on_postgres_and_rabbitmq() {
    let db = support::fresh_pg_database().await;
    let prefix = format!("sdt.{}", uuid::Uuid::now_v7().simple());
    let env = [
        ("DATABASE_URL", db.clone()),
        ("STEVEDORE_AMQP_PREFIX", prefix.clone()),
    ];
    // Keyed jobs (two keys, no limit): the claim's keyed path, under its
    // per-key locks, still finishes every job.
    let args = [
        "--broker",
        "amqp",
        "--jobs",
        "500",
        "--concurrency-keys",
        "2",
    ];
    let out = tokio::task::spawn_blocking(move || bench(&args, &env))
        .await
        .expect("bench thread");
    check_figures(&out, 500);
    let db_line = figures(&out, "database:", &["database:", "(reads included), "]);
    // Every job writes, so both figures are above zero.
    assert!(db_line[0] > 0.0, "commits per 1,000 jobs: {out}");
    assert!(db_line[1] > 100.0, "WAL bytes per job: {out}");
    support::delete_amqp(&prefix, &["probe"]).await;
    support::drop_database(&db).await;
}
