//! The hyco relay: where a sender and a listener, both dialling out, meet.
//!
//! # Layout
//! * [`Relay::prepare`] loads or creates the data folder (TLS material, store, root rule);
//!   [`Relay::run`] accepts connections (TLS, the first request head, per-address handshake
//!   slots) and serves them until shutdown.
//! * `service`: the request pipeline. Every request is parsed (what it asks for), authorized
//!   once (`auth::check`), then dispatched to one handler: `listen` (a listener's control
//!   channel, run by `control`), `connect` (a sender, spliced to its listener), `accept` (a
//!   listener answering a sender), `http` (HTTP mode and its request rendezvous), `entity`
//!   (the entity description) or `admin` (the management API).
//! * `dispatch`: the one loop that offers a sender to listeners, here or on another node.
//! * `request` and `auth`: leaves every stage reads (a request's entity, host and headers; the
//!   token checks). `error`: the one mapping from refusals to answers.
//! * State: `registry` (connected listeners), `rendezvous` (senders waiting for a listener),
//!   [`store`] (rules and hybrid connections), [`cluster`] (the Redis directory and inbox),
//!   `metrics`, `status` (the live view), `throttle` and `budget` (limits).
//!
//! The data path is `hyco_io::splice`: frames go from one socket to the other, unmasked in place.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod accept;
mod admin;
mod auth;
mod budget;
pub mod cluster;
mod connect;
mod control;
mod dispatch;
mod entity;
mod error;
mod http;
mod listen;
mod metrics;
mod registry;
mod rendezvous;
mod request;
mod select;
mod service;
mod standby;
mod status;
pub mod store;
mod throttle;
mod tunnel;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyco_io::splice::SpliceConfig;
use hyco_io::{CancellationToken, TaskTracker};
use hyco_proto::Rights;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// The relay's side of a TLS connection.
pub(crate) type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// A client's connection as hyper serves it: TLS, with bytes read ahead put back in front (a
/// connection that outlived its tunnel, `reuse`, may have sent its next request already).
pub(crate) type ServerIo = hyco_io::prefixed::Prefixed<ServerTls>;

/// Name of the rule created on first start.
pub(crate) const ROOT_RULE: &str = "RootManageSharedAccessKey";

/// Limits and deadlines (attacks.md "default limits").
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TCP accept to the end of the request head, TLS included.
    pub handshake_timeout: Duration,
    /// HTTP mode: time for a listener to start its response, and the most a streamed body may
    /// stall (protocol.md §4.4: 60 s).
    pub http_timeout: Duration,
    /// How long a sender waits for its listener to accept or reject.
    pub rendezvous_timeout: Duration,
    /// How long a control channel outlives its token without a renewal.
    pub token_grace: Duration,
    /// Ping period on control channels.
    pub ping_interval: Duration,
    /// A control channel silent for this long is dropped.
    pub dead_after: Duration,
    /// Listeners per hybrid connection.
    pub max_listeners_per_hc: usize,
    /// Senders waiting for a listener, relay-wide.
    pub max_pending: usize,
    /// Senders waiting for a listener of one hybrid connection.
    pub max_pending_per_hc: usize,
    /// Connections from one IP address that may be in their handshake (TLS and first request
    /// head) at once.
    pub max_handshakes_per_ip: usize,
    /// Further connections from that address that wait for a slot; beyond, they are closed.
    pub max_handshake_waiters_per_ip: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Resident memory past which new connections get 503 (`None`: no budget).
    pub max_memory: Option<u64>,
    /// Failed authorizations one address may make at once (0: no throttle)…
    pub auth_failure_burst: u32,
    /// …and per second after that; beyond, it gets 429.
    pub auth_failures_per_sec: f64,
    /// Tunnels (senders from their upgrade to the end of the splice) open at once; beyond,
    /// senders get 503 while descriptors remain to say so (issue 15 §5). Default: derived
    /// from the descriptor limit ([`hyco_io::tunnels::default_max`]).
    pub max_tunnels: usize,
    /// Per-address limits (handshake slots, failed-authorization throttle) count an IPv6
    /// source by its first `ipv6_prefix` bits (64: one budget per /64, what one host or
    /// customer usually holds), an IPv4 source by its whole address.
    pub ipv6_prefix: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(60),
            rendezvous_timeout: Duration::from_secs(30),
            token_grace: Duration::from_secs(300),
            ping_interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            max_listeners_per_hc: 25,
            max_pending: 10_000,
            max_pending_per_hc: 1_000,
            max_handshakes_per_ip: 64,
            max_handshake_waiters_per_ip: 1024,
            max_headers: 100,
            max_memory: None,
            auth_failure_burst: 30,
            auth_failures_per_sec: 1.0,
            max_tunnels: hyco_io::tunnels::max_tunnels(None),
            ipv6_prefix: 64,
        }
    }
}

