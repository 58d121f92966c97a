//! TLS to every service, against servers on loopback that speak only TLS,
//! with a CA made here: a fleet whose URL asks for TLS
//! (`sslmode=verify-full&sslrootcert=`, `rediss://`, `amqps://`) and is
//! given that CA runs a job end to end as deployed (`stevedore api` and
//! `stevedore worker` processes, settings from the environment), and
//! `stevedore doctor` is green; given another CA, a role refuses to start
//! at once with an error naming the certificate problem, and doctor says
//! what to fix. One test per service, each starting only its own server;
//! the other services are the shared ones.
//!
//! RabbitMQ runs as a private node with a TLS listener rather than behind
//! a TLS proxy written in the test: it starts in ~5 s here, and what is
//! tested is then lapin against RabbitMQ's own TLS, as in production.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use support::procs::{
    free_port, run_stevedore, PrivatePostgres, PrivateRabbit, PrivateRedis, Proc,
};
use uuid::Uuid;

/// The files of a throw-away PKI: a CA, a server certificate it signed
/// for `localhost` and `127.0.0.1`, and an unrelated CA.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cert_pem: String,
    key_pem: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

fn pki(dir: &Path) -> Pki {
    let ca_ = ca("Stevedore test CA");
    let other = ca("Some other CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca_).expect("server certificate");
    let p = Pki {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    for (path, pem) in [
        (&p.ca, ca_.pem()),
        (&p.other_ca, other.pem()),
        (&p.cert, p.cert_pem.clone()),
        (&p.key, p.key_pem.clone()),
    ] {
        std::fs::write(path, pem).expect("write PKI file");
    }
    p
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Every setting a role reads for its services, so nothing comes from the
/// environment the tests run in; `over` replaces some.
fn env(over: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", String::new()),
        ("REDIS_URL", support::redis_url().to_owned()),
        ("STEVEDORE_REDIS_CA_FILE", String::new()),
        (
            "STEVEDORE_REDIS_PREFIX",
            format!("sdt:{}", Uuid::now_v7().simple()),
        ),
        ("AMQP_URL", support::amqp_url().to_owned()),
        ("STEVEDORE_AMQP_CA_FILE", String::new()),
        (
            "STEVEDORE_AMQP_PREFIX",
            format!("sdt.{}", Uuid::now_v7().simple()),
        ),
        ("STEVEDORE_BROKER", "redis".to_owned()),
        ("STEVEDORE_DB_POOL", "4".to_owned()),
        ("STEVEDORE_LOG", "info,sqlx=warn".to_owned()),
        // doctor: no browser or local model to look at here.
        ("CHROME", "/bin/true".to_owned()),
        ("OPENAI_API_KEY", "sk-tls-test".to_owned()),
    ];
    for (k, v) in over {
        env.retain(|(key, _)| key != k);
        env.push((k, v.clone()));
    }
    env
}

/// Waits for `port` to open while `proc` runs, failing with its log if it
/// exits first.
async fn wait_up(proc: &mut Proc, port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(proc.running(), "{} exited:\n{}", proc.name, proc.log());
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not listen within 60 s:\n{}",
            proc.name,
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `stevedore api` (with its dispatcher) and a probe worker on
/// `env`, submits a probe job and waits for it to succeed.
async fn job_runs(dir: &Path, env: &[(&'static str, String)]) {
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let mut api = Proc::stevedore(
        &["api", "--insecure-no-auth", "--listen", &listen],
        env,
        dir,
        "api",
    );
    let mut worker = Proc::stevedore(
        &["worker", "--pool", "probe", "--concurrency", "2"],
        env,
        dir,
        "worker",
    );
    wait_up(&mut api, api_port).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = format!("http://{listen}/v1/jobs");
    let resp = http
        .post(&base)
        .json(&json!({"kind": "probe", "payload": {}}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    let id = resp.json::<serde_json::Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let job: serde_json::Value = http
            .get(format!("{base}/{id}"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("JSON");
        if job["status"] == "succeeded" {
            break;
        }
        assert!(worker.running(), "worker exited:\n{}", worker.log());
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not succeed within 60 s: {job}\napi:\n{}\nworker:\n{}",
            api.log(),
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `stevedore ARGS` expecting it to fail within 20 s (no retrying a
/// refused certificate as if the service were starting) with every one
/// of `needles` in its output.
async fn refused(args: &[&str], env: &[(&'static str, String)], needles: &[&str]) {
    let started = std::time::Instant::now();
    let out = run_stevedore(args, env).await;
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!out.ok, "stevedore {args:?} succeeded:\n{text}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused at once, not after retries ({:?}):\n{text}",
        started.elapsed()
    );
    for n in needles {
        assert!(text.contains(n), "missing {n:?} in:\n{text}");
    }
}

/// `stevedore doctor` on `env`: green, or red on `service` with `needles`.
async fn doctor(env: &[(&'static str, String)], red: Option<(&str, &[&str])>) {
    let out = run_stevedore(&["doctor"], env).await;
    let text = format!("{}{}", out.stdout, out.stderr);
    match red {
        None => assert!(out.ok && !text.contains("FAIL"), "{text}"),
        Some((service, needles)) => {
            assert!(!out.ok, "{text}");
            assert!(text.contains(&format!("FAIL  {service}")), "{text}");
            for n in needles {
                assert!(text.contains(n), "missing {n:?} in:\n{text}");
            }
        }
    }
}

const BAD_CERT: &str = "invalid peer certificate: UnknownIssuer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_with_the_ca_runs_a_job_and_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let pg = PrivatePostgres::start_tls(dir.path(), &pki.cert_pem, &pki.key_pem).await;
    let url = |query: &str| format!("{}?{query}", pg.url("postgres"));
    let good = env(&[(
        "DATABASE_URL",
        url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            path(&pki.ca)
        )),
    )]);
    job_runs(dir.path(), &good).await;
    doctor(&good, None).await;
    // Encrypted without checking the certificate, as libpq's `require`.
    let require = env(&[("DATABASE_URL", url("sslmode=require"))]);
    let out = run_stevedore(&["migrate"], &require).await;
    assert!(out.ok, "sslmode=require: {}", out.stderr);

    let wrong = env(&[(
        "DATABASE_URL",
        url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            path(&pki.other_ca)
        )),
    )]);
    refused(&["migrate"], &wrong, &["TLS to Postgres failed", BAD_CERT]).await;
    doctor(
        &wrong,
        Some((
            "postgres",
            &[BAD_CERT, "fix: sslrootcert in DATABASE_URL must be the CA"],
        )),
    )
    .await;
    // The server takes no plain TCP login, so the fleet above was on TLS.
    let plain = env(&[("DATABASE_URL", url("sslmode=disable"))]);
    refused(&["migrate"], &plain, &["no encryption"]).await;
    // A CA file that is not there is named at start.
    let missing = env(&[(
        "DATABASE_URL",
        url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
    )]);
    refused(
        &["migrate"],
        &missing,
        &["DATABASE_URL sslrootcert: cannot read /nonexistent/ca.pem"],
    )
    .await;
}

/// What differs between the brokers' tests.
struct Broker {
    /// As doctor names it.
    name: &'static str,
    /// The settings of a fleet on this broker at `url`, trusting `ca`.
    settings: fn(url: String, ca: String) -> Vec<(&'static str, String)>,
    /// What a role that cannot connect to it says.
    refusal: &'static str,
    /// Doctor's fix for a refused certificate.
    fix: &'static str,
}

/// A broker at `url` speaking only TLS: a fleet trusting the test's CA
/// runs a job through it; trusting another CA, a role and doctor refuse.
async fn broker_over_tls(dir: &Path, pki: &Pki, url: String, b: Broker) {
    let db = support::fresh_pg_database().await;
    let with_ca = |ca: &Path| {
        let mut over = (b.settings)(url.clone(), path(ca));
        over.push(("DATABASE_URL", db.clone()));
        env(&over)
    };
    let good = with_ca(&pki.ca);
    job_runs(dir, &good).await;
    doctor(&good, None).await;

    let wrong = with_ca(&pki.other_ca);
    refused(&["migrate"], &wrong, &[b.refusal, BAD_CERT]).await;
    doctor(&wrong, Some((b.name, &[BAD_CERT, b.fix]))).await;
    support::drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_ca_runs_a_job_and_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let redis = PrivateRedis::start_tls(dir.path(), &pki.cert, &pki.key, &pki.ca).await;
    assert!(redis.url().starts_with("rediss://"));
    // Redis carries the probe pool's jobs and the analyze kind's shared
    // limits, both over TLS here.
    let b = Broker {
        name: "redis",
        settings: |url, ca| vec![("REDIS_URL", url), ("STEVEDORE_REDIS_CA_FILE", ca)],
        refusal: "connecting to Redis (REDIS_URL)",
        fix: "fix: STEVEDORE_REDIS_CA_FILE must be the CA",
    };
    broker_over_tls(dir.path(), &pki, redis.url(), b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_ca_runs_a_job_and_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let rabbit = PrivateRabbit::start_tls(dir.path(), &pki.cert, &pki.key, &pki.ca).await;
    assert!(rabbit.url().starts_with("amqps://"));
    let b = Broker {
        name: "amqp",
        settings: |url, ca| {
            vec![
                ("STEVEDORE_BROKER", "amqp".into()),
                ("AMQP_URL", url),
                ("STEVEDORE_AMQP_CA_FILE", ca),
            ]
        },
        refusal: "connecting to RabbitMQ (AMQP_URL)",
        fix: "fix: STEVEDORE_AMQP_CA_FILE must be the CA",
    };
    broker_over_tls(dir.path(), &pki, rabbit.url(), b).await;
}
