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
//! How many are kept follows demand: at least `size`, and as many as the most connects that
//! came within one second over the last `idle_stop` (a burst of 8 is met by 8 warm
//! connections from the second burst on), never more than `burst_max`. Connections missing
//! from that number are dialled at once, side by side.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::tls::ClientTls;

/// Settings of the warm pool.
#[derive(Debug, Clone, Copy)]
pub struct WarmConfig {
    /// Connections kept per target at least, once it is in use (0: off).
    pub size: usize,
    /// Connections kept per target at most, when bursts of connects ask for more than `size`.
    pub burst_max: usize,
    /// A warm connection older than this is closed instead of used.
    pub max_age: Duration,
    /// Stop keeping a target warm after this long without a connect to it.
    pub idle_stop: Duration,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            size: 1,
            burst_max: 16,
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
    /// When connects took (or looked for) a connection, the last `idle_stop` of them, at
    /// most [`TAKES_KEPT`].
    takes: VecDeque<Instant>,
}

/// Most take times remembered per target (bounds the memory and the scan).
const TAKES_KEPT: usize = 1024;

impl Slot {
    /// The most takes within one second, over those remembered.
    fn peak_per_second(&self) -> usize {
        let t = &self.takes;
        let (mut peak, mut from) = (0, 0);
        for to in 0..t.len() {
            while t[to].duration_since(t[from]) >= Duration::from_secs(1) {
                from += 1;
            }
            peak = peak.max(to + 1 - from);
        }
        peak
    }
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
        let now = Instant::now();
        slot.last_used = Some(now);
        while slot.takes.len() >= TAKES_KEPT
            || slot
                .takes
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.cfg.idle_stop)
        {
            slot.takes.pop_front();
        }
        slot.takes.push_back(now);
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

    /// How many connections `slot` should have ready now.
    fn wanted(&self, slot: &Slot) -> usize {
        slot.peak_per_second()
            .clamp(self.cfg.size, self.cfg.burst_max.max(self.cfg.size))
    }

    /// Runs the refill of `key` until the target goes idle: keeps as many connections younger
    /// than `max_age` as [`WarmPool::wanted`] says, dialling the missing ones side by side with
    /// `dial`.
    pub async fn fill<F, Fut>(self: Arc<Self>, key: Key, dial: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<ClientTls>> + Send + 'static,
    {
        let mut failures = 0u32;
        let mut dialling = tokio::task::JoinSet::new();
        loop {
            // Registered before the state is read, so a take in between is not missed.
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            // Drop what aged out; decide whether to stop, dial, or wait.
            let (missing, wait) = {
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
                let missing = self
                    .wanted(slot)
                    .saturating_sub(slot.ready.len() + dialling.len());
                // Wake when the oldest ages out.
                let oldest = slot.ready.front().map(|(_, born)| *born);
                let wait = oldest.map_or(self.cfg.max_age, |b| {
                    self.cfg.max_age.saturating_sub(b.elapsed())
                });
                (missing, wait)
            };
            // After failures, one dial at a time until one succeeds.
            let missing = if failures > 0 {
                missing.min(1)
            } else {
                missing
            };
            if dialling.is_empty() || failures == 0 {
                for _ in 0..missing {
                    dialling.spawn(dial());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
                _ = taken => {}
                Some(done) = dialling.join_next() => match done.ok().flatten() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_with(offsets_ms: &[u64]) -> Slot {
        let t0 = Instant::now();
        Slot {
            takes: offsets_ms
                .iter()
                .map(|ms| t0 + Duration::from_millis(*ms))
                .collect(),
            ..Slot::default()
        }
    }

    #[test]
    fn the_pool_wants_the_busiest_second_within_its_bounds() {
        let pool = WarmPool::new(WarmConfig {
            size: 1,
            burst_max: 6,
            ..WarmConfig::default()
        })
        .unwrap();
        assert_eq!(slot_with(&[]).peak_per_second(), 0);
        assert_eq!(pool.wanted(&slot_with(&[])), 1, "at least size");
        // One every 500 ms: two in any second.
        assert_eq!(slot_with(&[0, 500, 1000, 1500]).peak_per_second(), 2);
        // A burst of 4 at 3 s, after spaced ones.
        let burst = slot_with(&[0, 1200, 3000, 3001, 3002, 3003, 5000]);
        assert_eq!(burst.peak_per_second(), 4);
        assert_eq!(pool.wanted(&burst), 4);
        // A burst of 9: capped at burst_max.
        let big = slot_with(&[0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(pool.wanted(&big), 6);
    }
}
