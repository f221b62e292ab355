//! One way to run a child process: output lines (stderr and stdout) collected, an optional tap
//! that sees every line as it comes, a wait for a ready line with a deadline, signals, and the
//! process killed and its private state folder removed on drop.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// Proxy settings a child never inherits: every harness process talks to 127.0.0.1 only, and a
/// proxy set in the runner's environment must not catch that traffic (tests about proxies set
/// these themselves, through `env`).
pub const PROXY_VARS: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Sees every output line of a process as it is read, and the end of its output.
pub trait Tap: Send + Sync + 'static {
    /// One line (without its newline).
    fn line(&self, line: &str);
    /// Both output streams have ended (the process exited or closed them).
    fn end(&self) {}
}

impl<F: Fn(&str) + Send + Sync + 'static> Tap for F {
    fn line(&self, line: &str) {
        self(line)
    }
}

/// How a process is run beyond its arguments and environment.
#[derive(Clone)]
pub struct ProcOptions {
    /// `HYCO_LOG` for the child.
    pub log: String,
    /// Output lines kept for [`Proc::lines`] and [`Proc::ready`]; the oldest go first. Tests
    /// keep everything; a long run keeps a window so its memory stays flat.
    pub keep: usize,
    /// Also echo every line to stderr with the name in front when `HYCO_TEST_ECHO` is set.
    pub echo_env: bool,
    /// Called with every line.
    pub tap: Option<Arc<dyn Tap>>,
}

impl Default for ProcOptions {
    /// What tests use: the relay's debug lines, every line kept, `HYCO_TEST_ECHO` honoured.
    fn default() -> Self {
        ProcOptions {
            log: "info,hyco_relay=debug".into(),
            keep: usize::MAX,
            echo_env: true,
            tap: None,
        }
    }
}

impl ProcOptions {
    /// For long runs (bench, soak): `log` as `HYCO_LOG`, the last 200 lines kept.
    pub fn long_run(log: &str) -> ProcOptions {
        ProcOptions {
            log: log.into(),
            keep: 200,
            echo_env: false,
            tap: None,
        }
    }

    /// With `tap` seeing every line.
    pub fn tap(mut self, tap: impl Tap) -> ProcOptions {
        self.tap = Some(Arc::new(tap));
        self
    }
}

/// A process did not print its ready line in time.
#[derive(Debug)]
pub struct NotReady {
    /// What it is.
    pub name: String,
    /// The text waited for.
    pub needle: String,
    /// How long.
    pub within: Duration,
    /// The lines it printed (those kept).
    pub output: Vec<String>,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: no line containing {:?} within {:?}; output:\n{}",
            self.name,
            self.needle,
            self.within,
            self.output.join("\n")
        )
    }
}

impl std::error::Error for NotReady {}

/// The lines kept, and a signal for each new one.
struct Lines {
    kept: Mutex<VecDeque<String>>,
    keep: usize,
    changed: Notify,
}

impl Lines {
    fn push(&self, l: String) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= self.keep {
            kept.pop_front();
        }
        kept.push_back(l);
        drop(kept);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> Vec<String> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter().cloned().collect()
    }
}

/// A child process whose output lines are collected; killed when dropped.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    lines: Arc<Lines>,
    /// This process's own `HYCO_STATE_DIR` (a manager's state file and control socket), so
    /// that managers of parallel runs never share one; removed on drop.
    pub state_dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

static SPAWNED: AtomicU64 = AtomicU64::new(0);

impl Proc {
    /// Starts `bin args…` with extra environment variables, as tests do; panics when it
    /// cannot start.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start(name, bin, args, env, ProcOptions::default())
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    }

    /// Starts `bin args…` with extra environment variables (they win over the harness's own:
    /// `HYCO_LOG`, `HYCO_STATE_DIR`, the removed proxy variables).
    pub fn start(
        name: &str,
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        opts: ProcOptions,
    ) -> std::io::Result<Proc> {
        let state_dir = std::env::temp_dir().join(format!(
            "hyco-state-{}-{}",
            std::process::id(),
            SPAWNED.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("HYCO_LOG", &opts.log)
            .env("HYCO_STATE_DIR", &state_dir)
            .kill_on_drop(true);
        for v in PROXY_VARS {
            cmd.env_remove(v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let lines = Arc::new(Lines {
            kept: Mutex::new(VecDeque::new()),
            keep: opts.keep.max(1),
            changed: Notify::new(),
        });
        let outs = [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ];
        let echo = opts.echo_env && std::env::var_os("HYCO_TEST_ECHO").is_some();
        // The tap's end comes once, after both streams: the last reader to finish calls it.
        let readers = Arc::new(AtomicU64::new(0));
        for out in outs.into_iter().flatten() {
            readers.fetch_add(1, Ordering::Relaxed);
            let (lines, tap, readers) = (Arc::clone(&lines), opts.tap.clone(), readers.clone());
            let tag = name.to_owned();
            tokio::spawn(async move {
                let mut r = BufReader::new(out).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    if echo {
                        eprintln!("[{tag}] {l}");
                    }
                    if let Some(t) = &tap {
                        t.line(&l);
                    }
                    lines.push(l);
                }
                if readers.fetch_sub(1, Ordering::AcqRel) == 1 {
                    if let Some(t) = &tap {
                        t.end();
                    }
                }
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines,
            state_dir,
        })
    }

    /// All output lines so far (those kept).
    pub fn lines(&self) -> Vec<String> {
        self.lines.snapshot()
    }

    /// Number of output lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a line containing `needle`; returns it, or what the process printed instead.
    pub async fn ready(&self, needle: &str, within: Duration) -> Result<String, NotReady> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.lines.changed.notified();
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(NotReady {
                    name: self.name.clone(),
                    needle: needle.to_owned(),
                    within,
                    output: self.lines(),
                });
            }
        }
    }

    /// Waits for a line containing `needle`; returns it. Panics with the output when none
    /// comes within `within`.
    pub async fn wait_line(&self, needle: &str, within: Duration) -> String {
        self.ready(needle, within)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM without waiting.
    pub async fn signal_term(&self) {
        self.signal("TERM").await;
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, …) without waiting.
    pub async fn signal(&self, name: &str) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(pid.to_string())
                .status()
                .await;
        }
    }

    /// SIGTERM (graceful), then wait for exit up to `within`.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal_term().await;
        self.wait_exit(within).await
    }

    /// SIGTERM, wait up to `within`, then SIGKILL: the process is gone afterwards.
    pub async fn stop(&mut self, within: Duration) {
        if self.terminate(within).await.is_none() {
            self.kill().await;
        }
    }

    /// Waits for exit and returns the status.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}
