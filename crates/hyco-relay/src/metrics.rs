//! Prometheus metrics, named after Azure Relay's (docs/operations.md has the mapping).
//!
//! Every series carries one label, `hybrid_connection`: the hybrid connection's lower-cased
//! name, or `-` when the request named none that exists (so unknown names cannot grow the label
//! set). Keys, tokens and rendezvous ids never appear in labels.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Hc {
    /// Lower-cased hybrid connection name, or `-`.
    pub(crate) hybrid_connection: String,
}

impl Hc {
    /// Label for a hybrid connection key (or `-`).
    pub(crate) fn new(key: Option<&str>) -> Hc {
        Hc {
            hybrid_connection: key.unwrap_or("-").to_owned(),
        }
    }
}

type Counters = Family<Hc, Counter<u64, AtomicU64>>;
type Gauges = Family<Hc, Gauge<i64, std::sync::atomic::AtomicI64>>;

/// One unit of a gauge (a listener connected, a tunnel open), taken back when dropped: the
/// gauge says what is, however the task that held it ended.
pub(crate) struct GaugeUnit(Gauge<i64, std::sync::atomic::AtomicI64>);

impl GaugeUnit {
    /// Adds one to `family`'s series for `label` until the unit is dropped.
    pub(crate) fn hold(family: &Gauges, label: &Hc) -> GaugeUnit {
        let g = family.get_or_create(label).clone();
        g.inc();
        GaugeUnit(g)
    }
}

impl Drop for GaugeUnit {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The relay's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// Listener control channels opened.
    pub(crate) listener_success: Counters,
    /// Listener control channels refused for the client's fault (4xx).
    pub(crate) listener_client_error: Counters,
    /// Listener control channels refused for the relay's fault (5xx).
    pub(crate) listener_server_error: Counters,
    /// Sender connections that became tunnels.
    pub(crate) sender_success: Counters,
    /// Sender connections refused with 4xx (auth, no listener, listener reject 4xx).
    pub(crate) sender_client_error: Counters,
    /// Sender connections refused with 5xx (timeout, listener gone, endpoint down).
    pub(crate) sender_server_error: Counters,
    /// Listeners connected now.
    pub(crate) active_listeners: Gauges,
    /// Tunnels open now.
    pub(crate) active_connections: Gauges,
    /// Sockets listeners keep parked for senders (standby extension).
    pub(crate) standby_sockets: Gauges,
    /// Senders joined to a parked socket (standby extension) rather than by rendezvous.
    pub(crate) standby_pairings: Counters,
    /// Listener control channels that ended.
    pub(crate) listener_disconnects: Counters,
    /// Tunnels that ended.
    pub(crate) sender_disconnects: Counters,
    /// Payload bytes through tunnels, both directions, counted as tunnels close.
    pub(crate) bytes_transferred: Counters,
    /// Time from a sender's upgrade request to its tunnel being open.
    pub(crate) connect_latency: Family<Hc, Histogram>,
    /// Large I/O buffers held now (read from [`hyco_io::bufpool::held`] when encoding).
    buffers_held: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hyco");
        let m = Metrics {
            listener_success: Counters::default(),
            listener_client_error: Counters::default(),
            listener_server_error: Counters::default(),
            sender_success: Counters::default(),
            sender_client_error: Counters::default(),
            sender_server_error: Counters::default(),
            active_listeners: Gauges::default(),
            active_connections: Gauges::default(),
            standby_sockets: Gauges::default(),
            standby_pairings: Counters::default(),
            listener_disconnects: Counters::default(),
            sender_disconnects: Counters::default(),
            bytes_transferred: Counters::default(),
            connect_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            buffers_held: Gauge::default(),
            registry: Registry::default(),
        };
        let counters: [(&str, &str, &Counters); 10] = [
            ("listener_connections_success", "ListenerConnections-Success: listener control channels opened", &m.listener_success),
            ("listener_connections_client_error", "ListenerConnections-ClientError: listener connections refused with 4xx", &m.listener_client_error),
            ("listener_connections_server_error", "ListenerConnections-ServerError: listener connections refused with 5xx", &m.listener_server_error),
            ("sender_connections_success", "SenderConnections-Success: sender connections that became tunnels", &m.sender_success),
            ("sender_connections_client_error", "SenderConnections-ClientError: sender connections refused with 4xx", &m.sender_client_error),
            ("sender_connections_server_error", "SenderConnections-ServerError: sender connections refused with 5xx", &m.sender_server_error),
            ("standby_pairings", "Sender connections joined to a socket their listener had parked (hyco extension)", &m.standby_pairings),
            ("listener_disconnects", "ListenerDisconnects: listener control channels that ended", &m.listener_disconnects),
            ("sender_disconnects", "SenderDisconnects: tunnels that ended", &m.sender_disconnects),
            ("bytes_transferred", "BytesTransferred: tunnel payload bytes, both directions, counted when a tunnel closes", &m.bytes_transferred),
        ];
        for (name, help, family) in counters {
            registry.register(name, help, family.clone());
        }
        let gauges: [(&str, &str, &Gauges); 3] = [
            (
                "active_listeners",
                "ActiveListeners: listeners connected now",
                &m.active_listeners,
            ),
            (
                "active_connections",
                "ActiveConnections: tunnels open now",
                &m.active_connections,
            ),
            (
                "standby_sockets",
                "Sockets listeners keep parked for senders now (hyco extension)",
                &m.standby_sockets,
            ),
        ];
        for (name, help, family) in gauges {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "sender_connect_latency_seconds",
            "Time from a sender's upgrade request to its tunnel being open",
            m.connect_latency.clone(),
        );
        registry.register(
            "io_buffers_held",
            "64 KiB I/O buffers held now: one per tunnel direction moving bytes, none while idle",
            m.buffers_held.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Adds the cluster counters (`hyco_cluster_*`).
    pub(crate) fn register_cluster(&mut self, stats: &crate::cluster::ClusterStats) {
        stats.register(&mut self.registry);
    }

    /// Adds the tunnel limit's series (`hyco_tunnels_refused_total`, `hyco_tunnel_limit`,
    /// `hyco_tunnel_limit_reached`).
    pub(crate) fn register_tunnel_gate(&mut self, gate: &hyco_io::tunnels::TunnelGate) {
        gate.register(&mut self.registry);
    }

    /// The Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        self.buffers_held
            .set(i64::try_from(hyco_io::bufpool::held()).unwrap_or(i64::MAX));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a listen or connect answer by its status class.
    pub(crate) fn record_upgrade(&self, listen: bool, hc: &Hc, status: u16) {
        let family = match (listen, status) {
            (true, 101) => &self.listener_success,
            (true, 400..=499) => &self.listener_client_error,
            (true, _) => &self.listener_server_error,
            // Sender successes are counted when the tunnel opens.
            (false, 101) => return,
            (false, 400..=499) => &self.sender_client_error,
            (false, _) => &self.sender_server_error,
        };
        family.get_or_create(hc).inc();
    }
}
