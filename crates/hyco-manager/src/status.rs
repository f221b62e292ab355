//! What the manager knows about each of its hybrid connections, for the status page, the JSON
//! view and `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use hyco_client::ListenerStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::json;

/// Metric label: the hybrid connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Hc {
    /// Lower-cased name.
    pub hybrid_connection: String,
}

/// One hybrid connection's live state.
pub struct HcStatus {
    /// Name (EntityPath).
    pub name: String,
    label: Hc,
    /// Where senders are bridged to.
    pub endpoint: Mutex<Option<crate::Endpoint>>,
    /// HTTP-mode requests are forwarded to the endpoint (else answered 501).
    pub http: AtomicBool,
    /// HTTP-mode connections to the endpoint open now, idle pooled ones included.
    pub endpoint_connections: Arc<AtomicI64>,
    /// The control channel's state.
    pub listener: Mutex<ListenerStatus>,
    /// When the state last changed.
    pub since: Mutex<SystemTime>,
    /// The last thing that went wrong, for people.
    pub last_error: Mutex<Option<String>>,
    /// Bridges open now.
    pub active: AtomicI64,
    /// Bridges completed.
    pub served: AtomicU64,
    /// Senders rejected (endpoint unreachable).
    pub rejected: AtomicU64,
    /// Bytes through completed bridges, both directions.
    pub bytes: AtomicU64,
    /// Listeners the relay counts on this hybrid connection (ours included) when the entity
    /// was last read; -1 before the first read.
    pub relay_listeners: AtomicI64,
    /// Our listener id (`sb-hc-id`), once the listener started.
    pub listener_id: Mutex<Option<String>>,
    /// Why the endpoint is refused by the allow-list, while it is.
    refused: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HcStatus {
    /// Records a control channel state change.
    pub fn set_listener(&self, s: ListenerStatus) {
        let was_connected = matches!(*lock(&self.listener), ListenerStatus::Connected { .. });
        let connected = matches!(s, ListenerStatus::Connected { .. });
        if connected && !was_connected {
            self.metrics
                .listener_success
                .get_or_create(&self.label)
                .inc();
            self.metrics
                .active_listeners
                .get_or_create(&self.label)
                .set(1);
        } else if !connected && was_connected {
            self.metrics
                .listener_disconnects
                .get_or_create(&self.label)
                .inc();
            self.metrics
                .active_listeners
                .get_or_create(&self.label)
                .set(0);
        }
        if let ListenerStatus::Disconnected { reason } | ListenerStatus::Unauthorized { reason } =
            &s
        {
            *lock(&self.last_error) = Some(reason.clone());
        }
        *lock(&self.listener) = s;
        *lock(&self.since) = SystemTime::now();
    }

    /// A bridge opened, `setup` after the relay's accept arrived (endpoint dial + rendezvous).
    pub fn bridge_opened(&self, setup: std::time::Duration) {
        self.metrics
            .connect_latency
            .get_or_create(&self.label)
            .observe(setup.as_secs_f64());
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.sender_success.get_or_create(&self.label).inc();
        self.metrics
            .active_connections
            .get_or_create(&self.label)
            .inc();
    }

    /// A bridge closed after moving `bytes`.
    pub fn bridge_closed(&self, bytes: u64) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.metrics
            .active_connections
            .get_or_create(&self.label)
            .dec();
        self.metrics
            .sender_disconnects
            .get_or_create(&self.label)
            .inc();
        self.metrics
            .bytes_transferred
            .get_or_create(&self.label)
            .inc_by(bytes);
    }

    /// A sender was rejected because the allow-list refuses the endpoint. `true` when this is
    /// news (the first refusal, or another reason than the last one): log it then, not for
    /// every sender.
    pub fn endpoint_refused(&self, reason: &str) -> bool {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .endpoint_refused
            .get_or_create(&self.label)
            .inc();
        *lock(&self.last_error) = Some(reason.to_owned());
        let mut g = lock(&self.refused);
        let news = g.as_deref() != Some(reason);
        if news {
            *g = Some(reason.to_owned());
        }
        news
    }

