//! A TCP fault proxy for the network drills (no `tc netem` here): workers
//! connect to a service through it, and the drill switches it between
//! passing traffic, adding latency, cutting (holding every byte until the
//! cut ends, as a dead link would), and resetting every connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Pass,
    Latency(Duration),
    Cut,
    Reset,
}

pub struct FaultProxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (tx, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(tx);
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream_port, m.subscribe()));
            }
        });
        Self { port, mode, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits while the link is cut; false when the connection must be reset.
async fn gate(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Reset => return false,
            Mode::Cut => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
            Mode::Latency(d) => {
                tokio::time::sleep(d).await;
                return true;
            }
            Mode::Pass => return true,
        }
    }
}

async fn serve(client: TcpStream, upstream_port: u16, mut mode: watch::Receiver<Mode>) {
    if !gate(&mut mode).await {
        drop(client);
        return;
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let a = tokio::spawn(pump(cr, uw, mode.clone()));
    let b = tokio::spawn(pump(ur, cw, mode.clone()));
    // When either direction ends (or a reset), tear both down so the peer
    // sees the connection go away.
    tokio::select! {
        _ = a => {},
        _ = b => {},
        () = async {
            while mode.changed().await.is_ok() {
                if *mode.borrow() == Mode::Reset {
                    return;
                }
            }
        } => {},
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !gate(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