/// Everything the relay is configured with.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Data folder: store, TLS material, root connection string.
    pub data_dir: PathBuf,
    /// Host names the namespace answers to (token audiences, certificate SANs).
    pub hostnames: Vec<String>,
    /// `host:port` clients use to reach the relay; goes into connection strings.
    pub public_host: String,
    /// Certificate and key PEM files; generated in the data folder when absent.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Limits and deadlines.
    pub limits: Limits,
    /// Splice buffers and write deadline.
    pub splice: SpliceConfig,
    /// How long running tunnels may drain after shutdown begins.
    pub drain_grace: Duration,
    /// Run as a node of a cluster: configuration and listener directory in Redis.
    pub cluster: Option<cluster::ClusterConfig>,
    /// The hyco extensions this relay offers (`Hyco-Extensions` on its 101s): standby
    /// sockets and early data. `Extensions::default()` (none) makes it a plain Azure-protocol relay.
    pub extensions: hyco_proto::ext::Extensions,
    /// Test hook (issue 15 §2): a control channel whose listener id (`sb-hc-id`) starts with
    /// this panics once registered, so tests can show that a panicking task leaves no ghost.
    /// `None` in every real configuration: no flag or file sets it.
    #[doc(hidden)]
    pub panic_listener_prefix: Option<String>,
}

impl RelayConfig {
    /// Defaults for a data folder and the address clients will use.
    pub fn new(data_dir: impl Into<PathBuf>, public_host: impl Into<String>) -> Self {
        RelayConfig {
            data_dir: data_dir.into(),
            hostnames: vec!["localhost".into(), "127.0.0.1".into()],
            public_host: public_host.into(),
            tls_files: None,
            limits: Limits::default(),
            splice: SpliceConfig::default(),
            drain_grace: Duration::from_secs(hyco_io::tunnels::DRAIN_GRACE_SECS),
            cluster: None,
            extensions: default_extensions(),
            panic_listener_prefix: None,
        }
    }
}

/// State shared by every connection task.
pub struct Shared {
    /// Configuration.
    pub(crate) cfg: RelayConfig,
    /// The store.
    pub(crate) store: store::Store,
    /// This node's cluster membership, when clustered.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
    /// Connected listeners.
    pub(crate) registry: Arc<registry::Registry>,
    /// Senders waiting for listeners.
    pub(crate) rendezvous: Arc<rendezvous::Rendezvous>,
    /// The sockets listeners parked for senders (standby extension).
    pub(crate) standby: Arc<standby::Pools>,
    /// HTTP-mode requests waiting for their responses.
    pub(crate) http: http::HttpTable,
    /// Fires when the relay stops accepting: control channels close with 1001.
    pub(crate) shutdown: CancellationToken,
    /// Fires when the drain grace is over: remaining tunnels are cut.
    pub(crate) drain: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Prometheus metrics.
    pub(crate) metrics: metrics::Metrics,
    /// Listener up/down events (JSON) for `/api/listener-events`.
    pub(crate) events: tokio::sync::broadcast::Sender<String>,
    /// Bumped after every change to rules or keys: control channels re-check their token
    /// (attacks A10: a regenerated or deleted key closes the listeners that used it).
    pub(crate) keys_changed: tokio::sync::watch::Sender<u64>,
    /// Failed authorizations per source address.
    pub(crate) auth_throttle: throttle::AuthThrottle,
    /// The memory budget for new connections.
    pub(crate) memory: budget::MemoryBudget,
    /// The tunnel limit (a descriptor reserve).
    pub(crate) tunnel_gate: Arc<hyco_io::tunnels::TunnelGate>,
    /// Open tunnels, for live views.
    pub(crate) tunnels: std::sync::Mutex<std::collections::HashMap<u64, Arc<Tunnel>>>,
    /// Connections per source (address, or IPv6 prefix) still in their handshake (attacks C9).
    handshakes: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, IpGate>>,
}

