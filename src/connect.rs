//! How the client of each service is built, for every role, the CLI and
//! `stevedore doctor` alike, so TLS and the CA a deployment trusts are set
//! up in one place:
//!
//! - Postgres ([`pg_options`]): TLS is asked for in `DATABASE_URL` as libpq
//!   reads it: `sslmode=require` (encrypted, certificate not checked),
//!   `verify-ca`, `verify-full` (CA and host name checked), and
//!   `sslrootcert=<file>` for a private CA, trusted besides the system's.
//! - Redis ([`redis_client`]): a `rediss://` `REDIS_URL`, with
//!   `STEVEDORE_REDIS_CA_FILE` for a private CA, trusted *instead of* the
//!   system's (that is how the redis crate takes a root certificate).
//! - RabbitMQ ([`amqp_tls`], [`amqp_connect`]): an `amqps://` `AMQP_URL`,
//!   with `STEVEDORE_AMQP_CA_FILE` for a private CA, trusted besides the
//!   system's.
//!
//! All three run on rustls with the ring provider; without a CA file they
//! trust the system store (`/etc/ssl/certs`, the image's ca-certificates).
//! A CA file is read and checked at start, so a wrong path is a clear error
//! there rather than a failed handshake later. A certificate the client
//! refuses is a setting to fix, not an outage to wait out:
//! [`is_tls_failure`] lets the callers that retry stop at once.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use lapin::tcp::OwnedTLSConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use sqlx::postgres::PgConnectOptions;

/// The query parameters sqlx takes as `sslrootcert`.
const PG_ROOT_CERT_KEYS: [&str; 3] = ["sslrootcert", "ssl-root-cert", "ssl-ca"];

/// Reads a PEM file of CA certificates, refusing one that holds none: the
/// AMQP client would skip what it cannot parse and then trust nothing but
/// the system's CAs, failing every handshake with a less helpful error.
pub fn read_ca_file(path: &Path, setting: &str) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("{setting}: cannot read {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{setting}: {} is not valid PEM: {e}", path.display()))?;
    ensure!(
        !certs.is_empty(),
        "{setting}: {} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
        path.display()
    );
    Ok(pem)
}

/// A CA file setting, with an empty value (as compose passes an unset
/// variable) meaning none.
fn ca_setting(ca_file: Option<&Path>) -> Option<&Path> {
    ca_file.filter(|p| !p.as_os_str().is_empty())
}

fn has_scheme(url: &str, scheme: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// Connection options for `DATABASE_URL`, TLS included. sqlx reads the
/// `sslrootcert` file only when it connects, and a file it cannot read
/// then looks like a database still starting (an I/O error, retried);
/// reading it here turns that into an error at start that names the file.
pub fn pg_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let opts: PgConnectOptions = url
        .parse()
        .context("DATABASE_URL is not a valid Postgres URL")?;
    if let Ok(parsed) = reqwest::Url::parse(url) {
        for (key, value) in parsed.query_pairs() {
            if PG_ROOT_CERT_KEYS.contains(&key.as_ref()) {
                read_ca_file(Path::new(value.as_ref()), "DATABASE_URL sslrootcert")?;
            }
        }
    }
    Ok(opts)
}

/// The Redis client for `REDIS_URL`: with a CA file, a `rediss://` client
/// that trusts only that CA.
pub fn redis_client(url: &str, ca_file: Option<&Path>) -> anyhow::Result<redis::Client> {
    let Some(path) = ca_setting(ca_file) else {
        return redis::Client::open(url).context("REDIS_URL is not a valid Redis URL");
    };
    ensure!(
        has_scheme(url, "rediss"),
        "STEVEDORE_REDIS_CA_FILE is set but REDIS_URL is not a rediss:// URL, \
         so there would be no TLS for the CA to check"
    );
    let pem = read_ca_file(path, "STEVEDORE_REDIS_CA_FILE")?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.into_bytes()),
    };
    redis::Client::build_with_tls(url, certs)
        .context("REDIS_URL with STEVEDORE_REDIS_CA_FILE is not a valid TLS client")
}

/// A self-reconnecting connection from a client of [`redis_client`], for
/// the broker, the analyze kind's shared limits and cache, and the API
/// keys' rates.
pub async fn redis_manager(
    client: redis::Client,
) -> redis::RedisResult<redis::aio::ConnectionManager> {
    // The timeouts keep a stalled network from hanging a call forever. The
    // retries are capped at 1 s apart: the crate's defaults (6 retries, its
    // factor of 100 applied to a 1 s base, up to a minute each) take
    // minutes to report that Redis is down or refused its certificate.
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(3))
        .set_response_timeout(Duration::from_secs(10))
        .set_number_of_retries(2)
        .set_max_delay(1000);
    redis::aio::ConnectionManager::new_with_config(client, cfg).await
}

/// The TLS settings for `AMQP_URL`: the private CA, if any, on top of the
/// system's.
pub fn amqp_tls(url: &str, ca_file: Option<&Path>) -> anyhow::Result<OwnedTLSConfig> {
    let Some(path) = ca_setting(ca_file) else {
        return Ok(OwnedTLSConfig::default());
    };
    ensure!(
        has_scheme(url, "amqps"),
        "STEVEDORE_AMQP_CA_FILE is set but AMQP_URL is not an amqps:// URL, \
         so there would be no TLS for the CA to check"
    );
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain: Some(read_ca_file(path, "STEVEDORE_AMQP_CA_FILE")?),
    })
}

/// Opens one RabbitMQ connection: plain for `amqp://`, TLS for `amqps://`
/// with `tls` (from [`amqp_tls`]).
pub async fn amqp_connect(
    url: &str,
    tls: &OwnedTLSConfig,
    props: lapin::ConnectionProperties,
) -> lapin::Result<lapin::Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    lapin::Connection::connect_with_config(url, props, tls.clone(), runtime).await
}

/// Whether `e`, or an error it wraps, is rustls failing a handshake: a
/// certificate from an unknown CA, for another host, expired, or a server
/// that speaks no TLS the client accepts. An `io::Error` carrying one is
/// looked into too, since that is how sqlx and tokio-rustls report them
/// (and `io::Error::source` skips the error it wraps).
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let e = read_ca_file(&path, "STEVEDORE_REDIS_CA_FILE").expect_err("no certificate");
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = redis_client("rediss://127.0.0.1:1", Some(&missing)).expect_err("missing file");
        assert!(
            e.to_string()
                .contains("STEVEDORE_REDIS_CA_FILE: cannot read"),
            "{e:#}"
        );
        let e = pg_options(&format!(
            "postgres://u@127.0.0.1/db?sslmode=verify-full&sslrootcert={}",
            missing.display()
        ))
        .expect_err("missing sslrootcert");
        assert!(e.to_string().contains("DATABASE_URL sslrootcert"), "{e:#}");
    }

    #[test]
    fn a_ca_file_needs_a_tls_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        let e = redis_client("redis://127.0.0.1:6379", Some(&path)).expect_err("plain URL");
        assert!(e.to_string().contains("not a rediss:// URL"), "{e}");
        let e = amqp_tls("amqp://127.0.0.1:5672/%2f", Some(&path)).expect_err("plain URL");
        assert!(e.to_string().contains("not an amqps:// URL"), "{e}");
        // An empty setting is no setting (compose passes unset variables so).
        assert!(redis_client("redis://127.0.0.1:6379", Some(Path::new(""))).is_ok());
        assert!(amqp_tls("amqp://h/%2f", Some(Path::new("")))
            .is_ok_and(|t| t == OwnedTLSConfig::default()));
    }
}
