//! The manager's control socket: how `hyco manager add|list|show|remove|restart|test|logs`
//! reach the running service.
//!
//! A Unix socket in the state folder (folder mode 0700, socket 0600: only the service's user
//! and root can use it, as the keys it accepts deserve). One JSON request per connection, one
//! line; answers are JSON lines: one, or for `logs --follow` one per log line until the client
//! hangs up. Errors are `{"error": "…"}`.

use std::path::Path;
use std::sync::Arc;

use hyco_io::CancellationToken;
use hyco_proto::ConnectionString;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::logs::LogBuffer;
use crate::Manager;

/// A request on the control socket.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// Every hybrid connection's state.
    List,
    /// One hybrid connection, with the relay's listener count re-read.
    Show {
        /// Name.
        hc: String,
    },
    /// Start serving a hybrid connection and keep it in the state file.
    Add {
        /// Connection string with EntityPath and a Listen key.
        #[serde(rename = "connectionString")]
        connection_string: String,
        /// The endpoint speaks HTTP (HTTP mode on).
        #[serde(default)]
        http: bool,
        /// Replaces the user metadata's endpoint (`host:port` or `unix:/path`).
        #[serde(default)]
        endpoint: Option<String>,
    },
    /// Stop serving a hybrid connection.
    Remove {
        /// Name.
        hc: String,
    },
    /// Reconnect a hybrid connection's listener.
    Restart {
        /// Name.
        hc: String,
    },
    /// End-to-end test.
    Test {
        /// Name.
        hc: String,
        /// A connection string with Send, when the manager's key has none.
        #[serde(rename = "sendConnectionString", default)]
        send_connection_string: Option<String>,
    },
    /// Recent log lines, and new ones when following.
    Logs {
        /// How many recent lines.
        #[serde(default = "default_lines")]
        lines: usize,
        /// Keep sending new lines.
        #[serde(default)]
        follow: bool,
    },
}

fn default_lines() -> usize {
    100
}

/// Binds the control socket at `path`. A stale socket file from a previous run is replaced; a
/// live one (another manager on the same state folder) is an error.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another manager is running on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(listener)
}

/// Serves the bound control socket until `shutdown`, then removes its file.
pub async fn serve(
    listener: UnixListener,
    path: std::path::PathBuf,
    manager: Arc<Manager>,
    logs: Arc<LogBuffer>,
    shutdown: CancellationToken,
) {
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (m, l, s) = (Arc::clone(&manager), Arc::clone(&logs), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = session(conn, m, l, s).await {
                debug!(error = %e, "control session ended");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn session(
    conn: UnixStream,
    m: Arc<Manager>,
    logs: Arc<LogBuffer>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r).take(64 * 1024);
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), r.read_line(&mut line));
    match read.await {
        Ok(Ok(_)) => {}
        _ => return Ok(()),
    }
    let answer = match serde_json::from_str::<Request>(&line) {
        Err(e) => json!({ "error": format!("bad request: {e}") }),
        Ok(Request::Logs { lines, follow }) => {
            let mut feed = logs.follow();
            for l in logs.recent(lines) {
                send(&mut w, &json!({ "line": l })).await?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                tokio::select! {
                    r = feed.recv() => match r {
                        Ok(l) => send(&mut w, &json!({ "line": l })).await?,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            send(&mut w, &json!({ "line": format!("… {n} lines skipped") })).await?
                        }
                        Err(_) => return Ok(()),
                    },
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
        Ok(req) => answer(&m, req).await,
    };
    send(&mut w, &answer).await
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, v: &Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    w.write_all(&bytes).await
}

fn err(e: impl std::fmt::Display) -> Value {
    json!({ "error": e.to_string() })
}

async fn answer(m: &Manager, req: Request) -> Value {
    match req {
        Request::List => {
            let board = m.board();
            let origin: std::collections::HashMap<String, bool> = m
                .names()
                .into_iter()
                .map(|(n, p)| (n.to_ascii_lowercase(), p))
                .collect();
            let list: Vec<Value> = board
                .list()
                .iter()
                .map(|h| {
                    let mut v = h.to_json();
                    v["addedAtRunTime"] = json!(origin
                        .get(&h.name.to_ascii_lowercase())
                        .copied()
                        .unwrap_or(false));
                    v
                })
                .collect();
            json!({ "hybridConnections": list })
        }
        Request::Show { hc } => {
            if let Err(e) = m.refresh(&hc).await {
                return err(e);
            }
            match m.board().get(&hc) {
                Some(h) => h.to_json(),
                None => err(crate::ManagerError::NotFound(hc)),
            }
        }
        Request::Add {
            connection_string,
            http,
            endpoint,
        } => match ConnectionString::parse(&connection_string) {
            // The parser's message names the bad part without echoing the key.
            Err(e) => err(format!("connection string: {e}")),
            Ok(cs) => match endpoint.as_deref().map(str::parse).transpose() {
                Err(e) => err(format!("endpoint: {e}")),
                Ok(endpoint) => match m.add(cs, crate::HcOptions { http, endpoint }) {
                    Ok(name) => json!({ "added": name }),
                    Err(e) => err(e),
                },
            },
        },
        Request::Remove { hc } => match m.remove(&hc) {
            Ok(name) => json!({ "removed": name }),
            Err(e) => err(e),
        },
        Request::Restart { hc } => match m.restart(&hc) {
            Ok(name) => json!({ "restarted": name }),
            Err(e) => err(e),
        },
        Request::Test {
            hc,
            send_connection_string,
        } => {
            let send = match send_connection_string
                .as_deref()
                .map(ConnectionString::parse)
            {
                None => None,
                Some(Ok(cs)) => Some(cs),
                Some(Err(e)) => return err(format!("send connection string: {e}")),
            };
            match m.test(&hc, send).await {
                Ok(report) => serde_json::to_value(report).unwrap_or_default(),
                Err(e) => err(e),
            }
        }
        Request::Logs { .. } => err("logs are streamed by the session"),
    }
}