/// The extensions a relay offers unless told otherwise: up to 32 standby sockets per listener,
/// each parked at most 60 s (under the idle timeouts of common NATs and load balancers, so a
/// parked socket is not silently dropped on its way), and 64 KiB of early data (a first
/// request or handshake of the application's, and less than the TCP window a sender starts
/// with), and connections that outlive their tunnels.
pub fn default_extensions() -> hyco_proto::ext::Extensions {
    hyco_proto::ext::Extensions {
        standby: Some(hyco_proto::ext::StandbyParams {
            max: 32,
            ttl_secs: 60,
        }),
        early_data: Some(64 * 1024),
        reuse: true,
    }
}

/// The extensions named in `list`: `all` (the defaults), `none`, or names separated by commas
/// (`standby`, `early-data`, `reuse`), each with its default parameters. For `--extensions` and
/// `HYCO_EXTENSIONS`.
pub fn extensions_from_list(list: &str) -> Result<hyco_proto::ext::Extensions, String> {
    let all = default_extensions();
    let mut chosen = hyco_proto::ext::Extensions::default();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name.to_ascii_lowercase().as_str() {
            "all" => chosen = all,
            "none" => {}
            hyco_proto::ext::STANDBY => chosen.standby = all.standby,
            hyco_proto::ext::EARLY_DATA => chosen.early_data = all.early_data,
            hyco_proto::ext::REUSE => chosen.reuse = all.reuse,
            _ => {
                return Err(format!(
                    "unknown extension '{}': use all, none, standby, early-data or reuse",
                    hyco_proto::address::sanitize_reason(name)
                ))
            }
        }
    }
    Ok(chosen)
}

/// `response` (a 101 of a listen, connect or standby upgrade) with the `Hyco-Extensions`
/// header, when this relay offers any.
pub(crate) fn advertise<B>(
    shared: &Shared,
    mut response: ::http::Response<B>,
) -> ::http::Response<B> {
    if let Some(v) = shared
        .cfg
        .extensions
        .to_header()
        .and_then(|v| ::http::HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert(hyco_proto::ext::HEADER, v);
    }
    response
}

/// An open tunnel's place in [`Shared::tunnels`], removed when dropped (however its task
/// ends).
pub(crate) struct TunnelEntry {
    shared: Arc<Shared>,
    id: u64,
}

impl TunnelEntry {
    /// Lists `tunnel` under `id` until the entry is dropped.
    pub(crate) fn insert(shared: &Arc<Shared>, id: u64, tunnel: Arc<Tunnel>) -> TunnelEntry {
        lock(&shared.tunnels).insert(id, tunnel);
        TunnelEntry {
            shared: Arc::clone(shared),
            id,
        }
    }
}

impl Drop for TunnelEntry {
    fn drop(&mut self) {
        lock(&self.shared.tunnels).remove(&self.id);
    }
}

/// An open tunnel, as live views see it.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// Registry key of its hybrid connection.
    pub(crate) hc_key: String,
    /// Connection id.
    pub(crate) id: String,
    /// The sender's address.
    pub(crate) peer: SocketAddr,
    /// When it opened.
    pub(crate) since: SystemTime,
    /// Bytes so far: `a_to_b` is sender to listener.
    pub(crate) counters: hyco_io::splice::Counters,
}

/// Per-IP handshake gate: at most `max_handshakes_per_ip` connections from one address are in
/// their handshake at once; up to `max_handshake_waiters_per_ip` more wait for a slot (a
/// legitimate burst from one forwarder or manager is served a little later instead of being
/// refused); beyond that, connections are closed at once (attacks C9).
struct IpGate {
    slots: Arc<tokio::sync::Semaphore>,
    /// Holders plus waiters.
    users: usize,
}

/// A connection's place in its IP's handshake quota; released on drop.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _user: GateUser,
}

