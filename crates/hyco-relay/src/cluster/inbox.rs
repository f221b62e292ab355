//! Messages between nodes: this node's deliveries to listeners on other nodes, and what it does
//! with the messages its inbox receives (already opened by the envelope).
//!
//! A sender on node S whose chosen listener sits on node L: S publishes `Deliver` to `inbox:L`
//! and waits for the `Ack`; L writes the command to its listener's control channel and
//! acknowledges. `ConfigChanged` on `bcast` makes every node reload the configuration.

use std::collections::HashMap;
use std::sync::Arc;

use redis::AsyncCommands;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::envelope::{Body, Envelope};
use super::{now_ms, Cluster, ClusterError};
use crate::registry::ControlMsg;
use crate::select::RemoteListener;
use crate::Shared;

impl Cluster {
    /// Publishes `body` to `channel` (under the prefix): its id, and how many nodes received it.
    async fn publish(&self, channel: &str, body: Body) -> Result<(String, usize), ClusterError> {
        let (id, wire) = self.envelopes.seal(body, now_ms())?;
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
        let Ok((id, wire)) = self.envelopes.seal(body, now_ms()) else {
            return false;
        };
        self.lock_acks().insert(id.clone(), tx);
        let mut c = self.conn();
        let sent: Result<usize, ClusterError> = self
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

    /// Acts on a message the inbox took.
    pub(super) async fn handle(self: &Arc<Self>, shared: &Arc<Shared>, env: Envelope) {
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
                    super::loops::reload_config(self, shared).await;
                }
            }
        }
    }
}
