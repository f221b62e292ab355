//! The Hybrid Connection Manager: for each hybrid connection, a listener on the relay and, for
//! every sender it accepts, a TCP connection to that hybrid connection's fixed `host:port`.
//!
//! The endpoint comes from the entity's user metadata (read with the Listen key, protocol.md
//! §6.2) and is refreshed at every (re)connect. Nothing a sender sends chooses the target. The
//! endpoint is dialled *before* the rendezvous is accepted; when it cannot be reached the sender
//! is rejected with 502 and the reason.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod allow;
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
use hyco_io::{CancellationToken, TaskTracker};
use hyco_proto::ConnectionString;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

pub use allow::EndpointPolicy;
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
    /// The endpoints it may dial (`--allow-endpoint`, `allow_endpoints`): tunnels and HTTP
    /// mode alike, TCP endpoints only (a Unix socket is the operator's own setting).
    pub allow_endpoints: EndpointPolicy,
    /// Bridges (tunnels, and HTTP-mode requests in flight) open at once; beyond, senders are
    /// rejected with 503 while descriptors remain to do so (default: derived from the
    /// descriptor limit, [`hyco_io::tunnels`]).
    pub max_tunnels: usize,
    /// HTTP mode: timeout, body cap, pool size.
    pub http: HttpSettings,
    /// The manager's own settings of some hybrid connections, by lower-cased name.
    pub hc_options: HashMap<String, HcOptions>,
    /// After shutdown, how long open bridges (tunnels and HTTP-mode requests) may finish before
    /// they are cut (`--drain-grace`, `drain_grace_secs`).
    pub drain_grace: Duration,
    /// Most sockets each listener parks at a relay that offers standby sockets
    /// (`--standby-max`, [`ListenerOptions::standby_max`]; 0: none). Each is a descriptor, and
    /// counts against [`ManagerConfig::max_tunnels`] while parked, only while a tenth of that
    /// limit stays free for tunnels.
    pub standby_max: usize,
}

/// The range `--token-lifetime` accepts: at least 2 s (renewal comes at half the life), at
/// most a year (a longer-lived token only widens what a stolen one is worth, and near 2^64
/// seconds the expiry would not fit the clock).
pub const TOKEN_LIFETIME_SECS: std::ops::RangeInclusive<u64> = 2..=365 * 86_400;