/// Counts a holder or waiter of an IP's gate; removes the gate when the last one leaves.
struct GateUser {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for GateUser {
    fn drop(&mut self) {
        let mut g = self
            .shared
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(gate) = g.get_mut(&self.ip) {
            gate.users -= 1;
            if gate.users == 0 {
                g.remove(&self.ip);
            }
        }
    }
}

impl HandshakeSlot {
    /// Waits (until `deadline`) for one of the IP's handshake slots; `None` when too many are
    /// waiting already or the deadline passes.
    async fn acquire(
        shared: &Arc<Shared>,
        ip: std::net::IpAddr,
        deadline: tokio::time::Instant,
    ) -> Option<HandshakeSlot> {
        let limits = shared.cfg.limits;
        let slots = {
            let mut g = shared.handshakes.lock().unwrap_or_else(|p| p.into_inner());
            let gate = g.entry(ip).or_insert_with(|| IpGate {
                slots: Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes_per_ip)),
                users: 0,
            });
            if gate.users >= limits.max_handshakes_per_ip + limits.max_handshake_waiters_per_ip {
                return None;
            }
            gate.users += 1;
            Arc::clone(&gate.slots)
        };
        let user = GateUser {
            shared: Arc::clone(shared),
            ip,
        };
        match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Some(HandshakeSlot {
                _permit: permit,
                _user: user,
            }),
            _ => None,
        }
    }
}

/// Locks a std mutex, recovering from poisoning (the data stays consistent: every critical
/// section here is a single insert or remove).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data folder could not be prepared.
    #[error("data folder {path}: {source}")]
    DataDir {
        /// The folder or file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The data folder or a file in it can be read by other users (or cannot be inspected).
    #[error("data folder: {0}")]
    Private(#[from] hyco_io::private::PrivateError),
    /// TLS material could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] hyco_io::tls::TlsError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The cluster could not be joined.
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterError),
}

