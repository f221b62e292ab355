//! How a node joins a cluster ([`ClusterConfig`]) and why joining or talking to it failed
//! ([`ClusterError`]).

use std::time::Duration;

/// How a node joins a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Redis URL (`redis://`, `rediss://`, `redis+unix://`).
    pub url: String,
    /// Cluster name: the key prefix, so several clusters can share one Redis.
    pub name: String,
    /// This node's id (short, stable, unique in the cluster).
    pub node_id: String,
    /// `host:port` listeners dial for rendezvous with senders on this node. The certificate
    /// must cover the host.
    pub advertise: String,
    /// Key for the HMAC of cluster messages. `None`: a random key kept in Redis (protects
    /// against nothing that can write to Redis; set one for defence in depth).
    pub secret: Option<Vec<u8>>,
    /// Lease lifetime: a node silent for this long is dead to the others.
    pub lease: Duration,
    /// Lease renewal interval.
    pub refresh: Duration,
    /// How long a sender's node waits for the listener's node to confirm a delivery.
    pub ack_timeout: Duration,
    /// How often the configuration version is polled (pub/sub can lose messages).
    pub config_poll: Duration,
    /// Deadline of every Redis command.
    pub command_timeout: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    /// The URL may carry a password and `secret` is one: neither is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("node_id", &self.node_id)
            .field("advertise", &self.advertise)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl ClusterConfig {
    /// Defaults of cluster.md: 10 s lease renewed every 3 s, 2 s acknowledgement, 2 s poll.
    pub fn new(
        url: impl Into<String>,
        node_id: impl Into<String>,
        advertise: impl Into<String>,
    ) -> Self {
        ClusterConfig {
            url: url.into(),
            name: "default".into(),
            node_id: node_id.into(),
            advertise: advertise.into(),
            secret: None,
            lease: Duration::from_secs(10),
            refresh: Duration::from_secs(3),
            ack_timeout: Duration::from_secs(2),
            config_poll: Duration::from_secs(2),
            command_timeout: Duration::from_secs(1),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> String {
        format!("hyco:{}:", self.name)
    }

    /// Refuses a node id that is empty or has characters other than letters, digits, '-' and
    /// '_' (it is part of Redis keys and channel names).
    pub(super) fn check_node_id(&self) -> Result<(), ClusterError> {
        let ok = !self.node_id.is_empty()
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            return Ok(());
        }
        Err(ClusterError::Config(format!(
            "node id {:?}: use letters, digits, '-' and '_'",
            self.node_id
        )))
    }
}

/// Why joining the cluster, or a command to it, failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached or refused a command.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// Redis did not answer within [`ClusterConfig::command_timeout`].
    #[error("redis did not answer in time")]
    Timeout,
    /// A cluster message could not be encoded.
    #[error("cluster message: {0}")]
    Encode(#[from] serde_json::Error),
}
