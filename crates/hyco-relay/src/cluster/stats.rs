//! Counters of the cluster's work, for `/metrics` (as `hyco_cluster_*`) and the status page.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Counters of the cluster's work, for `/metrics` (as `hyco_cluster_*`) and the status page.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Accepts and requests this node sent to listeners on other nodes.
    pub dispatched: Counter,
    /// Deliveries other nodes asked of this node that reached a listener.
    pub delivered: Counter,
    /// Dispatches that found the other node or listener gone.
    pub gone: Counter,
    /// Messages dropped for a bad MAC, age or shape, or replayed.
    pub bad_messages: Counter,
    /// Times this node fenced itself.
    pub fences: Counter,
    /// Configuration versions in Redis refused for a missing or bad signature.
    pub bad_config: Counter,
    /// 1 while Redis answers the lease renewals.
    pub redis_up: Gauge,
    /// Live nodes at the last renewal.
    pub nodes: Gauge,
}

impl ClusterStats {
    /// Adds the counters to a metrics registry.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        let counters = [
            (
                "cluster_dispatched",
                "Accepts and HTTP requests sent to listeners on other nodes",
                &self.dispatched,
            ),
            (
                "cluster_delivered",
                "Accepts and requests from other nodes written to a listener here",
                &self.delivered,
            ),
            (
                "cluster_gone",
                "Dispatches whose node or listener was gone (the sender tried another)",
                &self.gone,
            ),
            (
                "cluster_bad_messages",
                "Cluster messages dropped for a bad MAC, age or shape",
                &self.bad_messages,
            ),
            (
                "cluster_bad_config",
                "Configuration versions in Redis refused for a missing or bad signature",
                &self.bad_config,
            ),
            (
                "cluster_fences",
                "Times this node closed its listeners after losing its lease",
                &self.fences,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        let gauges = [
            (
                "cluster_redis_up",
                "1 while Redis answers this node's lease renewals",
                &self.redis_up,
            ),
            (
                "cluster_nodes",
                "Live nodes seen at the last lease renewal",
                &self.nodes,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
    }
}
