//! `hyco manager add|list|show|remove|restart|test|logs`: the commands that talk to a running
//! `hyco manager run` over its control socket, and the log tee that feeds `logs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use hyco_manager::logs::LogBuffer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use hyco_proto::escape::Escaped;

use crate::usage;

/// Where the manager keeps its state file and control socket.
#[derive(Args, Clone)]
pub struct StateDirArg {
    /// Folder of the state file (`manager-state.json`, the connection strings added at run
    /// time) and the control socket (`manager.sock`). Default: /var/lib/hyco as root, else
    /// $XDG_STATE_HOME/hyco or ~/.local/state/hyco.
    #[arg(long, env = "HYCO_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

impl StateDirArg {
    /// The folder, defaulted.
    pub fn dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if euid() == Some(0) {
            return PathBuf::from("/var/lib/hyco");
        }
        if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("hyco");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local/state/hyco"),
            None => PathBuf::from(".hyco-state"),
        }
    }

    /// The control socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir().join("manager.sock")
    }

    /// The state file's path.
    pub fn state_file(&self) -> PathBuf {
        self.dir().join("manager-state.json")
    }

    /// Creates the folder (mode 0700) if needed; refuses one (or a state file) that other
    /// users can read, with the `chmod` that fixes it, and one that another user owns:
    /// whoever can write there can replace the control socket and receive the connection
    /// strings `hyco manager add` sends.
    pub fn ensure(&self) -> Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let d = self.dir();
        hyco_io::private::ensure_dir(&d).map_err(|e| usage(format!("state folder: {e}")))?;
        let meta = std::fs::metadata(&d)
            .with_context(|| format!("cannot read the state folder {}", d.display()))?;
        let me = euid().context("cannot tell this process's user id from /proc/self/status")?;
        if meta.uid() != me {
            bail!(
                "the state folder {} belongs to user id {}, not to this user ({me}); \
                 use a folder of your own (--state-dir) or `chown {me} {}`",
                d.display(),
                meta.uid(),
                d.display()
            );
        }
        Ok(d)
    }
}

/// This process's effective user id, as /proc/self/status tells (no `unsafe` needed).
fn euid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// The commands that talk to a running manager.
#[derive(Subcommand)]
pub enum ClientCmd {
    /// Serve one more hybrid connection (kept in the state file across restarts).
    Add {
        /// Connection string with EntityPath and a Listen key. `-` reads it from stdin, which
        /// keeps it out of the process list and shell history.
        connection_string: String,
        /// The endpoint speaks HTTP: requests to `https://RELAY/HC/…` are forwarded to it as
        /// HTTP/1.1 (HTTP mode). Without it they are answered 501; tunnels work either way.
        #[arg(long)]
        http: bool,
        /// Use this endpoint instead of the hybrid connection's user metadata: `HOST:PORT`, or
        /// `unix:/PATH` for a Unix socket (only ever from here or the configuration file).
        #[arg(long, value_name = "HOST:PORT|unix:/PATH")]
        endpoint: Option<String>,
    },
    /// Every hybrid connection with its state.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One hybrid connection in detail (the relay's listener count is re-read).
    Show {
        /// Name.
        hc: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop serving a hybrid connection (open tunnels finish on their own).
    Remove {
        /// Name.
        hc: String,
    },
    /// Reconnect a hybrid connection's listener (the endpoint is read again).
    Restart {
        /// Name.
        hc: String,
    },
    /// End to end: relay, this manager's listener, a tunnel through it to the endpoint.
    Test {
        /// Name.
        hc: String,
        /// A connection string with Send, when the manager's key has no Send right.
        #[arg(long, env = "HYCO_SEND_CONNECTION_STRING", hide_env_values = true)]
        send_connection_string: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The manager's recent log lines.
    Logs {
        /// How many recent lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
}

/// Connects to the control socket and checks who serves it: the socket's owner (its peer's
/// `SO_PEERCRED` uid) must be this user or root, or nothing is sent, since a request may carry
/// a connection string with its key.
async fn connect(socket: &Path) -> Result<tokio::net::UnixStream> {
    let conn = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow!(
            "no manager is running with its control socket at {} ({e}); start `hyco manager run` (same --state-dir)",
            socket.display()
        )
    })?;
    let peer = conn
        .peer_cred()
        .with_context(|| format!("cannot tell who serves {}", socket.display()))?
        .uid();
    let me = euid().context("cannot tell this process's user id from /proc/self/status")?;
    if peer != me && peer != 0 {
        bail!(
            "the control socket {} is served by user id {peer}, not by this user ({me}) or root: \
             nothing was sent. Another user may have replaced it; check the state folder",
            socket.display()
        );
    }
    Ok(conn)
}

/// Sends one request; returns the answer lines as they come (`each` sees every line).
async fn request(
    socket: &Path,
    req: &Value,
    mut each: impl FnMut(Value) -> Result<()>,
) -> Result<()> {
    let (r, mut w) = connect(socket).await?.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        let v: Value = serde_json::from_str(&l).context("the manager's answer is not JSON")?;
        if let Some(e) = v["error"].as_str() {
            bail!("{}", Escaped(e));
        }
        each(v)?;
    }
    Ok(())
}

/// The one answer to a request: a JSON object. No answer at all is an error.
async fn one(socket: &Path, req: Value) -> Result<Value> {
    let mut out = Value::Null;
    request(socket, &req, |v| {
        out = v;
        Ok(())
    })
    .await?;
    match out {
        Value::Object(_) => Ok(out),
        Value::Null => bail!(
            "no answer on {}: the connection closed without a reply (is a manager running there?)",
            socket.display()
        ),
        _ => bail!("the manager's answer is not a JSON object"),
    }
}

