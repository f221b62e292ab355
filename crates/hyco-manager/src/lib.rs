//! The Hybrid Connection Manager: for each hybrid connection, a listener on the relay and, for
//! every sender it accepts, a TCP connection to that hybrid connection's fixed `host:port`.
//!
//! The endpoint comes from the entity's user metadata (read with the Listen key, protocol.md
//! §6.2) and is refreshed at every (re)connect. Nothing a sender sends chooses the target. The
//! endpoint is dialled *before* the rendezvous is accepted; when it cannot be reached the sender
//! is rejected with 502 and the reason.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod endpoint;
pub mod http_bridge;
pub mod logs;
pub mod service;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyco_client::{
    get_entity, ClientOptions, Connector, HybridListener, Incoming, ListenerOptions, ListenerStatus,
};
use hyco_io::backoff::Backoff;
use hyco_io::CancellationToken;
use hyco_proto::ConnectionString;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

pub use endpoint::{Endpoint, HcOptions};
pub use http_bridge::HttpSettings;
pub use service::{Manager, TestReport};
pub use status::{HcStatus, StatusBoard};

/// Manager configuration.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// One connection string (with EntityPath and a Listen key) per hybrid connection.
    pub connections: Vec<ConnectionString>,
    /// Trust, timeouts, proxy, and the relay node addresses (applied to each connection
    /// string's endpoint).
    pub client: ClientOptions,
    /// Deadline for the TCP connect to the endpoint.
    pub dial_timeout: Duration,
    /// Lifetime of the listener tokens minted from the keys (renewed before expiry).
    pub token_lifetime: Duration,
    /// HTTP mode: timeout, body cap, pool size.
    pub http: HttpSettings,
    /// The manager's own settings of some hybrid connections, by lower-cased name.
    pub hc_options: HashMap<String, HcOptions>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            connections: Vec::new(),
            client: ClientOptions::default(),
            dial_timeout: Duration::from_secs(10),
            token_lifetime: Duration::from_secs(3600),
            http: HttpSettings::default(),
            hc_options: HashMap::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    ca_file: Option<PathBuf>,
    proxy: Option<String>,
    no_proxy: Option<String>,
    /// `host:port` of each relay node behind the connection strings' endpoint.
    #[serde(default)]
    relay_addrs: Vec<String>,
    dial_timeout_secs: Option<u64>,
    http_timeout_secs: Option<u64>,
    http_max_body: Option<u64>,
    #[serde(default)]
    hybrid_connection: Vec<FileHc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHc {
    connection_string: String,
    /// The endpoint speaks HTTP (HTTP mode on).
    #[serde(default)]
    http: bool,
    /// Replaces the user metadata's endpoint (`host:port` or `unix:/path`).
    endpoint: Option<Endpoint>,
}

/// Why the manager could not run.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The configuration file is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// Client set-up failed.
    #[error(transparent)]
    Client(#[from] hyco_client::ClientError),
    /// A hybrid connection of that name is already served.
    #[error("hybrid connection '{0}' is already served by this manager")]
    Exists(String),
    /// No hybrid connection of that name is served.
    #[error("this manager serves no hybrid connection '{0}'")]
    NotFound(String),
}

impl ManagerConfig {
    /// Parses the TOML configuration file.
    pub fn from_toml(text: &str) -> Result<ManagerConfig, ManagerError> {
        let f: FileConfig =
            toml::from_str(text).map_err(|e| ManagerError::Config(e.to_string()))?;
        let mut cfg = ManagerConfig {
            client: ClientOptions {
                ca_file: f.ca_file,
                proxy: f
                    .proxy
                    .map(|p| p.parse())
                    .transpose()
                    .map_err(|e| ManagerError::Config(format!("proxy: {e}")))?,
                no_proxy: hyco_client::NoProxy::parse(f.no_proxy.as_deref().unwrap_or("")),
                relay_addrs: f.relay_addrs,
                ..ClientOptions::default()
            },
            ..ManagerConfig::default()
        };
        cfg.client
            .parsed_relay_addrs()
            .map_err(|e| ManagerError::Config(format!("relay_addrs: {e}")))?;
        if let Some(s) = f.dial_timeout_secs {
            cfg.dial_timeout = Duration::from_secs(s);
        }
        if let Some(s) = f.http_timeout_secs {
            cfg.http.timeout = Duration::from_secs(s.max(1));
        }
        cfg.http.max_body = f.http_max_body;
        for (i, hc) in f.hybrid_connection.into_iter().enumerate() {
            let cs = ConnectionString::parse(&hc.connection_string)
                .map_err(|e| ManagerError::Config(format!("hybrid_connection #{}: {e}", i + 1)))?;
            let options = HcOptions {
                http: hc.http,
                endpoint: hc.endpoint,
            };
            if let (Some(name), true) = (&cs.entity_path, options != HcOptions::default()) {
                cfg.hc_options.insert(name.to_ascii_lowercase(), options);
            }
            cfg.connections.push(cs);
        }
        Ok(cfg)
    }
}

