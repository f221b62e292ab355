//! The HMAC envelope of cluster messages and its replay window.
//!
//! On the wire (pub/sub `inbox:{node}` and `bcast`) a message is
//! `hex(HMAC-SHA256(key, json)).json`, where `json` is an [`Envelope`]. [`Envelopes::open`] takes
//! one only if it is at most [`MAX_WIRE_LEN`] bytes, its MAC verifies (in constant time), it
//! parses, its `sentAtMs` is within [`MAX_MESSAGE_AGE_MS`] of this node's clock either way, and
//! its id was not taken before: the replay window remembers each id until the message's age
//! alone refuses it, so a recorded message cannot be played again, neither later nor at once.
//! The format is the one every node version speaks; only the window is this side's own.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::ClusterError;

type HmacSha256 = Hmac<Sha256>;

/// Messages older than this (or this far in the future) are dropped: a recorded message cannot
/// be replayed later, and the replay window need not remember ids for longer.
pub(super) const MAX_MESSAGE_AGE_MS: u64 = 30_000;

/// The longest message taken. Cluster messages carry one listener command (an `accept` with a
/// sender's headers at most, which the HTTP server bounds well below this) escaped twice.
pub(super) const MAX_WIRE_LEN: usize = 8 << 20;

/// Ids the replay window holds at most; past this the oldest are forgotten first. Only holders
/// of the cluster key can fill it: it bounds memory, it is not the defence.
const MAX_REMEMBERED: usize = 1 << 18;

/// What a cluster message asks.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub(super) enum Body {
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

/// A message with its id, its sender and when it was sent (milliseconds since the epoch).
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(super) struct Envelope {
    pub(super) id: String,
    pub(super) from: String,
    pub(super) sent_at_ms: u64,
    pub(super) body: Body,
}

/// Why a message was refused.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum Refused {
    /// Longer than [`MAX_WIRE_LEN`].
    TooLong,
    /// No tag, or one that does not verify with the cluster key.
    Mac,
    /// Signed, but not an envelope this node understands.
    Shape,
    /// Sent more than [`MAX_MESSAGE_AGE_MS`] ago, or that far ahead of this node's clock.
    Age,
    /// Taken before.
    Replayed,
}

/// Seals this node's messages and opens everyone's.
pub(super) struct Envelopes {
    /// Keyed once; cloned for each message.
    mac: HmacSha256,
    /// This node's id: the `from` of what it seals.
    from: String,
    window: Mutex<ReplayWindow>,
}

impl Envelopes {
    /// Envelopes keyed with the cluster key, sent as node `from`.
    pub(super) fn new(key: &[u8], from: &str) -> Result<Envelopes, ClusterError> {
        let mac = HmacSha256::new_from_slice(key)
            .map_err(|_| ClusterError::Config("the cluster message key is unusable".into()))?;
        Ok(Envelopes {
            mac,
            from: from.to_owned(),
            window: Mutex::new(ReplayWindow::default()),
        })
    }

    /// The message id and the wire form of `body`, sent at `now_ms`.
    pub(super) fn seal(&self, body: Body, now_ms: u64) -> Result<(String, String), ClusterError> {
        let env = Envelope {
            id: hex::encode(rand::random::<[u8; 12]>()),
            from: self.from.clone(),
            sent_at_ms: now_ms,
            body,
        };
        let json = serde_json::to_string(&env)?;
        let mut mac = self.mac.clone();
        mac.update(json.as_bytes());
        let tag = hex::encode(mac.finalize().into_bytes());
        Ok((env.id, format!("{tag}.{json}")))
    }

    /// The envelope of a message received at `now_ms`, if it is to be taken (see the module
    /// comment); taking it enters its id in the replay window.
    pub(super) fn open(&self, wire: &[u8], now_ms: u64) -> Result<Envelope, Refused> {
        if wire.len() > MAX_WIRE_LEN {
            return Err(Refused::TooLong);
        }
        let mut parts = wire.splitn(2, |&b| b == b'.');
        let (Some(tag), Some(json)) = (parts.next(), parts.next()) else {
            return Err(Refused::Mac);
        };
        // Lowercase hex only, as every node writes it: one wire form per message.
        if tag.len() != 64 || !tag.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Refused::Mac);
        }
        let tag = hex::decode(tag).map_err(|_| Refused::Mac)?;
        let mut mac = self.mac.clone();
        mac.update(json);
        mac.verify_slice(&tag).map_err(|_| Refused::Mac)?; // constant time
        let env: Envelope = serde_json::from_slice(json).map_err(|_| Refused::Shape)?;
        if now_ms.abs_diff(env.sent_at_ms) > MAX_MESSAGE_AGE_MS {
            return Err(Refused::Age);
        }
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if !window.admit(&env.id, env.sent_at_ms, now_ms) {
            return Err(Refused::Replayed);
        }
        Ok(env)
    }
}

/// Ids of the messages taken whose age does not refuse them yet.
#[derive(Default)]
struct ReplayWindow {
    seen: HashSet<String>,
    /// In the order taken: when the age check starts refusing the message, and its id.
    order: VecDeque<(u64, String)>,
}

impl ReplayWindow {
    /// Takes `id` unless it was taken before. First forgets, oldest first, the ids whose
    /// messages are too old to pass the age check now (and the oldest beyond the cap).
    fn admit(&mut self, id: &str, sent_at_ms: u64, now_ms: u64) -> bool {
        while let Some((refused_after, _)) = self.order.front() {
            if *refused_after >= now_ms && self.order.len() < MAX_REMEMBERED {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if !self.seen.insert(id.to_owned()) {
            return false;
        }
        let refused_after = sent_at_ms.saturating_add(MAX_MESSAGE_AGE_MS);
        self.order.push_back((refused_after, id.to_owned()));
        true
    }
}

#[cfg(test)]
mod tests;
