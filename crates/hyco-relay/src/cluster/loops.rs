//! The node's background tasks, from [`Cluster::start`] until the relay stops: the lease
//! renewal (and fencing), the directory writer, the inbox subscription, the configuration poll.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{now_ms, Cluster};
use crate::registry::DirOp;
use crate::Shared;

type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Cluster {
    /// Runs the node's tasks until the relay stops.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) {
        let rx = self.dir_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let stop = shared.shutdown.clone();
        let run = |fut: Task| {
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
            me.leave().await;
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
                    self.stats
                        .nodes
                        .set(i64::try_from(peers).unwrap_or(i64::MAX));
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
                        self.fence(&shared);
                    }
                }
            }
        }
    }

    /// Closes every listener's control channel with 1011 so they re-register where the cluster
    /// can see them: this node lost its lease.
    fn fence(&self, shared: &Shared) {
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

    /// Subscribes to this node's inbox and to `bcast` (again whenever the subscription ends)
    /// and hands every message the envelope takes to [`Cluster::handle`].
    async fn inbox_loop(self: Arc<Self>, shared: Arc<Shared>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(mut ps) = self.subscribe().await else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
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
                match self.envelopes.open(msg.get_payload_bytes(), now_ms()) {
                    Ok(env) => self.handle(&shared, env).await,
                    Err(why) => {
                        self.stats.bad_messages.inc();
                        warn!(channel = %msg.get_channel_name(), ?why, "dropped a cluster message with a bad MAC, age or shape, or replayed");
                    }
                }
            }
            debug!("node inbox subscription ended; resubscribing");
        }
    }

    /// A subscription to `inbox:{node}` and `bcast`, or `None` (logged) when Redis does not
    /// give one within 2 s.
    async fn subscribe(&self) -> Option<redis::aio::PubSub> {
        let inbox = self.key(&format!("inbox:{}", self.cfg.node_id));
        let bcast = self.key("bcast");
        let ps = async {
            let mut ps = self.client.get_async_pubsub().await?;
            ps.subscribe(&[inbox.as_str(), bcast.as_str()]).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(Duration::from_secs(2), ps).await {
            Ok(Ok(ps)) => Some(ps),
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                debug!(error = %why, "cannot subscribe to the node inbox; retrying");
                None
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
pub(super) async fn reload_config(cluster: &Cluster, shared: &Arc<Shared>) {
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