/// The range `dial_timeout_secs` accepts.
pub const DIAL_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=3600;

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            connections: Vec::new(),
            client: ClientOptions::default(),
            dial_timeout: Duration::from_secs(10),
            token_lifetime: Duration::from_secs(3600),
            allow_endpoints: EndpointPolicy::default(),
            max_tunnels: hyco_io::tunnels::max_tunnels(None),
            http: HttpSettings::default(),
            hc_options: HashMap::new(),
            drain_grace: Duration::from_secs(hyco_io::tunnels::DRAIN_GRACE_SECS),
            standby_max: hyco_client::listener::DEFAULT_STANDBY_MAX,
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
    /// The endpoints the manager may dial ([`allow`]).
    #[serde(default)]
    allow_endpoints: Vec<String>,
    http_timeout_secs: Option<u64>,
    http_max_body: Option<u64>,
    drain_grace_secs: Option<u64>,
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
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A setting is wrong; the source says why.
    #[error("configuration: {what}: {source}")]
    Invalid {
        /// The setting (`proxy`, `hybrid_connection #2`, a file, …).
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The configuration file is not TOML of the expected shape.
    #[error("configuration: {0}")]
    Toml(#[source] toml::de::Error),
    /// The state file could not be read or written.
    #[error("configuration: cannot {action} {}: {source}", .path.display())]
    StateFile {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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

impl ManagerError {
    /// [`ManagerError::Invalid`]: `what` is wrong because of `source`.
    pub fn invalid(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> ManagerError {
        ManagerError::Invalid {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

impl ManagerConfig {
    /// Parses the TOML configuration file.
    pub fn from_toml(text: &str) -> Result<ManagerConfig, ManagerError> {
        let f: FileConfig = toml::from_str(text).map_err(ManagerError::Toml)?;
        let mut cfg = ManagerConfig {
            client: ClientOptions {
                ca_file: f.ca_file,
                proxy: f
                    .proxy
                    .map(|p| p.parse())
                    .transpose()
                    .map_err(|e| ManagerError::invalid("proxy", e))?,
                no_proxy: hyco_client::NoProxy::parse(f.no_proxy.as_deref().unwrap_or("")),
                relay_addrs: f.relay_addrs,
                ..ClientOptions::default()
            },
            ..ManagerConfig::default()
        };
        cfg.client
            .parsed_relay_addrs()
            .map_err(|e| ManagerError::invalid("relay_addrs", e))?;
        cfg.allow_endpoints = EndpointPolicy::parse(&f.allow_endpoints)
            .map_err(|e| ManagerError::invalid("allow_endpoints", e))?;
        if let Some(s) = f.dial_timeout_secs {
            if !DIAL_TIMEOUT_SECS.contains(&s) {
                return Err(ManagerError::Config(format!(
                    "dial_timeout_secs = {s}: use {} to {} seconds",
                    DIAL_TIMEOUT_SECS.start(),
                    DIAL_TIMEOUT_SECS.end()
                )));
            }
            cfg.dial_timeout = Duration::from_secs(s);
        }
        if let Some(s) = f.http_timeout_secs {
            cfg.http.timeout = Duration::from_secs(s.max(1));
        }
        cfg.http.max_body = f.http_max_body;
        if let Some(s) = f.drain_grace_secs {
            let range = hyco_io::tunnels::DRAIN_GRACE_RANGE;
            if !range.contains(&s) {
                return Err(ManagerError::Config(format!(
                    "drain_grace_secs = {s}: use {} to {} seconds",
                    range.start(),
                    range.end()
                )));
            }
            cfg.drain_grace = Duration::from_secs(s);
        }
        for (i, hc) in f.hybrid_connection.into_iter().enumerate() {
            let cs = ConnectionString::parse(&hc.connection_string)
                .map_err(|e| ManagerError::invalid(format!("hybrid_connection #{}", i + 1), e))?;
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

/// Why a hybrid connection's endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The entity could not be read from the relay.
    #[error("{0}")]
    Entity(#[source] hyco_client::ClientError),
    /// Neither the local settings nor the user metadata name one.
    #[error("the hybrid connection has no user metadata with an endpoint")]
    NoEndpoint,
    /// The user metadata's endpoint does not parse.
    #[error("{0}")]
    Metadata(#[source] hyco_proto::entity::EntityError),
}

/// Reads the entity into `st`: the endpoint (the local one when set, else the user
/// metadata's), whether HTTP is on (locally or in the metadata), the relay's listener count.
pub(crate) async fn resolve_into(
    st: &HcStatus,
    local: &HcOptions,
    cs: &ConnectionString,
    connector: &Connector,
) -> Result<(), ResolveError> {
    let d = get_entity(cs, connector)
        .await
        .map_err(ResolveError::Entity)?;
    st.relay_listeners.store(
        i64::from(d.listener_count),
        std::sync::atomic::Ordering::Relaxed,
    );
    let meta = d.user_metadata.unwrap_or_default();
    let http = local.http || endpoint::http_in_metadata(&meta);
    st.http.store(http, std::sync::atomic::Ordering::Relaxed);
    let ep = match &local.endpoint {
        Some(e) => e.clone(),
        None if meta.is_empty() => return Err(ResolveError::NoEndpoint),
        None => Endpoint::Tcp(
            hyco_proto::entity::parse_endpoint_metadata(&meta).map_err(ResolveError::Metadata)?,
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

/// How a supervisor dials its endpoint.
#[derive(Clone)]
pub(crate) struct Dialing {
    pub(crate) timeout: Duration,
    pub(crate) policy: Arc<EndpointPolicy>,
    /// The tunnel limit, shared by every hybrid connection.
    pub(crate) gate: Arc<hyco_io::tunnels::TunnelGate>,
    /// The bridges (tunnels and HTTP-mode requests) open, of every hybrid connection: the
    /// manager drains them on shutdown.
    pub(crate) bridges: TaskTracker,
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
    dialing: Dialing,
    shutdown: CancellationToken,
    st: Arc<HcStatus>,
    local: Local,
) {
    let hc = st.name.clone();
    // Quick retries first: after a restart of the relay (or of this manager while the relay
    // restarts) the endpoint is read again within a second.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
        .with_fast_retries(hyco_io::backoff::FAST_RETRIES);
    // The endpoint must be known before listening: a listener that cannot dial would only reject.
    while endpoint_of(&st).is_none() {
        match resolve_into(&st, &local.options, &cs, &connector).await {
            Ok(()) => {}
            Err(e) => {
                let d = backoff.next_delay().max(Duration::from_millis(100));
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
        dialing.timeout,
        Arc::clone(&dialing.policy),
        unix,
        Arc::clone(&st.endpoint_connections),
    ));
    loop {
        let inc = tokio::select! {
            i = incoming.recv() => match i { Some(i) => i, None => return },
            r = requests.recv() => match r {
                Some(req) => {
                    let (st, http) = (Arc::clone(&st), Arc::clone(&http));
                    // A request in flight holds a rendezvous and an endpoint connection: it
                    // counts against the tunnel limit like a tunnel.
                    let permit = dialing.gate.try_acquire();
                    // Boxed: a request's state is kilobytes, and a task's future is moved
                    // by value on its way into the task and when it ends.
                    dialing.bridges.spawn(Box::pin(async move {
                        let Some(_permit) = permit else {
                            http_bridge::at_tunnel_limit(req, &st).await;
                            return;
                        };
                        http_bridge::dispatch(&http, req, &st).await
                    }));
                    continue;
                }
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let target = endpoint_of(&st);
        let st = Arc::clone(&st);
        let dialing = dialing.clone();
        let permit = dialing.gate.try_acquire();
        let bridges = dialing.bridges.clone();
        bridges.spawn(async move {
            let Some(_permit) = permit else {
                // At the limit: the reserve still has the descriptor this answer needs.
                let reason = "The manager is at its tunnel limit (--max-tunnels); retry later.";
                st.rejected(reason.to_owned());
                let _ = inc.reject(503, reason).await;
                return;
            };
            if let Some(target) = target {
                bridge(inc, target, &dialing, &st).await;
            }
        });
    }
}

/// Dials the endpoint (a TCP one at the addresses the policy permits), then accepts (or
/// rejects with 403, 502 or 504), then pumps.
async fn bridge(inc: Incoming, target: Endpoint, dialing: &Dialing, st: &HcStatus) {
    let hc = st.name.as_str();
    let started = Instant::now();
    let id = inc.id().to_owned();
    let dial_timeout = dialing.timeout;
    let dial = tokio::time::timeout(
        dial_timeout,
        endpoint::Dialed::dial(&target, &dialing.policy),
    )
    .await;
    let (status, reason) = match dial {
        Ok(Ok(mut conn)) => {
            st.endpoint_allowed();
            let mut ws = match inc.accept().await {
                Ok(ws) => ws,
                Err(e) => {
                    warn!(role = "listener", hc, id = %id, error = %e, "rendezvous failed");
                    return;
                }
            };
            st.bridge_opened(started.elapsed());
            let r = conn.pump(&mut ws).await;
            let (up, down, outcome) = match r {
                Ok((to_sender, to_endpoint)) => {
                    // A normal end parks the socket at the relay again (`reuse`).
                    ws.recycle();
                    (to_sender, to_endpoint, "closed".to_owned())
                }
                Err(e) => (0, 0, format!("aborted: {e}")),
            };
            st.bridge_closed(up + down);
            info!(role = "listener", hc, id = %id, endpoint = %target, bytes_to_sender = up, bytes_to_endpoint = down,
                duration_ms = started.elapsed().as_millis() as u64, outcome = %outcome, "connection served");
            return;
        }
        Ok(Err(e)) => match endpoint::refusal(&e) {
            Some(reason) => {
                // Said once per change of the endpoint's verdict, not per sender.
                if st.endpoint_refused(&reason) {
                    warn!(role = "listener", hc, endpoint = %target, reason = %reason, "endpoint refused by the allow-list; senders are rejected");
                }
                let _ = inc.reject(403, &reason).await;
                return;
            }
            None => (502, format!("Endpoint {target} unreachable: {e}")),
        },
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
                    .filter(|r| {
                        r.starts_with("[[")
                            || r.starts_with("connection_string")
                            || r.starts_with("allow_endpoints")
                    })
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = ManagerConfig::from_toml(&uncommented.replace('…', "a2V5")).unwrap();
        assert_eq!(cfg.connections.len(), 1);
        assert_eq!(cfg.allow_endpoints.to_string(), "10.0.0.0/8,db.corp:5432");
    }

    #[test]
    fn config_allow_endpoints() {
        let cfg = ManagerConfig::from_toml("allow_endpoints = [\"*:5432\", \"[fd00::/8]:443\"]\n")
            .unwrap();
        assert_eq!(cfg.allow_endpoints.to_string(), "*:5432,[fd00::/8]:443");
        let e = ManagerConfig::from_toml("allow_endpoints = [\"db:0\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_endpoints") && e.contains("'db:0'"), "{e}");
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
    fn config_drain_grace() {
        assert_eq!(
            ManagerConfig::default().drain_grace,
            Duration::from_secs(hyco_io::tunnels::DRAIN_GRACE_SECS)
        );
        let cfg = ManagerConfig::from_toml("drain_grace_secs = 0\n").unwrap();
        assert_eq!(cfg.drain_grace, Duration::ZERO);
        let e = ManagerConfig::from_toml("drain_grace_secs = 86401")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("drain_grace_secs") && e.contains("0 to 86400"),
            "{e}"
        );
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
