//! Pending rendezvous: a sender waiting for its listener to dial back.
//!
//! Each entry is keyed by a 128-bit random capability (`sb-hc-rv` in the accept address),
//! usable once, and removed when the sender's wait ends for any reason (accepted, rejected,
//! timed out, sender gone): [`PendingGuard`] does that on drop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// What the listener did with the accept.
pub(crate) enum Outcome {
    /// It dialled the address: here is its upgrade and chosen sub-protocol.
    Accepted {
        /// Resolves to the listener's connection once its 101 is written.
        upgrade: hyper::upgrade::OnUpgrade,
        /// `Sec-WebSocket-Protocol` of the listener's handshake.
        protocol: Option<String>,
    },
    /// It rejected with a status and reason for the sender.
    Rejected {
        /// Status for the sender.
        status: u16,
        /// Reason phrase for the sender.
        reason: String,
    },
}

struct Pending {
    hc: String,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Pending>,
    /// Entries per hybrid connection, for the per-HC cap (attacks E2).
    per_hc: HashMap<String, usize>,
}

impl Inner {
    fn remove(&mut self, id: &str) -> Option<Pending> {
        let p = self.by_id.remove(id)?;
        if let Some(n) = self.per_hc.get_mut(&p.hc) {
            *n -= 1;
            if *n == 0 {
                self.per_hc.remove(&p.hc);
            }
        }
        Some(p)
    }
}

/// The table of pending rendezvous.
#[derive(Default)]
pub(crate) struct Rendezvous {
    inner: Mutex<Inner>,
}

/// Removes its entry when dropped.
pub(crate) struct PendingGuard {
    table: Arc<Rendezvous>,
    id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

/// Why a rendezvous was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TakeError {
    /// Unknown, used or expired id (or one for another hybrid connection).
    Invalid,
}

/// Too many senders are already waiting.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Relay-wide cap.
    Relay,
    /// This hybrid connection's cap.
    HybridConnection,
}

impl Rendezvous {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a pending entry for `hc` under the capability `id`, unless a cap is reached.
    pub(crate) fn insert(
        self: &Arc<Self>,
        id: String,
        hc: String,
        max_total: usize,
        max_per_hc: usize,
    ) -> Result<(PendingGuard, oneshot::Receiver<Outcome>), Busy> {
        let (tx, rx) = oneshot::channel();
        {
            let mut g = self.lock();
            if g.by_id.len() >= max_total {
                return Err(Busy::Relay);
            }
            let n = g.per_hc.entry(hc.clone()).or_default();
            if *n >= max_per_hc {
                return Err(Busy::HybridConnection);
            }
            *n += 1;
            g.by_id.insert(id.clone(), Pending { hc, tx });
        }
        Ok((
            PendingGuard {
                table: Arc::clone(self),
                id,
            },
            rx,
        ))
    }

    /// Completes the entry `id` with `outcome`, once. An id for another hybrid connection leaves
    /// the entry untouched for the right listener (attacks B4).
    pub(crate) fn complete(&self, id: &str, hc: &str, outcome: Outcome) -> Result<(), TakeError> {
        let pending = {
            let mut g = self.lock();
            match g.by_id.get(id) {
                Some(p) if p.hc == hc => g.remove(id),
                _ => None,
            }
        };
        match pending {
            Some(p) => p.tx.send(outcome).map_err(|_| TakeError::Invalid),
            None => Err(TakeError::Invalid),
        }
    }
}
