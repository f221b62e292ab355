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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::registry::{ControlMsg, DirOp};
use crate::select::RemoteListener;
use crate::Shared;

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
}

/// Why joining the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached or refused a command.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DirEntry {
    node: String,
    epoch: String,
    listener_id: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeRecord {
    epoch: String,
    advertise: String,
    started_at: u64,
    version: String,
}

fn field(node: &str, epoch: &str, conn_id: u64) -> String {
    format!("{node}:{epoch}:{conn_id}")
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Body {
    /// Write `command` to listener `conn_id` of `hc` (which must be on the receiving node, under
    /// `epoch`).
    #[serde(rename_all = "camelCase")]
    Deliver {
        hc: String,
        epoch: String,
        conn_id: u64,
        command: String,
    },
    /// The answer to a `Deliver`.
    #[serde(rename_all = "camelCase")]
    Ack { reply_to: String, delivered: bool },
    /// The configuration changed: reload it.
    #[serde(rename_all = "camelCase")]
    ConfigChanged { version: i64 },
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    id: String,
    from: String,
    sent_at_ms: u64,
    body: Body,
}

/// Messages older than this (or this far in the future) are dropped: a recorded message cannot
/// be replayed later.
const MAX_MESSAGE_AGE_MS: u64 = 30_000;

/// Counters of the cluster's work, for `/metrics` (as `hyco_cluster_*`) and the status page.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Accepts and requests this node sent to listeners on other nodes.
    pub dispatched: Counter,
    /// Deliveries other nodes asked of this node that reached a listener.
    pub delivered: Counter,
    /// Dispatches that found the other node or listener gone.
    pub gone: Counter,
    /// Messages dropped for a bad MAC, age or shape.
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
        r.register(
            "cluster_dispatched",
            "Accepts and HTTP requests sent to listeners on other nodes",
            self.dispatched.clone(),
        );
        r.register(
            "cluster_delivered",
            "Accepts and requests from other nodes written to a listener here",
            self.delivered.clone(),
        );
        r.register(
            "cluster_gone",
            "Dispatches whose node or listener was gone (the sender tried another)",
            self.gone.clone(),
        );
        r.register(
            "cluster_bad_messages",
            "Cluster messages dropped for a bad MAC, age or shape",
            self.bad_messages.clone(),
        );
        r.register(
            "cluster_bad_config",
            "Configuration versions in Redis refused for a missing or bad signature",
            self.bad_config.clone(),
        );
        r.register(
            "cluster_fences",
            "Times this node closed its listeners after losing its lease",
            self.fences.clone(),
        );
        r.register(
            "cluster_redis_up",
            "1 while Redis answers this node's lease renewals",
            self.redis_up.clone(),
        );
        r.register(
            "cluster_nodes",
            "Live nodes seen at the last lease renewal",
            self.nodes.clone(),
        );
    }
}

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
    mac_key: Vec<u8>,
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type HmacSha256 = Hmac<Sha256>;