/// A prepared relay, ready to serve.
pub struct Relay {
    shared: Arc<Shared>,
    tls: tokio_rustls::TlsAcceptor,
    /// The root rule's connection string.
    pub root_connection_string: String,
    /// True when this start created the namespace (print the string once).
    pub first_start: bool,
    /// The generated CA clients should trust, when the relay generated its certificate.
    pub ca_file: Option<PathBuf>,
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        // Every file in the data folder is 0600 (issue 15 §4), certificates included.
        let mut f = hyco_io::private::create_file(&tmp, true).map_err(err)?;
        f.write_all(data).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// The server's TLS configuration: the given files, or a certificate generated in the data
/// folder (with its CA, whose file is returned) on first start.
fn tls_material(
    cfg: &RelayConfig,
) -> Result<(Arc<rustls::ServerConfig>, Option<PathBuf>), StartError> {
    if let Some((cert, key)) = &cfg.tls_files {
        return Ok((hyco_io::tls::server_config_from_files(cert, key)?, None));
    }
    let dir = &cfg.data_dir;
    let cert = dir.join("server.pem");
    let key = dir.join("server-key.pem");
    if !cert.exists() || !key.exists() {
        let mut names = cfg.hostnames.clone();
        for n in ["localhost", "127.0.0.1"] {
            if !names.iter().any(|x| x == n) {
                names.push(n.into());
            }
        }
        let pki = hyco_io::tls::generate_pki(&names)?;
        write_file(&dir.join("ca.pem"), pki.ca_cert_pem.as_bytes())?;
        write_file(&dir.join("ca-key.pem"), pki.ca_key_pem.as_bytes())?;
        write_file(&key, pki.key_pem.as_bytes())?;
        write_file(&cert, pki.cert_pem.as_bytes())?;
        info!(ca = %dir.join("ca.pem").display(), "generated a CA and a server certificate");
    }
    Ok((
        hyco_io::tls::server_config_from_files(&cert, &key)?,
        Some(dir.join("ca.pem")),
    ))
}

/// A joined cluster and the queue its directory task reads.
type Joined = (
    Arc<cluster::Cluster>,
    tokio::sync::mpsc::UnboundedSender<registry::DirOp>,
);

/// The store: redb in the data folder, or the cluster's Redis (joining the cluster).
async fn open_store(cfg: &RelayConfig) -> Result<(store::Store, Option<Joined>), StartError> {
    let Some(cc) = &cfg.cluster else {
        return Ok((store::Store::open(&cfg.data_dir)?, None));
    };
    let (url, prefix, secret) = (cc.url.clone(), cc.prefix(), cc.secret.clone());
    let store = tokio::task::spawn_blocking(move || {
        store::Store::open_redis(&url, &prefix, secret.as_deref())
    })
    .await
    .map_err(|e| store::StoreError::Db(e.into()))??;
    let joined = cluster::Cluster::connect(cc.clone()).await?;
    Ok((store, Some(joined)))
}

impl Relay {
    /// Loads or creates everything in the data folder (and joins the cluster, when
    /// configured). Binds nothing.
    pub async fn prepare(cfg: RelayConfig) -> Result<Relay, StartError> {
        let dir = cfg.data_dir.clone();
        // 0700, every file in it 0600; refused when group or others can read it.
        hyco_io::private::ensure_dir(&dir)?;
        let (tls_cfg, ca_file) = tls_material(&cfg)?;
        let (store, cluster) = open_store(&cfg).await?;
        let root = store::Rule {
            name: ROOT_RULE.into(),
            rights: Rights {
                listen: true,
                send: true,
                manage: true,
            },
            primary_key: admin::new_key(),
            secondary_key: admin::new_key(),
        };
        let first_start = store.is_empty() && store.ensure_root(root)?;
        let limits_memory = cfg.limits.max_memory;
        let auth_throttle = throttle::AuthThrottle::new(
            cfg.limits.auth_failure_burst,
            cfg.limits.auth_failures_per_sec,
        )
        .with_ipv6_prefix(cfg.limits.ipv6_prefix);
        let tunnel_gate = hyco_io::tunnels::TunnelGate::new("relay", cfg.limits.max_tunnels);
        let (cluster, registry) = match cluster {
            Some((c, tx)) => (Some(c), Arc::new(registry::Registry::with_directory(tx))),
            None => (None, Arc::default()),
        };
        let mut metrics = metrics::Metrics::default();
        if let Some(c) = &cluster {
            metrics.register_cluster(&c.stats);
        }
        metrics.register_tunnel_gate(&tunnel_gate);
        let shared = Arc::new(Shared {
            cfg,
            store,
            cluster,
            registry,
            rendezvous: Arc::new(rendezvous::Rendezvous::default()),
            standby: Arc::default(),
            http: http::HttpTable::default(),
            shutdown: CancellationToken::new(),
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            handshakes: Default::default(),
            metrics,
            events: tokio::sync::broadcast::channel(256).0,
            keys_changed: tokio::sync::watch::channel(0).0,
            auth_throttle,
            memory: budget::MemoryBudget::new(limits_memory),
            tunnel_gate,
            tunnels: Default::default(),
        });
        let ns = shared.store.snapshot();
        let root = ns
            .rules
            .iter()
            .find(|r| r.name == ROOT_RULE)
            .or(ns.rules.first())
            .ok_or_else(|| store::StoreError::NotFound("the namespace root rule".into()))?;
        let root_connection_string =
            admin::connection_string(&shared, &root.name, &root.primary_key, None)
                .map_err(|e| store::StoreError::Db(e.into()))?;
        write_file(
            &dir.join("root.connection-string"),
            format!("{root_connection_string}\n").as_bytes(),
        )?;
        Ok(Relay {
            shared,
            tls: tokio_rustls::TlsAcceptor::from(tls_cfg),
            root_connection_string,
            first_start,
            ca_file,
        })
    }

    /// Serves the status page, `/api/status`, `/api/events` and `/metrics` on `listener` (keep it
    /// on loopback) until the relay stops accepting.
    /// `hosts`: names besides loopback ones the pages answer to (`--status-host`).
    pub fn serve_status(&self, listener: TcpListener, hosts: Vec<String>) {
        let s1 = Arc::clone(&self.shared);
        let s2 = Arc::clone(&self.shared);
        let sources = hyco_io::status::Sources {
            snapshot: Arc::new(move || status::snapshot(&s1)),
            metrics: Arc::new(move || s2.metrics.encode()),
            events: Some(self.shared.events.clone()),
            hosts,
        };
        tokio::spawn(hyco_io::status::serve(
            listener,
            sources,
            self.shared.shutdown.clone(),
        ));
    }