/// The string `key` of an answer, which must be there.
fn answer<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v[key]
        .as_str()
        .ok_or_else(|| anyhow!("the manager's answer has no '{key}'"))
}

/// A string of an answer for a terminal: control characters escaped.
fn text(v: &Value, default: &str) -> String {
    hyco_proto::escape::escaped(v.as_str().unwrap_or(default))
}

fn row(h: &Value) {
    let state = match h["detail"].as_str() {
        Some(d) if h["state"] != "Connected" => {
            format!("{} ({})", text(&h["state"], "?"), Escaped(d))
        }
        _ => text(&h["state"], "?"),
    };
    println!(
        "{:<24} {:<24} {:>6} {:>8} {:>12}  {}",
        text(&h["name"], "?"),
        text(&h["endpoint"], "-"),
        h["relayListeners"]
            .as_i64()
            .map_or("-".into(), |n| n.to_string()),
        h["connections"].as_u64().unwrap_or(0),
        h["bytes"].as_u64().unwrap_or(0),
        state
    );
}

fn header() {
    println!(
        "{:<24} {:<24} {:>6} {:>8} {:>12}  STATE",
        "HYBRID CONNECTION", "ENDPOINT", "RELAY", "SERVED", "BYTES"
    );
}

/// Runs one client command against the manager at `state`.
pub async fn run(cmd: ClientCmd, state: &StateDirArg) -> Result<()> {
    let socket = state.socket();
    match cmd {
        ClientCmd::Add {
            connection_string,
            http,
            endpoint,
        } => {
            let cs = if connection_string == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_line(&mut s)
                    .context("cannot read the connection string from stdin")?;
                s.trim().to_owned()
            } else {
                connection_string
            };
            // Check it here too, for a clear usage error before anything is sent.
            let parsed = hyco_proto::ConnectionString::parse(&cs)
                .map_err(|e| usage(format!("connection string: {e}")))?;
            if parsed.entity_path.is_none() {
                return Err(usage("the connection string has no EntityPath"));
            }
            if let Some(e) = &endpoint {
                e.parse::<hyco_manager::Endpoint>()
                    .map_err(|e| usage(format!("--endpoint: {e}")))?;
            }
            let v = one(
                &socket,
                json!({"cmd": "add", "connectionString": cs, "http": http, "endpoint": endpoint}),
            )
            .await?;
            eprintln!("added {}", Escaped(answer(&v, "added")?));
        }
        ClientCmd::List { json } => {
            let v = one(&socket, json!({"cmd": "list"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                header();
                for h in v["hybridConnections"].as_array().into_iter().flatten() {
                    row(h);
                }
            }
        }
        ClientCmd::Show { hc, json } => {
            let v = one(&socket, json!({"cmd": "show", "hc": hc})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (label, key) in [
                    ("hybrid connection", "name"),
                    ("state", "state"),
                    ("detail", "detail"),
                    ("endpoint", "endpoint"),
                    ("mode", "mode"),
                    ("listener id", "listenerId"),
                    ("listeners on the relay", "relayListeners"),
                    ("open connections", "activeConnections"),
                    ("connections served", "connections"),
                    ("senders rejected", "rejected"),
                    ("bytes", "bytes"),
                    ("last error", "lastError"),
                ] {
                    let val = match &v[key] {
                        Value::Null => "-".to_owned(),
                        Value::String(s) => hyco_proto::escape::escaped(s),
                        other => other.to_string(),
                    };
                    println!("{label:<24} {val}");
                }
            }
        }
        ClientCmd::Remove { hc } => {
            let v = one(&socket, json!({"cmd": "remove", "hc": hc})).await?;
            eprintln!("removed {}", Escaped(answer(&v, "removed")?));
        }
        ClientCmd::Restart { hc } => {
            let v = one(&socket, json!({"cmd": "restart", "hc": hc})).await?;
            eprintln!("restarted {}", Escaped(answer(&v, "restarted")?));
        }
        ClientCmd::Test {
            hc,
            send_connection_string,
            json,
        } => {
            let v = one(
                &socket,
                json!({"cmd": "test", "hc": hc, "sendConnectionString": send_connection_string}),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for s in v["steps"].as_array().into_iter().flatten() {
                    println!(
                        "{} {:<9} {}",
                        if s["ok"].as_bool() == Some(true) {
                            "ok  "
                        } else {
                            "FAIL"
                        },
                        text(&s["step"], "?"),
                        text(&s["detail"], "")
                    );
                }
            }
            if v["ok"].as_bool() != Some(true) {
                bail!("test of {} failed", text(&v["hybridConnection"], "?"));
            }
        }
        ClientCmd::Logs { lines, follow } => {
            let stdout = std::io::stdout();
            request(
                &socket,
                &json!({"cmd": "logs", "lines": lines, "follow": follow}),
                |v| {
                    let mut out = stdout.lock();
                    writeln!(out, "{}", text(&v["line"], ""))?;
                    out.flush()?;
                    Ok(())
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// The log writer: every formatted line goes to stderr and, without colour codes, to the
/// manager's [`LogBuffer`].
#[derive(Clone)]
pub struct Tee(pub Arc<LogBuffer>);

/// One event's writer; the line is handed on when it is dropped.
pub struct TeeWriter {
    buf: Vec<u8>,
    logs: Arc<LogBuffer>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter {
            buf: Vec::with_capacity(256),
            logs: Arc::clone(&self.0),
        }
    }
}

impl Write for TeeWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let _ = std::io::stderr().lock().write_all(&self.buf);
        let text = strip_ansi(&String::from_utf8_lossy(&self.buf));
        for line in text.lines() {
            self.logs.push(line);
        }
    }
}

/// Removes `ESC [ … letter` sequences (the colours of terminal output).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "time  INFO x"
        );
    }
}