impl Cluster {
    /// Connects to Redis and prepares the node; [`Cluster::start`] runs its tasks. Returns the
    /// queue the listener registry reports to.
    pub async fn connect(
        cfg: ClusterConfig,
    ) -> Result<(Arc<Cluster>, mpsc::UnboundedSender<DirOp>), ClusterError> {
        if cfg.node_id.is_empty()
            || !cfg
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ClusterError::Config(format!(
                "node id {:?}: use letters, digits, '-' and '_'",
                cfg.node_id
            )));
        }
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
            None => {
                let fresh = hex::encode(rand::random::<[u8; 32]>());
                let key = format!("{prefix}secret");
                let _: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&fresh)
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                let k: String = conn.get(&key).await?;
                k.into_bytes()
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            epoch: hex::encode(rand::random::<[u8; 8]>()),
            started_at: crate::unix_now(),
            prefix,
            client,
            conn,
            mac_key,
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

    /// Takes the node id: `SET NX` of the lease. A node that died without leaving holds it for
    /// up to one lease; one that keeps renewing it is another live node with this id.
    async fn claim_node_id(&self) -> Result<(), ClusterError> {
        let key = self.key(&format!("node:{}", self.cfg.node_id));
        let deadline = Instant::now() + self.cfg.lease + self.cfg.refresh;
        let mut waited = false;
        loop {
            let mut c = self.conn();
            let got: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(self.record_json())
                .arg("NX")
                .arg("PX")
                .arg(self.cfg.lease.as_millis() as u64)
                .query_async(&mut c)
                .await?;
            if got.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Config(format!(
                    "node id {:?} is in use by a live node (its lease keeps being renewed); give every node its own --node-id",
                    self.cfg.node_id
                )));
            }
            if !waited {
                waited = true;
                warn!(node = %self.cfg.node_id, "this node id is still leased (an earlier run that did not stop cleanly, or another node); waiting up to one lease");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn record_json(&self) -> String {
        let rec = NodeRecord {
            epoch: self.epoch.clone(),
            advertise: self.cfg.advertise.clone(),
            started_at: self.started_at,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        serde_json::to_string(&rec).unwrap_or_default()
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

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.cfg.command_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    async fn renew_lease(&self) -> redis::RedisResult<usize> {
        let json = self.record_json();
        let mut c = self.conn();
        let nodes_key = self.key("nodes");
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(self.key(&format!("node:{}", self.cfg.node_id)))
            .arg(json)
            .arg("PX")
            .arg(self.cfg.lease.as_millis() as u64)
            .ignore()
            .sadd(&nodes_key, &self.cfg.node_id)
            .ignore()
            .query_async(&mut c)
            .await?;
        let ids: Vec<String> = c.smembers(&nodes_key).await?;
        let live = self.live_epochs(&ids).await?;
        let gone: Vec<&String> = ids.iter().filter(|id| !live.contains_key(*id)).collect();
        if !gone.is_empty() {
            let _: () = c.srem(&nodes_key, gone).await?;
        }
        Ok(live.len())
    }

    /// The epochs of the nodes among `ids` whose lease holds.
    async fn live_epochs(&self, ids: &[String]) -> redis::RedisResult<HashMap<String, String>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&format!("node:{id}")))
            .collect();
        let mut c = self.conn();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        Ok(ids
            .iter()
            .zip(vals)
            .filter_map(|(id, v)| {
                let rec: NodeRecord = serde_json::from_str(v.as_deref()?).ok()?;
                Some((id.clone(), rec.epoch))
            })
            .collect())
    }

    /// Listeners of `hc` on other live nodes. Redis down: none (only local pairings work),
    /// without waiting on Redis until the next lease renewal succeeds.
    pub async fn remote_listeners(&self, hc: &str) -> Vec<RemoteListener> {
        if !self.healthy() {
            return Vec::new();
        }
        match self.timed(self.read_directory(hc)).await {
            Ok(v) => v,
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "the directory is unreachable; serving local pairings only");
                }
                self.stats.redis_up.set(0);
                Vec::new()
            }
        }
    }

    async fn read_directory(&self, hc: &str) -> redis::RedisResult<Vec<RemoteListener>> {
        let mut c = self.conn();
        let key = self.key(&format!("lst:{hc}"));
        let all: HashMap<String, String> = c.hgetall(&key).await?;
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let mut entries = Vec::new();
        let mut stale = Vec::new();
        for (f, v) in all {
            let conn_id = f.rsplit(':').next().and_then(|n| n.parse::<u64>().ok());
            match (serde_json::from_str::<DirEntry>(&v), conn_id) {
                (Ok(e), Some(conn_id)) => entries.push((f, e, conn_id)),
                _ => stale.push(f),
            }
        }
        let mut ids: Vec<String> = entries.iter().map(|(_, e, _)| e.node.clone()).collect();
        ids.sort();
        ids.dedup();
        let live = self.live_epochs(&ids).await?;
        let mut out = Vec::new();
        for (f, e, conn_id) in entries {
            if live.get(&e.node) != Some(&e.epoch) {
                stale.push(f);
                continue;
            }
            if e.node == self.cfg.node_id {
                continue; // the local registry is the truth for this node
            }
            out.push(RemoteListener {
                node: e.node,
                epoch: e.epoch,
                conn_id,
                listener_id: e.listener_id,
            });
        }
        if !stale.is_empty() {
            let _: redis::RedisResult<()> = c.hdel(&key, stale).await;
        }
        Ok(out)
    }

    /// The message id and the wire form: `hex(HMAC-SHA256(key, json)).json`.
    fn seal(&self, body: Body) -> Result<(String, String), String> {
        let env = Envelope {
            id: hex::encode(rand::random::<[u8; 12]>()),
            from: self.cfg.node_id.clone(),
            sent_at_ms: now_ms(),
            body,
        };
        let json = serde_json::to_string(&env).map_err(|e| e.to_string())?;
        // HMAC accepts keys of any length; the error arm is never taken.
        let mut mac = HmacSha256::new_from_slice(&self.mac_key).map_err(|e| e.to_string())?;
        mac.update(json.as_bytes());
        let tag = hex::encode(mac.finalize().into_bytes());
        Ok((env.id, format!("{tag}.{json}")))
    }

    fn open(&self, wire: &str) -> Option<Envelope> {
        let (tag, json) = wire.split_once('.')?;
        let tag = hex::decode(tag).ok()?;
        let mut mac = HmacSha256::new_from_slice(&self.mac_key).ok()?;
        mac.update(json.as_bytes());
        mac.verify_slice(&tag).ok()?; // constant time
        let env: Envelope = serde_json::from_str(json).ok()?;
        (now_ms().abs_diff(env.sent_at_ms) <= MAX_MESSAGE_AGE_MS).then_some(env)
    }

    async fn publish(&self, channel: &str, body: Body) -> Result<(String, usize), String> {
        let (id, wire) = self.seal(body)?;
        let mut c = self.conn();
        let n: usize = self.timed(c.publish(self.key(channel), wire)).await?;
        Ok((id, n))
    }

    /// Asks the listener's node to write `command` to its control channel. `false`: the node or
    /// the listener is gone (or did not confirm in time); try another listener.
    pub async fn deliver(&self, hc: &str, to: &RemoteListener, command: String) -> bool {
        let (tx, rx) = oneshot::channel();
        let body = Body::Deliver {
            hc: hc.to_owned(),
            epoch: to.epoch.clone(),
            conn_id: to.conn_id,
            command,
        };
        let Ok((id, wire)) = self.seal(body) else {
            return false;
        };
        self.lock_acks().insert(id.clone(), tx);
        let mut c = self.conn();
        let sent: Result<usize, String> = self
            .timed(c.publish(self.key(&format!("inbox:{}", to.node)), wire))
            .await;
        let ok = match sent {
            Ok(0) => {
                debug!(node = %to.node, "no subscriber on that node's inbox");
                false
            }
            Ok(_) => matches!(
                tokio::time::timeout(self.cfg.ack_timeout, rx).await,
                Ok(Ok(true))
            ),
            Err(e) => {
                debug!(error = %e, "dispatch failed");
                false
            }
        };
        self.lock_acks().remove(&id);
        if ok {
            self.stats.dispatched.inc();
        } else {
            self.stats.gone.inc();
        }
        ok
    }

    fn lock_acks(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<bool>>> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every node the configuration changed (each also polls the version).
    pub async fn config_changed(&self, version: i64) {
        if let Err(e) = self.publish("bcast", Body::ConfigChanged { version }).await {
            warn!(error = %e, "could not announce a configuration change; nodes poll for it");
        }
    }

    /// Runs the node's tasks until the relay stops.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) {
        let rx = self.dir_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let stop = shared.shutdown.clone();
        let run = |fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = fut => {}
                    _ = stop.cancelled() => {}
                }
            });
        };
        if let Some(rx) = rx {
            run(Box::pin(
                Arc::clone(self).directory_writer(Arc::clone(shared), rx),
            ));
        }
        run(Box::pin(Arc::clone(self).lease_loop(Arc::clone(shared))));
        run(Box::pin(Arc::clone(self).inbox_loop(Arc::clone(shared))));
        run(Box::pin(Arc::clone(self).config_poll(Arc::clone(shared))));
        // On a clean stop, leave the directory at once instead of waiting for the lease.
        let me = Arc::clone(self);
        let stop2 = shared.shutdown.clone();
        tokio::spawn(async move {
            stop2.cancelled().await;
            let mut c = me.conn();
            let key = me.key(&format!("node:{}", me.cfg.node_id));
            let _ = me.timed(c.del::<_, ()>(key)).await;
        });
    }

    async fn lease_loop(self: Arc<Self>, shared: Arc<Shared>) {
        let mut last_ok = Instant::now();
        let mut fenced = false;
        let mut tick = tokio::time::interval(self.cfg.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.timed(self.renew_lease()).await {
                Ok(peers) => {
                    self.peers.store(peers, Ordering::Relaxed);
                    self.stats.nodes.set(peers as i64);
                    self.stats.redis_up.set(1);
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        info!(node = %self.cfg.node_id, "redis is back: resyncing the directory");
                        self.resync.notify_one();
                    }
                    last_ok = Instant::now();
                    fenced = false;
                }
                Err(e) => {
                    self.stats.redis_up.set(0);
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        warn!(error = %e, "cannot renew the node lease; serving local pairings only");
                    }
                    if !fenced && last_ok.elapsed() > self.cfg.lease + self.cfg.refresh {
                        fenced = true;
                        self.stats.fences.inc();
                        warn!(node = %self.cfg.node_id, "node lease lost: closing listener control channels so they re-register (1011 NameRenewalFailed)");
                        for hc in shared.registry.hc_keys() {
                            shared.registry.close_all(
                                &hc,
                                1011,
                                "NameRenewalFailed: the relay node lost its lease.",
                            );
                        }
                    }
                }
            }
        }
    }

    /// Applies listener ups and downs to the directory in order; after a Redis outage rewrites
    /// everything this node holds.
    async fn directory_writer(
        self: Arc<Self>,
        shared: Arc<Shared>,
        mut rx: mpsc::UnboundedReceiver<DirOp>,
    ) {
        let own = self.key(&format!("own:{}", self.cfg.node_id));
        let mut dirty = false;
        loop {
            tokio::select! {
                op = rx.recv() => {
                    let Some(op) = op else { return };
                    if !self.healthy() {
                        // Redis is away: the resync when it returns writes the whole state,
                        // so a burst of (re)registrations does not wait on it one by one.
                        dirty = true;
                        continue;
                    }
                    let r = self.timed(self.apply(&own, op)).await;
                    if let Err(e) = r {
                        debug!(error = %e, "directory write failed; will resync");
                        dirty = true;
                    }
                }
                _ = self.resync.notified() => dirty = true,
            }
            if dirty && self.healthy() {
                match self.timed(self.resync_all(&shared, &own)).await {
                    Ok(n) => {
                        info!(listeners = n, "directory resynced");
                        dirty = false;
                    }
                    Err(e) => {
                        debug!(error = %e, "resync failed; retrying at the next change or renewal")
                    }
                }
            }
        }
    }

    async fn apply(&self, own: &str, op: DirOp) -> redis::RedisResult<()> {
        let mut c = self.conn();
        match op {
            DirOp::Up {
                hc,
                conn_id,
                listener_id,
            } => {
                let f = field(&self.cfg.node_id, &self.epoch, conn_id);
                let e = DirEntry {
                    node: self.cfg.node_id.clone(),
                    epoch: self.epoch.clone(),
                    listener_id,
                };
                let json = serde_json::to_string(&e).unwrap_or_default();
                redis::pipe()
                    .hset(self.key(&format!("lst:{hc}")), &f, json)
                    .ignore()
                    .sadd(own, format!("{hc}\t{f}"))
                    .ignore()
                    .query_async(&mut c)
                    .await
            }
            DirOp::Down { hc, conn_id } => {
                let f = field(&self.cfg.node_id, &self.epoch, conn_id);
                redis::pipe()
                    .hdel(self.key(&format!("lst:{hc}")), &f)
                    .ignore()
                    .srem(own, format!("{hc}\t{f}"))
                    .ignore()
                    .query_async(&mut c)
                    .await
            }
        }
    }

    async fn resync_all(&self, shared: &Shared, own: &str) -> redis::RedisResult<usize> {
        let mut c = self.conn();
        let mut want: HashMap<String, (String, String)> = HashMap::new();
        for (hc, e) in shared.registry.all() {
            let f = field(&self.cfg.node_id, &self.epoch, e.conn_id);
            let entry = DirEntry {
                node: self.cfg.node_id.clone(),
                epoch: self.epoch.clone(),
                listener_id: e.listener_id.clone(),
            };
            want.insert(
                format!("{hc}\t{f}"),
                (hc, serde_json::to_string(&entry).unwrap_or_default()),
            );
        }
        let had: HashSet<String> = c.smembers(own).await?;
        let mut p = redis::pipe();
        for m in had.iter().filter(|m| !want.contains_key(*m)) {
            if let Some((hc, f)) = m.split_once('\t') {
                p.hdel(self.key(&format!("lst:{hc}")), f).ignore();
            }
            p.srem(own, m).ignore();
        }
        for (m, (hc, json)) in &want {
            if let Some((_, f)) = m.split_once('\t') {
                p.hset(self.key(&format!("lst:{hc}")), f, json).ignore();
            }
            p.sadd(own, m).ignore();
        }
        let _: () = p.query_async(&mut c).await?;
        Ok(want.len())
    }

    async fn inbox_loop(self: Arc<Self>, shared: Arc<Shared>) {
        let inbox = self.key(&format!("inbox:{}", self.cfg.node_id));
        let bcast = self.key("bcast");
        let mut backoff = Duration::from_millis(100);
        loop {
            let ps = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&[inbox.as_str(), bcast.as_str()]).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let mut ps = match tokio::time::timeout(Duration::from_secs(2), ps).await {
                Ok(Ok(ps)) => ps,
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    debug!(error = %why, "cannot subscribe to the node inbox; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Redis answers again: dispatch across nodes at once rather than at the next lease
            // renewal. Messages may have been lost while unsubscribed: catch up.
            if !self.healthy.swap(true, Ordering::Relaxed) {
                info!(node = %self.cfg.node_id, "redis is back: resyncing the directory");
                self.stats.redis_up.set(1);
            }
            self.resync.notify_one();
            reload_config(&self, &shared).await;
            let mut stream = ps.on_message();
            while let Some(msg) = stream.next().await {
                let Ok(wire) = msg.get_payload::<String>() else {
                    self.stats.bad_messages.inc();
                    continue;
                };
                let Some(env) = self.open(&wire) else {
                    self.stats.bad_messages.inc();
                    warn!(channel = %msg.get_channel_name(), "dropped a cluster message with a bad MAC, age or shape");
                    continue;
                };
                self.handle(&shared, env).await;
            }
            debug!("node inbox subscription ended; resubscribing");
        }
    }

    async fn handle(self: &Arc<Self>, shared: &Arc<Shared>, env: Envelope) {
        match env.body {
            Body::Deliver {
                hc,
                epoch,
                conn_id,
                command,
            } => {
                let target = (epoch == self.epoch)
                    .then(|| shared.registry.find(&hc, conn_id))
                    .flatten();
                let delivered =
                    target.is_some_and(|l| l.tx.try_send(ControlMsg::Command(command)).is_ok());
                if delivered {
                    self.stats.delivered.inc();
                }
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    let ack = Body::Ack {
                        reply_to: env.id,
                        delivered,
                    };
                    if let Err(e) = me.publish(&format!("inbox:{}", env.from), ack).await {
                        debug!(error = %e, "could not acknowledge a delivery");
                    }
                });
            }
            Body::Ack {
                reply_to,
                delivered,
            } => {
                if let Some(tx) = self.lock_acks().remove(&reply_to) {
                    let _ = tx.send(delivered);
                }
            }
            Body::ConfigChanged { version } => {
                if version != shared.store.version() {
                    reload_config(self, shared).await;
                }
            }
        }
    }

    async fn config_poll(self: Arc<Self>, shared: Arc<Shared>) {
        let mut tick = tokio::time::interval(self.cfg.config_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let key = self.key("cfg:ver");
        loop {
            tick.tick().await;
            let mut c = self.conn();
            match self.timed(c.get::<_, Option<i64>>(&key)).await {
                Ok(v) if v.unwrap_or(0) != shared.store.version() => {
                    reload_config(&self, &shared).await;
                }
                Ok(_) => {}
                Err(e) => debug!(error = %e, "configuration poll failed"),
            }
        }
    }
}

/// Reloads the configuration from Redis; when it changed, control channels re-check it: a
/// revoked key closes with 1008, a deleted hybrid connection with 1001 (`control.rs`), as for
/// a change made on this node.
async fn reload_config(cluster: &Cluster, shared: &Arc<Shared>) {
    let s = Arc::clone(shared);
    let r = tokio::task::spawn_blocking(move || s.store.reload()).await;
    match r {
        Ok(Ok(true)) => {
            debug!(node = %cluster.cfg.node_id, version = shared.store.version(), "configuration reloaded");
            shared.keys_changed.send_modify(|g| *g += 1);
        }
        Ok(Ok(false)) => {}
        Ok(Err(crate::store::StoreError::Unverified { ver, reason })) => {
            // Once per version: the poll meets the same refused version every few seconds.
            if cluster.refused_config.swap(ver, Ordering::Relaxed) != ver {
                cluster.stats.bad_config.inc();
                warn!(version = ver, reason = %reason, "refusing the configuration in Redis: not signed with this cluster's secret, or altered; keeping the last good one");
            }
        }
        Ok(Err(e)) => debug!(error = %e, "configuration reload failed"),
        Err(e) => debug!(error = %e, "configuration reload task failed"),
    }
}
