//! The node lease and the listener directory in Redis.
//!
//! `node:{id}` holds a node's lease ([`NodeRecord`]); `nodes` the ids ever seen. `lst:{hc}`
//! holds the listeners of a hybrid connection, field `{node}:{epoch}:{conn}` → [`DirEntry`]; an
//! entry counts only while its node's lease holds the same epoch. `own:{node}` lists the fields
//! a node wrote, so a resync can remove what it no longer holds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::warn;

use super::{Cluster, ClusterError};
use crate::registry::DirOp;
use crate::select::RemoteListener;
use crate::Shared;

/// A listener's entry in `lst:{hc}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DirEntry {
    node: String,
    epoch: String,
    listener_id: String,
}

/// A node's lease, the value of `node:{id}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeRecord {
    epoch: String,
    advertise: String,
    started_at: u64,
    version: String,
}

/// The field of a listener in `lst:{hc}`.
fn field(node: &str, epoch: &str, conn_id: u64) -> String {
    format!("{node}:{epoch}:{conn_id}")
}

impl Cluster {
    /// Takes the node id: `SET NX` of the lease. A node that died without leaving holds it for
    /// up to one lease; one that keeps renewing it is another live node with this id.
    pub(super) async fn claim_node_id(&self) -> Result<(), ClusterError> {
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
                .arg(self.lease_ms())
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

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.cfg.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// Renews this node's lease; the number of live nodes.
    pub(super) async fn renew_lease(&self) -> redis::RedisResult<usize> {
        let json = self.record_json();
        let mut c = self.conn();
        let nodes_key = self.key("nodes");
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(self.key(&format!("node:{}", self.cfg.node_id)))
            .arg(json)
            .arg("PX")
            .arg(self.lease_ms())
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

    /// Leaves at once (a clean stop) instead of waiting for the lease to expire.
    pub(super) async fn leave(&self) {
        let mut c = self.conn();
        let key = self.key(&format!("node:{}", self.cfg.node_id));
        let _ = self.timed(c.del::<_, ()>(key)).await;
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

    /// A local listener's field in `lst:{hc}` and its entry there.
    fn own_entry(&self, conn_id: u64, listener_id: String) -> (String, String) {
        let e = DirEntry {
            node: self.cfg.node_id.clone(),
            epoch: self.epoch.clone(),
            listener_id,
        };
        let f = field(&self.cfg.node_id, &self.epoch, conn_id);
        (f, serde_json::to_string(&e).unwrap_or_default())
    }

    /// Writes one listener up or down to the directory.
    pub(super) async fn apply(&self, own: &str, op: DirOp) -> redis::RedisResult<()> {
        let mut c = self.conn();
        let mut p = redis::pipe();
        match op {
            DirOp::Up {
                hc,
                conn_id,
                listener_id,
            } => {
                let (f, json) = self.own_entry(conn_id, listener_id);
                self.put(&mut p, own, &hc, &f, &json);
            }
            DirOp::Down { hc, conn_id } => {
                let f = field(&self.cfg.node_id, &self.epoch, conn_id);
                p.hdel(self.key(&format!("lst:{hc}")), &f)
                    .ignore()
                    .srem(own, format!("{hc}\t{f}"))
                    .ignore();
            }
        }
        p.query_async(&mut c).await
    }

    /// Adds to `p` the writes of a listener entry: field `f` of `lst:{hc}`, and its member of
    /// `own` (`{hc}\t{f}`).
    fn put(&self, p: &mut redis::Pipeline, own: &str, hc: &str, f: &str, json: &str) {
        p.hset(self.key(&format!("lst:{hc}")), f, json)
            .ignore()
            .sadd(own, format!("{hc}\t{f}"))
            .ignore();
    }

    /// Rewrites everything this node holds: its listeners in, the rest of `own` out.
    pub(super) async fn resync_all(&self, shared: &Shared, own: &str) -> redis::RedisResult<usize> {
        let mut c = self.conn();
        let mut want: HashMap<String, (String, String, String)> = HashMap::new();
        for (hc, e) in shared.registry.all() {
            let (f, json) = self.own_entry(e.conn_id, e.listener_id.clone());
            want.insert(format!("{hc}\t{f}"), (hc, f, json));
        }
        let had: HashSet<String> = c.smembers(own).await?;
        let mut p = redis::pipe();
        for m in had.iter().filter(|m| !want.contains_key(*m)) {
            if let Some((hc, f)) = m.split_once('\t') {
                p.hdel(self.key(&format!("lst:{hc}")), f).ignore();
            }
            p.srem(own, m).ignore();
        }
        for (hc, f, json) in want.values() {
            self.put(&mut p, own, hc, f, json);
        }
        let _: () = p.query_async(&mut c).await?;
        Ok(want.len())
    }
}