    /// The endpoint was dialled: a later refusal is news again.
    pub fn endpoint_allowed(&self) {
        let mut g = lock(&self.refused);
        if g.is_some() {
            *g = None;
        }
    }

    /// A sender was rejected because the endpoint could not be reached.
    pub fn rejected(&self, reason: String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .sender_server_error
            .get_or_create(&self.label)
            .inc();
        *lock(&self.last_error) = Some(reason);
    }
}

type Counters = Family<Hc, Counter>;
type Gauges = Family<Hc, Gauge>;

/// The manager's metrics (same names as the relay's, prefixed `hyco_manager_`).
struct Metrics {
    listener_success: Counters,
    listener_disconnects: Counters,
    active_listeners: Gauges,
    sender_success: Counters,
    sender_server_error: Counters,
    endpoint_refused: Counters,
    sender_disconnects: Counters,
    active_connections: Gauges,
    bytes_transferred: Counters,
    connect_latency: Family<Hc, Histogram>,
    /// Read from [`hyco_io::bufpool::held`] when encoding.
    buffers_held: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listener_success: Counters::default(),
            listener_disconnects: Counters::default(),
            active_listeners: Gauges::default(),
            sender_success: Counters::default(),
            sender_server_error: Counters::default(),
            endpoint_refused: Counters::default(),
            sender_disconnects: Counters::default(),
            active_connections: Gauges::default(),
            bytes_transferred: Counters::default(),
            connect_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            buffers_held: Gauge::default(),
        }
    }
}

/// Every hybrid connection of this manager.
pub struct StatusBoard {
    /// In the order they were added.
    hcs: RwLock<Vec<Arc<HcStatus>>>,
    metrics: Arc<Metrics>,
    registry: Registry,
}

impl StatusBoard {
    /// A board for these hybrid connection names.
    pub fn new(names: &[String]) -> StatusBoard {
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::with_prefix("hyco_manager");
        let m = &metrics;
        registry.register(
            "listener_connections_success",
            "ListenerConnections-Success: control channels established",
            m.listener_success.clone(),
        );
        registry.register(
            "listener_disconnects",
            "ListenerDisconnects: control channels lost",
            m.listener_disconnects.clone(),
        );
        registry.register(
            "active_listeners",
            "ActiveListeners: 1 while the control channel is up",
            m.active_listeners.clone(),
        );
        registry.register(
            "sender_connections_success",
            "SenderConnections-Success: senders bridged to the endpoint",
            m.sender_success.clone(),
        );
        registry.register(
            "sender_connections_server_error",
            "SenderConnections-ServerError: senders rejected because the endpoint was unreachable",
            m.sender_server_error.clone(),
        );
        registry.register(
            "sender_connections_endpoint_refused",
            "Senders rejected because the endpoint is not one this manager may dial (allow-list, link-local, cloud metadata)",
            m.endpoint_refused.clone(),
        );
        registry.register(
            "sender_disconnects",
            "SenderDisconnects: bridges closed",
            m.sender_disconnects.clone(),
        );
        registry.register(
            "active_connections",
            "ActiveConnections: bridges open now",
            m.active_connections.clone(),
        );
        registry.register(
            "bytes_transferred",
            "BytesTransferred: bytes through closed bridges, both directions",
            m.bytes_transferred.clone(),
        );
        registry.register(
            "connect_latency_seconds",
            "Time from the relay's accept to the bridge being open (endpoint dial + rendezvous)",
            m.connect_latency.clone(),
        );
        registry.register(
            "io_buffers_held",
            "64 KiB I/O buffers held now: one per bridge direction moving bytes, none while idle",
            m.buffers_held.clone(),
        );
        let board = StatusBoard {
            hcs: RwLock::new(Vec::new()),
            metrics,
            registry,
        };
        for n in names {
            board.add(n);
        }
        board
    }

    /// Adds the tunnel limit's series (`hyco_manager_tunnels_refused_total`, …).
    pub fn register_tunnel_gate(&mut self, gate: &hyco_io::tunnels::TunnelGate) {
        gate.register(&mut self.registry);
    }

