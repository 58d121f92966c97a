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

#[test]
fn bench_spawns_its_own_fleet_and_reports_every_job() {
    let out = bench(
        &["--broker", "embedded", "--jobs", "300", "--batch", "100"],
        &[],
    );
    assert!(out.contains("end to end: 300 jobs"), "{out}");
    assert!(out.contains("submit->start ms: p50"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_on_postgres_and_rabbitmq() {
    let db = support::fresh_pg_database().await;
    let prefix = format!("sdt.{}", uuid::Uuid::now_v7().simple());
    let env = [
        ("DATABASE_URL", db.clone()),
        ("STEVEDORE_AMQP_PREFIX", prefix.clone()),
    ];
    let out =
        tokio::task::spawn_blocking(move || bench(&["--broker", "amqp", "--jobs", "500"], &env))
            .await
            .expect("bench thread");
    assert!(out.contains("end to end: 500 jobs"), "{out}");
    let figures: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("database: "))
        .unwrap_or_else(|| panic!("no database line: {out}"))
        .split_whitespace()
        .filter_map(|w| w.replace(',', "").parse().ok())
        .collect();
    // [commits per 1,000 jobs, 1,000, WAL bytes per job]: each job writes,
    // so both are positive and finite.
    assert_eq!(figures.len(), 3, "{out}");
    assert!(figures[0].is_finite() && figures[0] > 0.0, "{out}");
    assert!(figures[2].is_finite() && figures[2] > 100.0, "{out}");
    support::delete_amqp(&prefix, &["probe"]).await;
    support::drop_database(&db).await;
}