/// Runs the manager until `shutdown`.
pub async fn run(cfg: ManagerConfig, shutdown: CancellationToken) -> Result<(), ManagerError> {
    let (_board, running) = start(cfg, shutdown)?;
    running.await;
    Ok(())
}

/// Starts one supervisor per hybrid connection of `cfg` (no state file, nothing added at run
/// time); returns their status board and a future that ends when all of them have stopped
/// (after `shutdown`).
pub fn start(
    cfg: ManagerConfig,
    shutdown: CancellationToken,
) -> Result<(Arc<StatusBoard>, impl std::future::Future<Output = ()>), ManagerError> {
    let m = Manager::start(cfg, None, shutdown)?;
    Ok((m.board(), async move { m.wait().await }))
}

/// Reads the entity into `st`: the endpoint (the local one when set, else the user
/// metadata's), whether HTTP is on (locally or in the metadata), the relay's listener count.
pub(crate) async fn resolve_into(
    st: &HcStatus,
    local: &HcOptions,
    cs: &ConnectionString,
    connector: &Connector,
) -> Result<(), String> {
    let d = get_entity(cs, connector).await.map_err(|e| e.to_string())?;
    st.relay_listeners.store(
        i64::from(d.listener_count),
        std::sync::atomic::Ordering::Relaxed,
    );
    let meta = d.user_metadata.unwrap_or_default();
    let http = local.http || endpoint::http_in_metadata(&meta);
    st.http.store(http, std::sync::atomic::Ordering::Relaxed);
    let ep = match &local.endpoint {
        Some(e) => e.clone(),
        None if meta.is_empty() => {
            return Err("the hybrid connection has no user metadata with an endpoint".into())
        }
        None => Endpoint::Tcp(
            hyco_proto::entity::parse_endpoint_metadata(&meta).map_err(|e| e.to_string())?,
        ),
    };
    set_endpoint(st, ep);
    Ok(())
}

fn endpoint_of(st: &HcStatus) -> Option<Endpoint> {
    st.endpoint.lock().ok().and_then(|g| g.clone())
}

pub(crate) fn set_endpoint(st: &HcStatus, hp: Endpoint) {
    if let Ok(mut g) = st.endpoint.lock() {
        if g.as_ref() != Some(&hp) {
            info!(hc = %st.name, endpoint = %hp, "endpoint resolved");
        }
        *g = Some(hp);
    }
}

/// A hybrid connection's own settings and the manager's HTTP-mode settings.
#[derive(Clone, Default)]
pub(crate) struct Local {
    pub options: HcOptions,
    pub http: HttpSettings,
}

