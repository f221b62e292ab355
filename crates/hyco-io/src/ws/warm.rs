//! Warm connections: TCP and TLS to a relay done ahead of need, so that opening a sender
//! connection or a rendezvous is only the HTTP upgrade round trip.
//!
//! A connect that finds a warm connection to its `host:port` takes it and asks for a
//! replacement; one that finds none dials as usual and asks for `size` to be kept from then on.
//! A warm connection is handed out only while it is younger than `max_age`, which must stay
//! below the relay's handshake deadline (the relay closes a connection that sent no request
//! within 10 s). A target nobody connected to for `idle_stop` is no longer kept warm, so an idle
//! client does not handshake forever.
//!
//! The pool never holds more than `size` connections per target, and it refills one at a
//! time, so a burst of connects that empties it costs the relay no extra handshakes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::tls::ClientTls;

/// Settings of the warm pool.
#[derive(Debug, Clone, Copy)]
pub struct WarmConfig {
    /// Connections kept per target (0: off).
    pub size: usize,
    /// A warm connection older than this is closed instead of used.
    pub max_age: Duration,
    /// Stop keeping a target warm after this long without a connect to it.
    pub idle_stop: Duration,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            size: 1,
            max_age: Duration::from_secs(6),
            idle_stop: Duration::from_secs(60),
        }
    }
}

/// A target: host and port as dialled.
pub type Key = (String, u16);

#[derive(Default)]
struct Slot {
    ready: VecDeque<(ClientTls, Instant)>,
    /// A refill task runs for this target.
    filling: bool,
    last_used: Option<Instant>,
}

/// The pool, shared by the clones of a connector.
pub struct WarmPool {
    cfg: WarmConfig,
    slots: Mutex<HashMap<Key, Slot>>,
    /// Wakes the refill tasks when a connection was taken.
    taken: tokio::sync::Notify,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl WarmPool {
    /// A pool with these settings; `None` when `size` is 0.
    pub fn new(cfg: WarmConfig) -> Option<Arc<WarmPool>> {
        (cfg.size > 0).then(|| {
            Arc::new(WarmPool {
                cfg,
                slots: Mutex::new(HashMap::new()),
                taken: tokio::sync::Notify::new(),
            })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh warm connection to `key`, if there is one. Records the use either way, and
    /// returns whether a refill task should be started (the caller owns the dialling).
    pub fn take(&self, key: &Key) -> (Option<ClientTls>, bool) {
        let mut g = self.lock();
        let slot = g.entry(key.clone()).or_default();
        slot.last_used = Some(Instant::now());
        let mut found = None;
        while let Some((tls, born)) = slot.ready.pop_front() {
            if born.elapsed() < self.cfg.max_age {
                found = Some(tls);
                break;
            }
        }
        let start_fill = !slot.filling;
        if start_fill {
            slot.filling = true;
        }
        drop(g);
        if found.is_some() {
            self.taken.notify_waiters();
        }
        (found, start_fill)
    }

    /// Runs the refill of `key` until the target goes idle: keeps `size` connections younger
    /// than `max_age`, dialling one at a time with `dial`.
    pub async fn fill<F, Fut>(self: Arc<Self>, key: Key, dial: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<ClientTls>>,
    {
        let mut failures = 0u32;
        loop {
            // Registered before the state is read, so a take in between is not missed.
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            // Drop what aged out; decide whether to stop, dial, or wait.
            let next = {
                let mut g = self.lock();
                let Some(slot) = g.get_mut(&key) else { return };
                slot.ready
                    .retain(|(_, born)| born.elapsed() < self.cfg.max_age);
                let idle = slot
                    .last_used
                    .is_none_or(|t| t.elapsed() >= self.cfg.idle_stop);
                if idle {
                    g.remove(&key);
                    return;
                }
                if slot.ready.len() < self.cfg.size {
                    None
                } else {
                    // Wake when the oldest ages out.
                    let oldest = slot.ready.front().map(|(_, born)| *born);
                    Some(oldest.map_or(self.cfg.max_age, |b| {
                        self.cfg.max_age.saturating_sub(b.elapsed())
                    }))
                }
            };
            match next {
                Some(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
                        _ = taken => {}
                    }
                }
                None => match dial().await {
                    Some(tls) => {
                        failures = 0;
                        let mut g = self.lock();
                        match g.get_mut(&key) {
                            Some(slot) => slot.ready.push_back((tls, Instant::now())),
                            None => return,
                        }
                    }
                    None => {
                        // The relay is unreachable: connects will say so; back off here.
                        failures = (failures + 1).min(6);
                        tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                    }
                },
            }
        }
    }

    /// Warm connections held now (all targets).
    pub fn held(&self) -> usize {
        self.lock().values().map(|s| s.ready.len()).sum()
    }
}