    /// Adds a hybrid connection (or returns the one of that name).
    pub fn add(&self, name: &str) -> Arc<HcStatus> {
        let mut g = self.hcs.write().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = g.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
            return Arc::clone(h);
        }
        let label = Hc {
            hybrid_connection: name.to_ascii_lowercase(),
        };
        self.metrics.active_listeners.get_or_create(&label).set(0);
        let h = Arc::new(HcStatus {
            name: name.to_owned(),
            label,
            endpoint: Mutex::new(None),
            http: AtomicBool::new(false),
            endpoint_connections: Arc::new(AtomicI64::new(0)),
            listener: Mutex::new(ListenerStatus::Connecting),
            since: Mutex::new(SystemTime::now()),
            last_error: Mutex::new(None),
            active: AtomicI64::new(0),
            served: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            relay_listeners: AtomicI64::new(-1),
            listener_id: Mutex::new(None),
            refused: Mutex::new(None),
            metrics: Arc::clone(&self.metrics),
        });
        g.push(Arc::clone(&h));
        h
    }

    /// Removes a hybrid connection from the board (its metrics series stay, at their last
    /// values, with ActiveListeners at 0).
    pub fn remove(&self, name: &str) {
        let mut g = self.hcs.write().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = g.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
            self.metrics.active_listeners.get_or_create(&h.label).set(0);
        }
        g.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }

    /// The hybrid connections, in the order they were added.
    pub fn list(&self) -> Vec<Arc<HcStatus>> {
        self.hcs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One hybrid connection by name (case-insensitive).
    pub fn get(&self, name: &str) -> Option<Arc<HcStatus>> {
        self.list()
            .into_iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
    }

    /// Prometheus text.
    pub fn encode_metrics(&self) -> String {
        self.metrics
            .buffers_held
            .set(i64::try_from(hyco_io::bufpool::held()).unwrap_or(i64::MAX));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The JSON document of the status page.
    pub fn snapshot(&self) -> String {
        let hcs: Vec<_> = self.list().iter().map(|h| h.to_json()).collect();
        json!({
            "role": "manager",
            "title": "hyco manager",
            "time": unix(SystemTime::now()),
            "hybridConnections": hcs,
        })
        .to_string()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl HcStatus {
    /// This hybrid connection's state as the status page, `manager list` and `manager show`
    /// see it. Holds no secret.
    pub fn to_json(&self) -> serde_json::Value {
        let (state, detail) = match &*lock(&self.listener) {
            ListenerStatus::Connected { .. } => ("Connected".to_owned(), None),
            ListenerStatus::Connecting => ("Connecting".to_owned(), lock(&self.last_error).clone()),
            ListenerStatus::Disconnected { reason } => {
                ("Disconnected".to_owned(), Some(reason.clone()))
            }
            ListenerStatus::NotFound => (
                "NotFound".to_owned(),
                Some("the relay has no such hybrid connection".into()),
            ),
            ListenerStatus::Unauthorized { reason } => {
                ("Unauthorized".to_owned(), Some(reason.clone()))
            }
        };
        let active = self.active.load(Ordering::Relaxed).max(0);
        let relay_listeners = self.relay_listeners.load(Ordering::Relaxed);
        json!({
            "name": self.name,
            "endpoint": lock(&self.endpoint).as_ref().map(|e| e.to_string()),
            "mode": if self.http.load(Ordering::Relaxed) { "http" } else { "tcp" },
            "endpointConnections": self.endpoint_connections.load(Ordering::Relaxed).max(0),
            "state": state,
            "detail": detail,
            "since": unix(*lock(&self.since)),
            "listenerId": lock(&self.listener_id).clone(),
            "relayListeners": (relay_listeners >= 0).then_some(relay_listeners),
            "activeConnections": active,
            "connections": self.served.load(Ordering::Relaxed) + active as u64,
            "rejected": self.rejected.load(Ordering::Relaxed),
            "failures": {"senders rejected (endpoint unreachable)": self.rejected.load(Ordering::Relaxed)},
            "bytes": self.bytes.load(Ordering::Relaxed),
            "lastError": lock(&self.last_error).clone(),
        })
    }
}
