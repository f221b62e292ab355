//! The hyco processes: start one (through the shared harness, `hyco_testkit::Proc`) and wait
//! for its ready line, SIGKILL it, restart it, read its RSS and descriptor count from /proc, and
//! tally its log lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyco_testkit::{Proc, ProcOptions, Tap};

/// Most distinct log keys kept per process role.
const MAX_LOG_KEYS: usize = 200;

/// Counts of log lines by level and message (digits folded), per role.
#[derive(Default)]
pub struct LogTally {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl LogTally {
    fn add(&self, line: &str) {
        let Some(key) = log_key(line) else { return };
        if let Ok(mut m) = self.counts.lock() {
            if !m.contains_key(&key) && m.len() >= MAX_LOG_KEYS {
                *m.entry("(other)".into()).or_default() += 1;
            } else {
                *m.entry(key).or_default() += 1;
            }
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// `LEVEL message [| error or outcome]` for a tracing text line, digits folded to `#` so ids
/// and ports do not make every line distinct; `None` for lines not worth counting.
pub fn log_key(line: &str) -> Option<String> {
    if line.contains("SharedAccessKey") {
        // The relay prints its root connection string once; keys stay out of reports.
        return None;
    }
    let mut it = line.split_whitespace();
    let _time = it.next()?;
    let level = it.next()?;
    if !matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR") {
        return Some(format!(
            "(unparsed) {}",
            fold(&line.chars().take(80).collect::<String>())
        ));
    }
    // Spans (`name{field=…}:`) may come before the target (`crate::module:`); the message
    // follows the target.
    let is_target = |w: &str| {
        w.len() > 1
            && w.ends_with(':')
            && w[..w.len() - 1]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut it = it.skip_while(|w| !is_target(w));
    it.next()?;
    let msg: Vec<&str> = it.take_while(|w| !w.contains('=')).collect();
    let mut key = format!("{level} {}", msg.join(" "));
    let tail = ["error=", "reason=", "outcome=", "status="]
        .iter()
        .find_map(|k| line.find(&format!(" {k}")).map(|i| &line[i + 1..]));
    if let Some(t) = tail {
        if level != "INFO" || t.starts_with("outcome=") {
            let t: String = t.chars().take(100).collect();
            key.push_str(" | ");
            key.push_str(&fold(&t));
        }
    }
    Some(key)
}

fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out
}

/// RSS (KiB) and open descriptors of a process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
}

impl Usage {
    /// Reads /proc/PID; zeros for a process that is gone.
    pub fn of(pid: u32) -> Usage {
        Usage {
            pid,
            rss_kib: hyco_testkit::rss_kib(pid),
            fds: hyco_testkit::open_fds(pid),
        }
    }

    /// As JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"pid": self.pid, "rss_kib": self.rss_kib, "fds": self.fds})
    }
}

/// One hyco process that can be killed and started again with the same arguments.
pub struct Managed {
    pub role: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ready: String,
    proc: Option<Proc>,
    /// The output line that said it was ready.
    pub ready_line: String,
    pub log: Arc<LogTally>,
    /// Starts so far.
    pub starts: u64,
    /// Every output line also goes here (restarts append).
    file: Option<Arc<Mutex<std::io::BufWriter<std::fs::File>>>>,
}

impl Managed {
    /// A process description; nothing runs until [`Managed::start`].
    pub fn new(
        role: &str,
        bin: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        ready: &str,
    ) -> Managed {
        Managed {
            role: role.into(),
            bin,
            args,
            env,
            ready: ready.into(),
            proc: None,
            ready_line: String::new(),
            log: Arc::new(LogTally::default()),
            starts: 0,
            file: None,
        }
    }

    /// Keeps the full output in `path` (created or truncated now).
    pub fn log_to(&mut self, path: Option<PathBuf>) -> Result<()> {
        if let Some(p) = path {
            let f =
                std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            self.file = Some(Arc::new(Mutex::new(std::io::BufWriter::new(f))));
        }
        Ok(())
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Replaces the arguments used by later starts.
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// Starts it and waits (at most `within`) for an output line containing the ready text.
    pub async fn start(&mut self, within: Duration) -> Result<()> {
        if self.proc.is_some() {
            bail!("{} is already running", self.role);
        }
        self.starts += 1;
        let tap = Sink {
            log: Arc::clone(&self.log),
            file: self.file.clone(),
            tag: format!("[{} #{}] ", self.role, self.starts),
        };
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let opts = ProcOptions::long_run("info").tap(tap);
        let proc = Proc::start(&self.role, &self.bin, &args, &env, opts)
            .with_context(|| format!("cannot start {} ({})", self.role, self.bin.display()))?;
        let ready = proc.ready(&self.ready, within).await;
        self.proc = Some(proc);
        match ready {
            Ok(l) => {
                self.ready_line = l;
                Ok(())
            }
            Err(e) => {
                self.kill().await;
                Err(e.into())
            }
        }
    }

    /// SIGKILL, and reap it.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), p.kill()).await;
        }
    }

    /// SIGTERM, wait up to `within`, then SIGKILL.
    pub async fn stop(&mut self, within: Duration) {
        if let Some(p) = self.proc.as_mut() {
            p.stop(within).await;
        }
        self.kill().await;
    }
}

/// Where a process's output lines go besides the harness: the tally, and the log file (lines
/// with a key left out).
struct Sink {
    log: Arc<LogTally>,
    file: Option<Arc<Mutex<std::io::BufWriter<std::fs::File>>>>,
    tag: String,
}

impl Tap for Sink {
    fn line(&self, l: &str) {
        self.log.add(l);
        if let Some(f) = &self.file {
            if !l.contains("SharedAccessKey") {
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(f, "{}{l}", self.tag);
            }
        }
    }

    fn end(&self) {
        if let Some(f) = &self.file {
            let _ = f.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
    }
}

/// The `host:port` value of `key=` in a log line, as a port.
pub fn port_field(line: &str, key: &str) -> Option<u16> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let v = line[start..].split_whitespace().next()?;
    v.trim_matches('"').rsplit(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys() {
        assert_eq!(
            log_key("2026-01-01T00:00:00.1Z  WARN hyco_client::forward: tunnel not opened role=\"sender\" hc=soak peer=127.0.0.1:5555 error=rejected (404): no listener 12"),
            Some("WARN tunnel not opened | error=rejected (#): no listener #".into())
        );
        assert_eq!(
            log_key("2026-01-01T00:00:00.1Z  INFO hyco_manager: connection served role=\"listener\" hc=soak id=ab12 outcome=closed"),
            Some("INFO connection served | outcome=closed".into())
        );
        assert_eq!(
            log_key("2026-01-01T00:00:00.1Z  INFO hyco_client::listener: listener connected hc=soak error=x"),
            Some("INFO listener connected".into())
        );
        assert_eq!(
            log_key("2026-01-01T00:00:00.1Z  INFO tunnel{id=ab hc=soak}: hyco_relay::service: tunnel open event=x"),
            Some("INFO tunnel open".into())
        );
        assert_eq!(
            log_key("Endpoint=sb://h/;SharedAccessKeyName=r;SharedAccessKey=k"),
            None
        );
        assert_eq!(
            port_field(
                "x INFO hyco: relay listening listen=127.0.0.1:4321 data=/tmp",
                "listen"
            ),
            Some(4321)
        );
        assert_eq!(
            port_field("forwarding local=\"127.0.0.1:99\"", "local"),
            Some(99)
        );
        assert_eq!(port_field("nothing", "local"), None);
    }
}
