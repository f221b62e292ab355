//! Scale-out: several relay nodes share one namespace through Redis (cluster.md).
//!
//! What lives in Redis, under the prefix `hyco:{cluster name}:`:
//! * `node:{id}`: this node's lease (`{epoch, advertise}`, expires after [`ClusterConfig::lease`],
//!   renewed every [`ClusterConfig::refresh`]); `nodes`: the set of node ids ever seen.
//! * `lst:{hc}`: the listener directory of a hybrid connection, field `{node}:{epoch}:{conn}` →
//!   `{node, epoch, listenerId}`. An entry counts only while its node's lease holds the same
//!   epoch; stale ones are removed by whoever meets them. `own:{node}`: the fields a node wrote,
//!   so a resync can remove what it no longer holds.
//! * `cfg`, `cfg:ver`, `cfg:lock`: the configuration ([`crate::store`]), signed with a key
//!   derived from the cluster secret when there is one.
//!
//! Pub/sub: `inbox:{node}` (one per node) and `bcast`. Messages are JSON envelopes prefixed by
//! an HMAC-SHA256 over them with the cluster key; others are dropped and counted.
//!
//! A sender on node S whose chosen listener sits on node L: S keeps the pending rendezvous,
//! publishes `Deliver` (the `accept` command, whose address points at S) to `inbox:L`. `PUBLISH`
//! answering 0 means L is not there: S tries another listener at once. L writes the command to
//! its listener's control channel and acknowledges; the listener dials S. Bytes never cross
//! between nodes.
//!
//! Without Redis a node goes on serving its own listeners and senders (degraded); cross-node
//! dispatch and admin writes fail fast. When Redis returns, the node renews its lease, rewrites
//! its directory entries (resync) and reloads the configuration if it changed. A node that
//! could not renew its lease for longer than the lease plus one refresh closes its listeners'
//! control channels once with 1011 (`NameRenewalFailed`), so they re-register where the
//! cluster can see them (fencing).
//!
//! # Layout
//! * `config`: [`ClusterConfig`] and [`ClusterError`].
//! * `envelope`: the HMAC envelope of messages and its replay window.
//! * `directory`: the node lease and the listener directory in Redis.
//! * `inbox`: sending messages to other nodes (deliveries, acknowledgements, configuration
//!   changes) and acting on those received.
//! * `loops`: the background tasks: lease renewal, directory writer, inbox subscription,
//!   configuration poll.
//! * `stats`: [`ClusterStats`].
//!
//! Listener selection, which reads the directory, is [`crate::select`].

mod config;
mod directory;
mod envelope;
mod inbox;
mod loops;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::registry::DirOp;

pub use config::{ClusterConfig, ClusterError};
pub use stats::ClusterStats;

/// This node's membership in a cluster.
pub struct Cluster {
    /// Settings.
    pub cfg: ClusterConfig,
    /// Random per start: entries of an earlier life of this node id are recognised as stale.
    pub epoch: String,
    started_at: u64,
    prefix: String,
    client: redis::Client,
    conn: ConnectionManager,
    envelopes: envelope::Envelopes,
    acks: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    healthy: AtomicBool,
    peers: AtomicUsize,
    resync: Notify,
    /// The last configuration version refused (logged once each).
    refused_config: AtomicI64,
    /// Work counters.
    pub stats: ClusterStats,
    dir_rx: Mutex<Option<mpsc::UnboundedReceiver<DirOp>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.cfg.node_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch, as envelopes carry them.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Cluster {
    /// Connects to Redis and prepares the node; [`Cluster::start`] runs its tasks. Returns the
    /// queue the listener registry reports to.
    pub async fn connect(
        cfg: ClusterConfig,
    ) -> Result<(Arc<Cluster>, mpsc::UnboundedSender<DirOp>), ClusterError> {
        cfg.check_node_id()?;
        let client = redis::Client::open(cfg.url.as_str())?;
        let mcfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.command_timeout))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut conn = client.get_connection_manager_with_config(mcfg).await?;
        let prefix = cfg.prefix();
        let mac_key = match &cfg.secret {
            Some(k) => k.clone(),
            None => shared_random_key(&mut conn, &prefix).await?,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            epoch: hex::encode(rand::random::<[u8; 8]>()),
            started_at: crate::unix_now(),
            prefix,
            client,
            conn,
            envelopes: envelope::Envelopes::new(&mac_key, &cfg.node_id)?,
            acks: Mutex::new(HashMap::new()),
            healthy: AtomicBool::new(true),
            peers: AtomicUsize::new(0),
            resync: Notify::new(),
            refused_config: AtomicI64::new(-1),
            stats: ClusterStats::default(),
            dir_rx: Mutex::new(Some(rx)),
            cfg,
        });
        cluster.claim_node_id().await?;
        cluster.renew_lease().await?;
        Ok((cluster, tx))
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Whether Redis answered the last lease renewal.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Live nodes (this one included) at the last renewal.
    pub fn peers(&self) -> usize {
        self.peers.load(Ordering::Relaxed)
    }

    /// The cluster part of the status page.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "node": self.cfg.node_id,
            "advertise": self.cfg.advertise,
            "redis": if self.healthy() { "up" } else { "unreachable: serving local pairings only" },
            "nodes": self.peers(),
            "dispatched": self.stats.dispatched.get(),
            "delivered": self.stats.delivered.get(),
            "gone": self.stats.gone.get(),
            "badMessages": self.stats.bad_messages.get(),
            "fences": self.stats.fences.get(),
        })
    }

    /// Host and port of rendezvous addresses for senders on this node.
    pub fn advertise(&self) -> &str {
        &self.cfg.advertise
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A Redis command under the command deadline.
    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(self.cfg.command_timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ClusterError::Timeout),
        }
    }
}

/// Without a configured secret: the message key every node of the cluster shares, a random
/// one the first node stores in Redis (`SET NX`) and the others read.
async fn shared_random_key(
    conn: &mut ConnectionManager,
    prefix: &str,
) -> Result<Vec<u8>, ClusterError> {
    let fresh = hex::encode(rand::random::<[u8; 32]>());
    let key = format!("{prefix}secret");
    let _: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&fresh)
        .arg("NX")
        .query_async(conn)
        .await?;
    let k: String = conn.get(&key).await?;
    Ok(k.into_bytes())
}
