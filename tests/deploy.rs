//! The deployment files: both compose files validate with the compose CLI
//! (the v2 plugin when present, else Debian's docker-compose), worker
//! services can be scaled, the production file has no default secret and
//! publishes only the API on loopback, and the image's stages are
//! multi-stage, non-root and health-checked. Images are not built here (no
//! Docker engine); scripts/check-deploy.sh lints the Dockerfile.

use std::path::Path;
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose(file: &str, env_file: Option<&Path>, args: &[&str]) -> Output {
    let file = root().join("compose").join(file);
    let file = file.to_str().expect("utf-8 path");
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    let mut cmd = match v2 {
        Ok(o) if o.status.success() => {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        }
        _ => Command::new("docker-compose"),
    };
    if let Some(env) = env_file {
        cmd.arg("--env-file").arg(env);
    }
    // The secrets must come from the env file, not from the caller.
    for var in SECRET_VARS.iter().chain(&["STEVEDORE_PUBLISH"]) {
        cmd.env_remove(var);
    }
    cmd.args(["-f", file])
        .args(args)
        .output()
        .expect("a compose CLI (scripts/services.sh installs docker-compose)")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "compose: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SECRET_VARS: [&str; 6] = [
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "RABBITMQ_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "STEVEDORE_WEBHOOK_SECRET",
    "STEVEDORE_AUTH_SECRET",
];

/// Host-port publications in `config` output, in either CLI's spelling.
fn published(config: &str) -> Vec<String> {
    let lines: Vec<&str> = config.lines().map(str::trim).collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // A port mapping may open the list item: `- published: 8080`.
        let t = line.strip_prefix("- ").unwrap_or(line);
        if t.starts_with("published:") {
            // The v2 plugin prints one mapping per port, host_ip near it.
            let near = &lines[i.saturating_sub(4)..(i + 4).min(lines.len())];
            let ip = near
                .iter()
                .find(|l| l.starts_with("host_ip:"))
                .unwrap_or(&"");
            found.push(format!("{t} {ip}"));
        } else if let Some(short) = line.strip_prefix("- ") {
            // 1.29 prints `- 127.0.0.1:8080:8080/tcp` under `ports:`.
            if short.matches(':').count() >= 2 && short.ends_with("/tcp") {
                found.push(short.to_owned());
            }
        }
    }
    found
}

const PROD_SECRETS: &str = "POSTGRES_PASSWORD=pg-test-secret\nREDIS_PASSWORD=redis-test-secret\n\
RABBITMQ_PASSWORD=amqp-test-secret\nGRAFANA_ADMIN_PASSWORD=grafana-test-secret\n\
STEVEDORE_WEBHOOK_SECRET=whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0\n\
STEVEDORE_AUTH_SECRET=auth-test-secret-0123456789abcdef0123\n";

#[test]
fn compose_file_validates_and_workers_scale() {
    let config = ok(&compose("docker-compose.yml", None, &["config"]));
    let services = ok(&compose(
        "docker-compose.yml",
        None,
        &["config", "--services"],
    ));
    for s in [
        "postgres",
        "redis",
        "rabbitmq",
        "api",
        "dispatcher",
        "probe",
    ] {
        assert!(
            services.lines().any(|l| l.trim() == s),
            "service {s} in {services}"
        );
    }
    // Only the API publishes a host port; a worker that did could not be
    // scaled past one replica.
    assert_eq!(published(&config).len(), 1, "{config}");
}

#[test]
fn production_compose_refuses_to_start_without_secrets() {
    let out = compose("docker-compose.prod.yml", None, &["config"]);
    assert!(!out.status.success(), "config passed with no env file");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("_PASSWORD"), "names the missing secret: {err}");

    let example = root().join("compose/prod.env.example");
    let out = compose("docker-compose.prod.yml", Some(&example), &["config"]);
    assert!(
        !out.status.success(),
        "the example's empty passwords must not pass"
    );
}

