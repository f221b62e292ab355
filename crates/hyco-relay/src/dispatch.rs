//! Offering a sender to a listener: one loop for a WebSocket sender's `accept` and an HTTP
//! request's `request`, on this node or another of the cluster.

use std::sync::Arc;

use tracing::debug;

use crate::error::RelayError;
use crate::registry::{id_list, ControlMsg, ListenerEntry};
use crate::select::{pick, Target, Tried};
use crate::Shared;

/// How many listeners one sender is offered to at most. A listener that leaves (or whose
/// queue is full, or whose node does not answer) between being picked and answering does not
/// cost the sender the whole deadline: the offer goes to another. Three tries ride out a
/// listener restarting or a node failing over, while a hybrid connection whose listeners all
/// misbehave still answers its sender within three deliveries rather than trying them all.
pub(crate) const MAX_OFFERS: usize = 3;

/// Azure's answer (404) when listeners are connected but the sender's
/// `Microsoft-Relay-AllowedListeners` / `DisallowedListeners` rule out all of them.
pub(crate) const NO_LISTENER_QUALIFIES: &str =
    "None of the connected listeners meet the AllowedListeners/DisallowedListeners criteria.";

/// Why no listener took an offer.
pub(crate) enum NotOffered {
    /// No listener was left to pick; `tried` listeners had been offered it before.
    NoneLeft {
        /// Whether any listener had been tried.
        tried: bool,
    },
    /// The sender's listener-choice headers rule out every connected listener.
    NoneQualifies,
    /// [`MAX_OFFERS`] listeners were offered it, and none took it.
    Exhausted,
    /// Building the offer failed (the sender gets this error).
    Refused(RelayError),
}

/// The listener an offer went to.
pub(crate) struct Taken {
    /// The listener when it is connected here: its channel closing means it left.
    pub(crate) local: Option<Arc<ListenerEntry>>,
    /// Its `sb-hc-id`.
    pub(crate) listener_id: String,
}

impl Taken {
    /// Resolves when the listener leaves (a listener on another node: never; its leaving
    /// shows as the caller's deadline).
    pub(crate) async fn closed(&self) {
        match &self.local {
            Some(l) => l.tx.closed().await,
            None => std::future::pending().await,
        }
    }
}

/// One sender's offers to the listeners of one hybrid connection.
pub(crate) struct Offers<'a> {
    shared: &'a Shared,
    hc_key: &'a str,
    allowed: Option<Vec<String>>,
    disallowed: Vec<String>,
    tried: Tried,
}

impl<'a> Offers<'a> {
    /// Offers for a sender whose request came with `headers` (its listener-choice headers).
    pub(crate) fn new(shared: &'a Shared, hc_key: &'a str, headers: &http::HeaderMap) -> Self {
        Offers {
            shared,
            hc_key,
            allowed: id_list(headers.get("microsoft-relay-allowedlisteners")),
            disallowed: id_list(headers.get("microsoft-relay-disallowedlisteners"))
                .unwrap_or_default(),
            tried: Tried::default(),
        }
    }

    /// The listeners of this node the sender may be joined to (its listener-choice headers
    /// applied).
    pub(crate) fn local_listeners(&self) -> Vec<Arc<ListenerEntry>> {
        self.shared
            .registry
            .eligible(self.hc_key, self.allowed.as_deref(), &self.disallowed, &[])
    }

    /// Offers the sender to the next listener, at random among those not tried yet. `build`
    /// makes the message for the chosen target (with what the caller keeps while it waits);
    /// when the listener does not take it, `undo` gets that back and the next one is tried.
    /// Both may change the caller's `state` (an HTTP request's body goes out and comes back).
    pub(crate) async fn offer<S, T>(
        &mut self,
        state: &mut S,
        mut build: impl FnMut(&mut S, &Target) -> Result<(ControlMsg, T), RelayError>,
        mut undo: impl FnMut(&mut S, T),
    ) -> Result<(Taken, T), NotOffered> {
        loop {
            let allowed = self.allowed.as_deref();
            let Some(target) = pick(
                self.shared,
                self.hc_key,
                allowed,
                &self.disallowed,
                &self.tried,
            )
            .await
            else {
                return Err(if !self.tried.is_empty() {
                    NotOffered::NoneLeft { tried: true }
                } else if self.none_qualify().await {
                    NotOffered::NoneQualifies
                } else {
                    NotOffered::NoneLeft { tried: false }
                });
            };
            if self.tried.len() >= MAX_OFFERS {
                return Err(NotOffered::Exhausted);
            }
            self.tried.add(&target);
            let (msg, kept) = build(state, &target).map_err(NotOffered::Refused)?;
            match self.deliver(target, msg).await {
                Some(taken) => return Ok((taken, kept)),
                None => undo(state, kept),
            }
        }
    }

    /// Hands `msg` to the target's control channel; `None` when it does not take it.
    async fn deliver(&self, target: Target, msg: ControlMsg) -> Option<Taken> {
        match target {
            Target::Local(listener) => match listener.tx.try_send(msg) {
                Ok(()) => Some(Taken {
                    listener_id: listener.listener_id.clone(),
                    local: Some(listener),
                }),
                Err(e) => {
                    debug!(hc = %self.hc_key, listener_id = %listener.listener_id, error = %e, "listener unavailable; offering to another");
                    None
                }
            },
            Target::Remote(r) => {
                // Another node's listener gets commands only (an HTTP request goes to it
                // address-only; its body never crosses between nodes).
                let delivered = match (&self.shared.cluster, msg) {
                    (Some(c), ControlMsg::Command(json)) => c.deliver(self.hc_key, &r, json).await,
                    _ => false,
                };
                if !delivered {
                    tracing::info!(hc = %self.hc_key, node = %r.node, listener_id = %r.listener_id, "listener's node did not take the offer; offering to another");
                    return None;
                }
                Some(Taken {
                    local: None,
                    listener_id: r.listener_id,
                })
            }
        }
    }

    /// Whether the sender named listeners to allow or disallow and some listener is connected
    /// (so the headers, not the absence of listeners, left nobody to pick).
    async fn none_qualify(&self) -> bool {
        (self.allowed.is_some() || !self.disallowed.is_empty())
            && pick(self.shared, self.hc_key, None, &[], &Tried::default())
                .await
                .is_some()
    }
}
