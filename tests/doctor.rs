//! `stevedore doctor` run as a user runs it: green against the real
//! services, red with a named problem and a fix when a dependency is a
//! closed loopback port, the database is not migrated or a tool is missing.

mod support;

use std::process::Output;

use support::procs::free_port;
use support::{amqp_url, drop_database, fresh_pg_database, redis_url};

/// Runs `stevedore doctor` from the repository root (where the default
/// model path points) with only the given environment for the fleet.
async fn doctor(env: &[(&str, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stevedore"));
    cmd.arg("doctor").current_dir(env!("CARGO_MANIFEST_DIR"));
    for k in [
        "DATABASE_URL",
        "REDIS_URL",
        "AMQP_URL",
        "STEVEDORE_BROKER",
        "STEVEDORE_BROKER_PROBE",
        "STEVEDORE_BROKER_SCRAPE",
        "STEVEDORE_BROKER_ANALYZE",
        "CHROME",
        "STEVEDORE_LOCAL_MODEL",
        "OPENAI_API_KEY",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("doctor finishes within 60 s")
        .expect("run stevedore doctor")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn migrate(url: &str) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .arg("migrate")
        .env("DATABASE_URL", url)
        .output()
        .await
        .expect("run stevedore migrate");
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn green_against_the_real_services() {
    let db = fresh_pg_database().await;
    migrate(&db).await;
    let out = doctor(&[
        ("DATABASE_URL", db.clone()),
        ("REDIS_URL", redis_url().into()),
        ("AMQP_URL", amqp_url().into()),
        ("STEVEDORE_BROKER_SCRAPE", "amqp".into()),
    ])
    .await;
    let t = text(&out);
    drop_database(&db).await;
    assert!(out.status.success(), "{t}");
    for line in [
        "ok    config     brokers: redis (probe, analyze); amqp (scrape)",
        "ok    postgres",
        "ok    migrations all",
        "ok    clock",
        "ok    redis",
        "ok    amqp",
        "ok    chromium",
        "ok    model",
        "everything looks fine",
    ] {
        assert!(t.contains(line), "missing {line:?} in:\n{t}");
    }
    assert!(!t.contains("FAIL"), "{t}");
}

#[tokio::test]
async fn red_with_the_fix_when_services_are_closed_ports() {
    let (pg, redis) = (free_port(), free_port());
    let out = doctor(&[
        (
            "DATABASE_URL",
            format!("postgres://postgres:secret@127.0.0.1:{pg}/stevedore"),
        ),
        ("REDIS_URL", format!("redis://127.0.0.1:{redis}")),
        ("CHROME", "/nonexistent/chromium".into()),
        ("STEVEDORE_LOCAL_MODEL", "/nonexistent/model.gguf".into()),
    ])
    .await;
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "FAIL  postgres   cannot connect to postgres://postgres:***@127.0.0.1:{pg}/stevedore"
        )),
        "{t}"
    );
    assert!(!t.contains("secret"), "the password is not printed: {t}");
    assert!(
        t.contains("fix: start Postgres (scripts/services.sh locally) or correct DATABASE_URL"),
        "{t}"
    );
    assert!(
        t.contains(&format!("FAIL  redis      redis://127.0.0.1:{redis}")),
        "{t}"
    );
    assert!(t.contains("correct REDIS_URL"), "{t}");
    assert!(
        t.contains("FAIL  chromium   cannot run /nonexistent/chromium"),
        "{t}"
    );
    assert!(
        t.contains("FAIL  model      cannot read /nonexistent/model.gguf"),
        "{t}"
    );
    assert!(t.contains("4 problems found"), "{t}");
}

#[tokio::test]
async fn red_when_unmigrated_or_unconfigured() {
    let db = fresh_pg_database().await;
    let out = doctor(&[
        ("DATABASE_URL", db.clone()),
        ("REDIS_URL", redis_url().into()),
    ])
    .await;
    let t = text(&out);
    drop_database(&db).await;
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("FAIL  migrations"), "{t}");
    assert!(
        t.contains("fix: run `stevedore migrate` with the same DATABASE_URL"),
        "{t}"
    );

    let out = doctor(&[("REDIS_URL", redis_url().into())]).await;
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("FAIL  config     DATABASE_URL is not set"),
        "{t}"
    );
}

/// `NAME=` means "no value" (compose passes `${OPENAI_API_KEY:-}` that
/// way): every setting takes it as unset, so defaults apply, nothing fails
/// to parse, and an empty key does not count as one.
#[tokio::test]
async fn empty_settings_count_as_unset() {
    let out = doctor(
        &[
            "DATABASE_URL",
            "REDIS_URL",
            "STEVEDORE_BROKER",
            "STEVEDORE_BROKER_SCRAPE",
            "CHROME",
            "STEVEDORE_LOCAL_MODEL",
            "OPENAI_API_KEY",
        ]
        .map(|k| (k, String::new())),
    )
    .await;
    let t = text(&out);
    for line in [
        "FAIL  config     DATABASE_URL is not set",
        "ok    redis",
        "ok    chromium",
        "ok    model      local model",
        "1 problem found",
    ] {
        assert!(t.contains(line), "missing {line:?} in:\n{t}");
    }
}
