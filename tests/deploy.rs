//! The deployment files: the compose file validates with the compose CLI
//! (the v2 plugin when present, else Debian's docker-compose), worker
//! services can be scaled, and the image is multi-stage, non-root and
//! health-checked.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose(args: &[&str]) -> std::process::Output {
    let file = root().join("compose/docker-compose.yml");
    let file = file.to_str().expect("utf-8 path");
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    let mut cmd = match v2 {
        Ok(o) if o.status.success() => {
            let mut c = Command::new("docker");
            c.args(["compose", "-f", file]);
            c
        }
        _ => {
            let mut c = Command::new("docker-compose");
            c.args(["-f", file]);
            c
        }
    };
    cmd.args(args)
        .output()
        .expect("a compose CLI (scripts/services.sh installs docker-compose)")
}

#[test]
fn compose_file_validates_and_workers_scale() {
    let out = compose(&["config"]);
    assert!(
        out.status.success(),
        "compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services = compose(&["config", "--services"]);
    let services = String::from_utf8_lossy(&services.stdout);
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
    let config = String::from_utf8_lossy(&out.stdout).to_string();
    // Only the API publishes a host port; a worker that did could not be
    // scaled past one replica.
    assert_eq!(
        config.matches("published:").count() + config.matches("- 8080:8080").count(),
        1,
        "{config}"
    );
}

#[test]
fn image_is_multi_stage_non_root_and_health_checked() {
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(dockerfile.contains("COPY --from=build"));
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root")),
        "non-root USER"
    );
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/healthz"));
}
