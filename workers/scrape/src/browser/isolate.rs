//! What stands between a page and the worker's host, decided once per
//! process: Chromium's own network namespace (root or CAP_SYS_ADMIN), an
//! unprivileged user when the worker runs as root, Chromium's sandbox where
//! the kernel lets that user create user namespaces, and always a scrubbed
//! environment (the worker's holds DATABASE_URL, REDIS_URL, AMQP_URL,
//! OPENAI_API_KEY and STEVEDORE_* secrets; a renderer exploit that reads its
//! own environ must find none of them).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::netns::Netns;

/// Environment variables Chromium may inherit: locale, time zone and font
/// configuration, nothing that names a service or holds a secret.
const PASSED_THROUGH: &[&str] = &[
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "FONTCONFIG_FILE",
    "FONTCONFIG_PATH",
];

const SETPRIV: &[&str] = &["/usr/bin/setpriv", "/bin/setpriv"];
const NSENTER: &[&str] = &["/usr/bin/nsenter", "/bin/nsenter"];
const UNSHARE: &[&str] = &["/usr/bin/unshare", "/bin/unshare"];

fn first_existing(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.exists())
}

#[derive(Debug, Clone)]
pub struct Isolation {
    /// Whether each browser gets its own network namespace.
    pub netns: bool,
    /// The user and group Chromium runs as, when the worker is root.
    pub run_as: Option<(u32, u32)>,
    /// Chromium's own sandbox (needs unprivileged user namespaces for the
    /// user it runs as).
    pub sandbox: bool,
    setpriv: Option<PathBuf>,
    nsenter: Option<PathBuf>,
}

impl Isolation {
    /// Tries each piece on this machine and says at start what is missing.
    pub fn probe() -> Self {
        let setpriv = first_existing(SETPRIV);
        let nsenter = first_existing(NSENTER);
        let root = nix::unistd::geteuid().is_root();
        let run_as = (root && setpriv.is_some()).then(unprivileged_user);
        let netns = match (&nsenter, Netns::create()) {
            (Some(_), Ok(_)) => true,
            (None, _) => {
                tracing::warn!("nsenter not found: Chromium shares the worker's network; pages are held back by the filtering proxy alone");
                false
            }
            (_, Err(e)) => {
                tracing::warn!(error = %e, "no network namespace for Chromium (needs root or CAP_SYS_ADMIN): pages are held back by the filtering proxy alone");
                false
            }
        };
        let sandbox = user_namespaces_allowed(setpriv.as_deref(), run_as);
        if root && run_as.is_none() {
            tracing::warn!("setpriv not found: Chromium runs as root, without its sandbox");
        } else if !sandbox {
            tracing::warn!("unprivileged user namespaces are not allowed here: Chromium runs without its sandbox");
        }
        tracing::info!(netns, ?run_as, sandbox, "browser isolation");
        Self {
            netns,
            run_as,
            sandbox,
            setpriv,
            nsenter,
        }
    }

    /// The command that starts `chrome`: entering `ns`, as the unprivileged
    /// user, with a parent-death signal (a worker killed outright must not
    /// leave browsers behind) and nothing of the worker's environment.
    pub fn command(
        &self,
        chrome: &Path,
        ns: Option<&Netns>,
        home: &Path,
    ) -> tokio::process::Command {
        let mut argv: Vec<OsString> = Vec::new();
        if let (Some(ns), Some(nsenter)) = (ns, &self.nsenter) {
            argv.push(nsenter.into());
            argv.push(format!("--net={}", ns.path().display()).into());
            argv.push("--".into());
        }
        if let Some(setpriv) = &self.setpriv {
            argv.push(setpriv.into());
            argv.extend(["--pdeathsig".into(), "KILL".into()]);
            if let Some((uid, gid)) = self.run_as {
                argv.push(format!("--reuid={uid}").into());
                argv.push(format!("--regid={gid}").into());
                argv.push("--clear-groups".into());
            }
            argv.push("--".into());
        }
        argv.push(chrome.into());
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in PASSED_THROUGH {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd
    }
}

/// `nobody`, or 65534 where it has no entry.
fn unprivileged_user() -> (u32, u32) {
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
        _ => (65534, 65534),
    }
}

/// Whether the user Chromium runs as may create a user namespace, which
/// is what Chromium's sandbox needs (Debian's package has no setuid helper).
fn user_namespaces_allowed(setpriv: Option<&Path>, run_as: Option<(u32, u32)>) -> bool {
    let Some(unshare) = first_existing(UNSHARE) else {
        return false;
    };
    let mut cmd = match (setpriv, run_as) {
        (Some(setpriv), Some((uid, gid))) => {
            let mut c = std::process::Command::new(setpriv);
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(&unshare);
            c
        }
        // Root without a way to drop privileges: Chromium refuses to run
        // its sandbox as root.
        (None, _) if nix::unistd::geteuid().is_root() => return false,
        _ => std::process::Command::new(&unshare),
    };
    cmd.args(["--user", "true"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
