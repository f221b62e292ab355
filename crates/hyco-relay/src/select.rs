//! Listener selection: which listener a sender (or an HTTP request) is offered to.
//!
//! A sender is joined to one listener chosen at random among the eligible ones (protocol.md
//! §5.1) of this node and, in a cluster, of every live node (the cluster module reads the
//! directory). The same code serves a single relay, where every target is local.

use std::sync::Arc;

use crate::registry::{eligible_id, ListenerEntry};
use crate::Shared;

/// A listener connected to another node.
#[derive(Debug, Clone)]
pub struct RemoteListener {
    /// Its node.
    pub node: String,
    /// The node's epoch when it registered.
    pub epoch: String,
    /// Relay-internal id on its node.
    pub conn_id: u64,
    /// Its `sb-hc-id`.
    pub listener_id: String,
}

impl RemoteListener {
    /// A key unique across the cluster, for "already tried" lists.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.node, self.epoch, self.conn_id)
    }
}

/// Where a sender (or an HTTP request) is sent.
pub enum Target {
    /// A listener connected to this node.
    Local(Arc<ListenerEntry>),
    /// A listener connected to another node.
    Remote(RemoteListener),
}

impl Target {
    /// The host of rendezvous addresses for this target. In a cluster always this node's
    /// advertised address: the listener must reach the node that holds the sender, whichever
    /// node holds the listener. Alone: the host the listener reached us by, so its TLS name check
    /// passes exactly as it did for the control channel.
    pub fn rendezvous_host(&self, shared: &Shared) -> String {
        match (&shared.cluster, self) {
            (Some(c), _) => c.advertise().to_owned(),
            (None, Target::Local(l)) => l.host.clone(),
            (None, Target::Remote(r)) => r.node.clone(),
        }
    }
}

/// Listeners already offered a sender.
#[derive(Default)]
pub struct Tried {
    local: Vec<u64>,
    remote: Vec<String>,
}

impl Tried {
    /// Remembers a target.
    pub fn add(&mut self, t: &Target) {
        match t {
            Target::Local(l) => self.local.push(l.conn_id),
            Target::Remote(r) => self.remote.push(r.key()),
        }
    }

    /// How many were tried.
    pub fn len(&self) -> usize {
        self.local.len() + self.remote.len()
    }

    /// Whether none was tried yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Picks a listener at random among the eligible ones of this node and, in a cluster, of every
/// live node, leaving out the `tried` ones.
pub async fn pick(
    shared: &Shared,
    hc: &str,
    allowed: Option<&[String]>,
    disallowed: &[String],
    tried: &Tried,
) -> Option<Target> {
    let local = shared
        .registry
        .eligible(hc, allowed, disallowed, &tried.local);
    let remote: Vec<RemoteListener> = match &shared.cluster {
        Some(c) => c
            .remote_listeners(hc)
            .await
            .into_iter()
            .filter(|r| eligible_id(&r.listener_id, allowed, disallowed))
            .filter(|r| !tried.remote.contains(&r.key()))
            .collect(),
        None => Vec::new(),
    };
    let n = local.len() + remote.len();
    if n == 0 {
        return None;
    }
    let i = rand::Rng::gen_range(&mut rand::thread_rng(), 0..n);
    Some(match local.get(i) {
        Some(l) => Target::Local(Arc::clone(l)),
        None => Target::Remote(remote.get(i - local.len())?.clone()),
    })
}