#[test]
fn production_compose_validates_with_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = dir.path().join("prod.env");
    std::fs::write(&env, PROD_SECRETS).expect("env file");
    let config = ok(&compose("docker-compose.prod.yml", Some(&env), &["config"]));
    let services = ok(&compose(
        "docker-compose.prod.yml",
        Some(&env),
        &["config", "--services"],
    ));
    for s in [
        "postgres",
        "redis",
        "rabbitmq",
        "migrate",
        "api",
        "dispatcher",
        "notifier",
        "probe",
        "scrape",
        "analyze",
        "prometheus",
        "grafana",
        "loki",
    ] {
        assert!(
            services.lines().any(|l| l.trim() == s),
            "service {s} in {services}"
        );
    }
    let ports = published(&config);
    assert_eq!(ports.len(), 1, "only the API publishes: {ports:?}");
    assert!(ports[0].contains("127.0.0.1"), "on loopback: {ports:?}");
    // Every long-running service restarts, is health-checked and limited.
    let services: Vec<&str> = services.lines().map(str::trim).collect();
    assert_eq!(
        config.matches("restart: unless-stopped").count(),
        services.len() - 1,
        "all but the one-shot migrate: {config}"
    );
    assert!(config.matches("healthcheck:").count() >= services.len() - 1);
    assert_eq!(
        config.matches("limits:").count(),
        services.len(),
        "{config}"
    );
    // Redis requires the password and the clients send it.
    assert!(config.contains("requirepass"));
    assert!(config.contains("redis://:redis-test-secret@redis:6379"));
    // The analyze pool refuses to start without its model.
    assert!(config.contains("STEVEDORE_LOCAL_MODEL") && config.contains("exit 78"));
    for mount in [
        "monitoring/prometheus",
        "monitoring/grafana",
        "monitoring/loki",
    ] {
        assert!(config.contains(mount), "mounts {mount}");
    }

    let open = dir.path().join("open.env");
    std::fs::write(
        &open,
        format!("{PROD_SECRETS}STEVEDORE_PUBLISH=0.0.0.0:8443\n"),
    )
    .expect("env file");
    let config = ok(&compose(
        "docker-compose.prod.yml",
        Some(&open),
        &["config"],
    ));
    let ports = published(&config);
    assert!(
        ports.len() == 1 && ports[0].contains("8443") && !ports[0].contains("127.0.0.1"),
        "STEVEDORE_PUBLISH moves the API's port: {ports:?}"
    );
}

/// The stage's lines, from its `FROM ... AS name` to the next `FROM`.
fn stage<'a>(dockerfile: &'a str, name: &str) -> Vec<&'a str> {
    let suffix = format!(" AS {name}");
    dockerfile
        .lines()
        .skip_while(|l| !(l.starts_with("FROM ") && l.ends_with(&suffix)))
        .enumerate()
        .take_while(|(i, l)| *i == 0 || !l.starts_with("FROM "))
        .map(|(_, l)| l)
        .collect()
}

#[test]
fn image_stages_are_cached_non_root_and_health_checked() {
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).expect("Dockerfile");
    // Dependencies build from the recipe alone, before the sources come in,
    // so an edit to src/ reuses that layer.
    let build = stage(&dockerfile, "build");
    let cook = build.iter().position(|l| l.contains("cargo chef cook"));
    let copy = build.iter().position(|l| l.trim() == "COPY . .");
    assert!(
        matches!((cook, copy), (Some(c), Some(s)) if c < s),
        "{build:?}"
    );

    for name in ["slim", "browser"] {
        let lines = stage(&dockerfile, name);
        assert!(!lines.is_empty(), "stage {name}");
        // The last USER of the stage is what the container runs as.
        let user = lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or("root");
        let uid = user.split(':').next().unwrap_or_default();
        assert!(
            uid.parse::<u32>().is_ok_and(|u| u >= 1000),
            "stage {name} runs as numeric non-root, not {user}"
        );
    }
    let slim = stage(&dockerfile, "slim").join("\n");
    assert!(!slim.contains("chromium"), "slim has no browser");
    assert!(slim.contains("HEALTHCHECK") && slim.contains("/healthz"));
    let browser = stage(&dockerfile, "browser").join("\n");
    assert!(
        browser.contains("chromium") && browser.contains("ENTRYPOINT [\"/usr/bin/tini\", \"--\"")
    );
    // `docker build` without --target must give the image that can scrape.
    let last_from = dockerfile.lines().rfind(|l| l.starts_with("FROM "));
    assert_eq!(last_from, Some("FROM slim AS browser"));

    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for path in ["target/", "models/", "*.db", ".git", "node_modules"] {
        assert!(
            ignore.lines().any(|l| l == path),
            ".dockerignore has {path}"
        );
    }
}