    /// Serves `listener` until `shutdown` fires, then drains for the configured grace.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let shared = self.shared;
        if let Some(c) = &shared.cluster {
            c.start(&shared);
            info!(node = %c.cfg.node_id, advertise = %c.advertise(), "joined the cluster");
        }
        let mut accept_backoff = Duration::from_millis(5);
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => { accept_backoff = Duration::from_millis(5); x }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, never spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(accept_backoff).await;
                        accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let tls = self.tls.clone();
            let shared2 = Arc::clone(&shared);
            shared
                .tracker
                .spawn(serve_connection(shared2, tls, tcp, peer));
        }
        drop(listener);
        info!("relay stopping: no new connections; draining tunnels");
        shared.shutdown.cancel();
        shared.tracker.close();
        if tokio::time::timeout(shared.cfg.drain_grace, shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(grace = ?shared.cfg.drain_grace, "drain grace over; cutting remaining tunnels");
            shared.drain.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), shared.tracker.wait()).await;
        }
    }
}

/// One TCP connection: TLS, then HTTP/1.1 with upgrades. The TLS handshake and the first
/// request head must be done within `handshake_timeout` in total (slowloris, attacks C1-C3);
/// until then the connection holds one of its IP's handshake slots.
async fn serve_connection(
    shared: Arc<Shared>,
    tls: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let Some((slot, deadline)) = handshake_slot(&shared, peer).await else {
        return;
    };
    let stream = match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
        Ok(Ok(s)) => hyco_io::prefixed::Prefixed::new(s, bytes::Bytes::new()),
        Ok(Err(e)) => {
            debug!(peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(peer = %peer, "TLS handshake deadline passed");
            return;
        }
    };
    serve_http(shared, stream, peer, slot, deadline).await;
}

/// A sender's connection after its tunnel (`reuse`): served as a new HTTP/1.1 connection,
/// under the same rules as a new one (a handshake slot of its address, its next request head
/// within `handshake_timeout`), without the TLS handshake.
pub(crate) fn serve_again(shared: &Arc<Shared>, io: ServerIo, peer: SocketAddr) {
    let shared2 = Arc::clone(shared);
    shared.tracker.spawn(async move {
        if let Some((slot, deadline)) = handshake_slot(&shared2, peer).await {
            serve_http(shared2, io, peer, slot, deadline).await;
        }
    });
}

/// One of `peer`'s address's handshake slots, and the deadline for its connection's first
/// request head (`handshake_timeout` from now); `None` when none came free by then.
async fn handshake_slot(
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Option<(HandshakeSlot, tokio::time::Instant)> {
    let limits = shared.cfg.limits;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let source = throttle::source_key(peer.ip(), limits.ipv6_prefix);
    let slot = HandshakeSlot::acquire(shared, source, deadline).await;
    if slot.is_none() {
        debug!(peer = %peer, "too many unfinished handshakes from this address; closed");
    }
    Some((slot?, deadline))
}

/// HTTP/1.1 with upgrades on a connection, its first request head due by `deadline`.
async fn serve_http(
    shared: Arc<Shared>,
    stream: ServerIo,
    peer: SocketAddr,
    slot: HandshakeSlot,
    deadline: tokio::time::Instant,
) {
    let limits = shared.cfg.limits;
    let (first_tx, mut first_rx) = tokio::sync::oneshot::channel::<()>();
    let pending_first = Arc::new(std::sync::Mutex::new(Some((slot, first_tx))));
    let svc_shared = Arc::clone(&shared);
    let svc = hyper::service::service_fn(move |req| {
        // The first request head is in: the handshake phase is over.
        if let Ok(mut g) = pending_first.lock() {
            g.take();
        }
        service::handle(Arc::clone(&svc_shared), peer, req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(32 * 1024)
        // Header names reach listeners as the sender spelled them (`hyco_io::header_case`).
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut first_seen = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(peer = %peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = &mut first_rx, if !first_seen => first_seen = true,
            _ = tokio::time::sleep_until(deadline), if !first_seen => {
                debug!(peer = %peer, "request head not complete within the handshake deadline");
                return;
            }
            _ = shared.drain.cancelled() => return,
        }
    }
}
