//! The process harness that tests, the bench and the soak run share, and test helpers: run
//! the real `hyco` binary (or any other) as processes ([`Proc`]), `hyco admin` against a relay
//! ([`Admin`]), commands with a deadline ([`run`]), what a process holds ([`rss_kib`],
//! [`open_fds`]), TCP echo servers, bounded waits.
//!
//! Every wait here has a deadline and reports what it was waiting for when it runs out; no
//! helper sleeps in place of a readiness signal. Its only dependency is tokio, so the bench
//! and the soak carry nothing test-only by using it.
#![forbid(unsafe_code)]

mod command;
mod proc;
mod usage;

pub use command::{run, try_run, Admin, AdminError, Output, RunError};
pub use proc::{NotReady, Proc, ProcOptions, Tap, PROXY_VARS};
pub use usage::{open_fds, rss_kib};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Extracts `key=value` (value up to whitespace, quotes trimmed) from a log line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_owned())
}

/// A TCP echo server: echoes until the client half-closes, then half-closes too.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A port with nothing listening on it (bound, then released).
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

/// Retries `check` every 50 ms until it returns true, at most `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads exactly `n` bytes or to EOF, whichever first.
pub async fn read_up_to<R: tokio::io::AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let _ = r.take(n as u64).read_to_end(&mut out).await;
    out
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh folder under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "hyco-test-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The command prefix that runs a program in `dir` as an unprivileged user: when this process
/// is root, `dir` is given to `nobody` (uid and gid 65534) and the program runs as `nobody`
/// through `setpriv`, as services such as PostgreSQL require; otherwise as this user. The
/// program starts in `dir`, since the caller's own folder may be closed to `nobody`.
pub fn unprivileged_in(dir: &std::path::Path) -> std::io::Result<Vec<String>> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    let mut prefix: Vec<String> = Vec::new();
    if root {
        std::os::unix::fs::chown(dir, Some(65534), Some(65534))?;
        prefix.extend(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
            ]
            .map(String::from),
        );
    }
    prefix.extend(["env".into(), "-C".into(), dir.display().to_string()]);
    Ok(prefix)
}
