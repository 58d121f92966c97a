//! Chromium's own network namespace: only a loopback interface, on which
//! the worker binds the job proxies (a socket keeps the namespace it was
//! created in), so the only endpoints a page, or a renderer exploit, can
//! reach are those proxies. The worker reaches Chromium's DevTools port the
//! same way: a socket opened inside the namespace.
//!
//! Each operation runs on a short-lived thread of its own: `setns` switches
//! the calling thread, and a runtime thread left in Chromium's namespace
//! would quietly move every later connection of the worker there.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sched::{setns, unshare, CloneFlags};

/// A network namespace held open by a descriptor of this process.
pub struct Netns {
    handle: File,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("path", &self.path()).finish()
    }
}

fn on_own_thread<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("stevedore-netns".into())
        .spawn(f)?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

impl Netns {
    /// A fresh namespace with `lo` up. Fails without CAP_SYS_ADMIN (a
    /// container without the capability, a worker not run as root) or
    /// without `ip` to bring loopback up.
    pub fn create() -> io::Result<Self> {
        let handle = on_own_thread(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            // A child started from this thread inherits its namespace.
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .env_clear()
                .status()?;
            if !up.success() {
                return Err(io::Error::other(format!("ip link set lo up: {up}")));
            }
            File::open("/proc/thread-self/ns/net")
        })?;
        Ok(Self { handle })
    }

    /// The namespace of a running process (`/proc/<pid>/ns/net`): tests
    /// connect from inside the browser's, as a renderer exploit would.
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        Ok(Self {
            handle: File::open(path)?,
        })
    }

    /// Where `nsenter --net=` finds this namespace while the worker runs.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.handle.as_raw_fd()
        ))
    }

    fn enter(&self) -> io::Result<File> {
        self.handle.try_clone()
    }

    /// Another handle on the same namespace (for a task that outlives a
    /// borrow).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            handle: self.enter()?,
        })
    }

    /// A listener inside the namespace, made ready for tokio.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let ns = self.enter()?;
        let l = on_own_thread(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            TcpListener::bind(addr)
        })?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// A connection opened inside the namespace, made ready for tokio.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let ns = self.enter()?;
        let s = on_own_thread(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// A loopback listener in the worker's own namespace or in `ns`.
pub fn listener(ns: Option<&Netns>) -> io::Result<TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    match ns {
        Some(ns) => ns.bind(addr),
        None => {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        }
    }
}