pub(crate) async fn supervise(
    cs: ConnectionString,
    connector: Connector,
    opts: ListenerOptions,
    dial_timeout: Duration,
    shutdown: CancellationToken,
    st: Arc<HcStatus>,
    local: Local,
) {
    let hc = st.name.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    // The endpoint must be known before listening: a listener that cannot dial would only reject.
    while endpoint_of(&st).is_none() {
        match resolve_into(&st, &local.options, &cs, &connector).await {
            Ok(()) => {}
            Err(e) => {
                let d = backoff.next_delay().max(Duration::from_millis(500));
                warn!(hc = %hc, error = %e, retry_in = ?d, "cannot resolve the endpoint");
                st.set_listener(ListenerStatus::Disconnected {
                    reason: format!("cannot resolve the endpoint: {e}"),
                });
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
    let (listener, mut incoming, mut requests) = match HybridListener::start_with_http(
        cs.clone(),
        connector.clone(),
        opts,
        shutdown.clone(),
    ) {
        Ok(x) => x,
        Err(e) => {
            warn!(hc = %hc, error = %e, "cannot start the listener");
            st.set_listener(ListenerStatus::Disconnected {
                reason: e.to_string(),
            });
            return;
        }
    };
    if let Ok(mut g) = st.listener_id.lock() {
        *g = Some(listener.listener_id().to_owned());
    }
    // Mirror the control channel's state, and refresh the endpoint each time it comes (back) up.
    let mut status = listener.status_watch();
    let (cs2, conn2, st2, local2) = (
        cs.clone(),
        connector.clone(),
        Arc::clone(&st),
        local.options.clone(),
    );
    tokio::spawn(async move {
        loop {
            let s = status.borrow_and_update().clone();
            st2.set_listener(s.clone());
            if matches!(s, ListenerStatus::Connected { .. }) {
                match resolve_into(&st2, &local2, &cs2, &conn2).await {
                    Ok(()) => {}
                    Err(e) => {
                        warn!(hc = %st2.name, error = %e, "endpoint refresh failed; keeping the previous one")
                    }
                }
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    });
    let unix = match &local.options.endpoint {
        Some(Endpoint::Unix(p)) => Some(p.clone()),
        _ => None,
    };
    let http = Arc::new(http_bridge::HttpBridge::new(
        local.http.clone(),
        dial_timeout,
        unix,
        Arc::clone(&st.endpoint_connections),
    ));
    loop {
        let inc = tokio::select! {
            i = incoming.recv() => match i { Some(i) => i, None => return },
            r = requests.recv() => match r {
                Some(req) => {
                    let (st, http) = (Arc::clone(&st), Arc::clone(&http));
                    tokio::spawn(async move { http_bridge::dispatch(&http, req, &st).await });
                    continue;
                }
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let target = endpoint_of(&st);
        let st = Arc::clone(&st);
        tokio::spawn(async move {
            if let Some(target) = target {
                bridge(inc, target, dial_timeout, &st).await;
            }
        });
    }
}

/// Dials the endpoint, then accepts (or rejects with 502), then pumps.
async fn bridge(inc: Incoming, target: Endpoint, dial_timeout: Duration, st: &HcStatus) {
    let hc = st.name.as_str();
    let started = Instant::now();
    let id = inc.id().to_owned();
    let dial = tokio::time::timeout(dial_timeout, endpoint::Dialed::dial(&target)).await;
    let (status, reason) = match dial {
        Ok(Ok(mut tcp)) => {
            let mut ws = match inc.accept().await {
                Ok(ws) => ws,
                Err(e) => {
                    warn!(role = "listener", hc, id = %id, error = %e, "rendezvous failed");
                    return;
                }
            };
            st.bridge_opened(started.elapsed());
            let r = tcp.pump(&mut ws).await;
            let (up, down, outcome) = match r {
                Ok((to_sender, to_endpoint)) => (to_sender, to_endpoint, "closed".to_owned()),
                Err(e) => (0, 0, format!("aborted: {e}")),
            };
            st.bridge_closed(up + down);
            info!(role = "listener", hc, id = %id, endpoint = %target, bytes_to_sender = up, bytes_to_endpoint = down,
                duration_ms = started.elapsed().as_millis() as u64, outcome = %outcome, "connection served");
            return;
        }
        Ok(Err(e)) => (502, format!("Endpoint {target} unreachable: {e}")),
        Err(_) => (
            504,
            format!(
                "Endpoint {target} did not answer within {}s",
                dial_timeout.as_secs()
            ),
        ),
    };
    warn!(role = "listener", hc, id = %id, reason = %reason, "rejecting");
    st.rejected(reason.clone());
    let _ = inc.reject(status, &reason).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_configuration_parses() {
        let text = include_str!("../../../packaging/manager.toml");
        let cfg = ManagerConfig::from_toml(text).unwrap();
        assert_eq!(cfg.dial_timeout, Duration::from_secs(10));
        // Uncommented, its example hybrid connection parses too.
        let uncommented = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| r.starts_with("[[") || r.starts_with("connection_string"))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = ManagerConfig::from_toml(&uncommented.replace('…', "a2V5")).unwrap();
        assert_eq!(cfg.connections.len(), 1);
    }

    #[test]
    fn config_file() {
        let cfg = ManagerConfig::from_toml(
            "ca_file = \"/etc/hyco/ca.pem\"\n[[hybrid_connection]]\nconnection_string = \"Endpoint=sb://r:9443/;SharedAccessKeyName=l;SharedAccessKey=a2V5;EntityPath=db\"\n",
        )
        .unwrap();
        assert_eq!(cfg.connections.len(), 1);
        assert_eq!(
            cfg.client.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/hyco/ca.pem"))
        );
        let e = ManagerConfig::from_toml("bogus = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e =
            ManagerConfig::from_toml("[[hybrid_connection]]\nconnection_string = \"Endpoint=x\"")
                .unwrap_err()
                .to_string();
        assert!(e.contains("#1"), "{e}");
    }

    #[test]
    fn config_relay_addrs() {
        let cfg =
            ManagerConfig::from_toml("relay_addrs = [\"10.0.0.1:9443\", \"[fd00::2]:9443\"]\n")
                .unwrap();
        assert_eq!(cfg.client.relay_addrs, ["10.0.0.1:9443", "[fd00::2]:9443"]);
        let e = ManagerConfig::from_toml("relay_addrs = [\"10.0.0.1:9443\", \"node2\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("relay_addrs") && e.contains("'node2'"), "{e}");
    }

    #[test]
    fn config_proxy_keys() {
        let cfg = ManagerConfig::from_toml(
            "proxy = \"http://u:secret@proxy.corp:3128\"\nno_proxy = \".corp,10.0.0.0/8\"\n",
        )
        .unwrap();
        let p = cfg.client.proxy.unwrap();
        assert_eq!(p.to_string(), "http://u:***@proxy.corp:3128");
        assert!(cfg.client.no_proxy.matches("relay.corp", 443));
        let e = ManagerConfig::from_toml("proxy = \"https://u:secret@proxy.corp\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy") && !e.contains("secret"), "{e}");
    }
}
