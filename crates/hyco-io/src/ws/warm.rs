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
//!
//! With the relay's `reuse` extension a connection comes back after its tunnel ([`Loan`]): a
//! connection lent to a tunnel counts as one of the pool's for [`RETURN_GRACE`], so a pool
//! whose tunnels are short (a connection per request) stops dialling replacements that would
//! only find the pool full when the lent ones return. A loan still out after the grace (a
//! long tunnel) is replaced.

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
    takes: Takes,
    /// Connections lent to tunnels that may come back, by loan id, with when they were lent;
    /// those younger than [`RETURN_GRACE`] count as the pool's.
    lent: HashMap<u64, Instant>,
}

/// How long a connection lent to a tunnel counts as the pool's (see the module docs).
pub const RETURN_GRACE: Duration = Duration::from_secs(1);

impl Slot {
    /// Forgets loans past the grace; the number still counted.
    fn lent_now(&mut self) -> usize {
        self.lent.retain(|_, at| at.elapsed() < RETURN_GRACE);
        self.lent.len()
    }
}

/// Most take times remembered per target (bounds the memory).
const TAKES_KEPT: usize = 1024;

impl Slot {
    /// The most takes within one second, over those remembered.
    fn peak_per_second(&self) -> usize {
        self.takes.peak()
    }
}

/// Take times, oldest first, with the busiest second among them kept as they come and go:
/// O(1) amortised per take, and the refill loop, which asks on every wake-up, reads it
/// without a scan (a scan of 1 024 times per wake-up was a visible share of an agent's CPU
/// under a connection a transaction).
#[derive(Default)]
struct Takes {
    times: VecDeque<Instant>,
    /// The sequence number of `times[0]`.
    first_seq: u64,
    /// The index in `times` of the oldest take less than a second before the newest.
    window_from: usize,
    /// For the takes a one-second window may still end at: (sequence number, takes in the
    /// second up to it), the counts falling from front to back; the front is the peak.
    peaks: VecDeque<(u64, usize)>,
}

impl Takes {
    fn push(&mut self, now: Instant) {
        self.times.push_back(now);
        while self
            .times
            .get(self.window_from)
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.window_from += 1;
        }
        let count = self.times.len() - self.window_from;
        let seq = self.first_seq + self.times.len() as u64 - 1;
        while self.peaks.back().is_some_and(|&(_, c)| c <= count) {
            self.peaks.pop_back();
        }
        self.peaks.push_back((seq, count));
    }

    fn pop_front(&mut self) {
        if self.times.pop_front().is_none() {
            return;
        }
        if self
            .peaks
            .front()
            .is_some_and(|&(s, _)| s == self.first_seq)
        {
            self.peaks.pop_front();
        }
        self.first_seq += 1;
        self.window_from = self.window_from.saturating_sub(1);
    }

    fn front(&self) -> Option<&Instant> {
        self.times.front()
    }

    fn len(&self) -> usize {
        self.times.len()
    }

    fn peak(&self) -> usize {
        self.peaks.front().map_or(0, |&(_, c)| c)
    }
}

/// The pool, shared by the clones of a connector.
pub struct WarmPool {
    cfg: WarmConfig,
    slots: Mutex<HashMap<Key, Slot>>,
    /// Wakes the refill tasks when a connection was taken.
    taken: tokio::sync::Notify,
    next_loan: std::sync::atomic::AtomicU64,
}

/// A connection lent to a tunnel: given back after a normal end (`reuse`), it is ready for the
/// next connect to the same relay; dropped, the pool stops counting it.
pub struct Loan {
    pool: Arc<WarmPool>,
    key: Key,
    id: u64,
}

impl crate::ws::stream::Recycle<ClientTls> for Loan {
    fn give_back(self: Box<Self>, tls: ClientTls, rest: Vec<u8>) {
        // The relay sends nothing after its Close until a new request: bytes here mean the
        // connection is not what both ends think it is.
        if rest.is_empty() {
            self.pool.put_back(&self.key, self.id, tls);
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let mut g = self.pool.lock();
        if let Some(slot) = g.get_mut(&self.key) {
            if slot.lent.remove(&self.id).is_some() {
                drop(g);
                // One fewer counted: the refill may be short now.
                self.pool.taken.notify_waiters();
            }
        }
    }
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
                next_loan: std::sync::atomic::AtomicU64::new(0),
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
        slot.takes.push(now);
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

    /// Lends a connection to `key` to a tunnel (see [`Loan`]).
    pub fn lend(self: &Arc<Self>, key: &Key) -> Loan {
        let id = self
            .next_loan
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut g = self.lock();
        if let Some(slot) = g.get_mut(key) {
            slot.lent_now();
            slot.lent.insert(id, Instant::now());
        }
        Loan {
            pool: Arc::clone(self),
            key: key.clone(),
            id,
        }
    }

    /// A lent connection back after its tunnel: ready again, unless the pool has all it wants.
    fn put_back(&self, key: &Key, id: u64, tls: ClientTls) {
        let mut g = self.lock();
        let Some(slot) = g.get_mut(key) else { return };
        slot.lent.remove(&id);
        let lent = slot.lent_now();
        if slot.ready.len() + lent < self.wanted(slot) {
            slot.ready.push_back((tls, Instant::now()));
        }
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
                let lent = slot.lent_now();
                let missing = self
                    .wanted(slot)
                    .saturating_sub(slot.ready.len() + dialling.len() + lent);
                // Wake when the oldest ages out, or a loan stops counting.
                let oldest = slot.ready.front().map(|(_, born)| *born);
                let wait = oldest.map_or(self.cfg.max_age, |b| {
                    self.cfg.max_age.saturating_sub(b.elapsed())
                });
                let wait = slot
                    .lent
                    .values()
                    .map(|at| RETURN_GRACE.saturating_sub(at.elapsed()))
                    .fold(wait, Duration::min);
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
        let mut slot = Slot::default();
        for ms in offsets_ms {
            slot.takes.push(t0 + Duration::from_millis(*ms));
        }
        slot
    }

    #[test]
    fn the_peak_follows_takes_as_they_age_out() {
        // A burst of 5 in the first second (the window ending at 1 000 ms holds 1, 2, 3, 4
        // and 1 000), then one a second.
        let mut s = slot_with(&[0, 1, 2, 3, 4, 1000, 2000, 3000]);
        assert_eq!(s.peak_per_second(), 5);
        // A window leaves with the take it ends at: the burst counts until 1 000 ms ages out
        // (at most a second later than its own takes, with idle_stop at 60 s).
        for _ in 0..5 {
            s.takes.pop_front();
        }
        assert_eq!(s.peak_per_second(), 5);
        s.takes.pop_front();
        assert_eq!(s.peak_per_second(), 1);
        s.takes.pop_front();
        s.takes.pop_front();
        assert_eq!(s.peak_per_second(), 0);
        assert_eq!(s.takes.len(), 0);
        // Pushes after pops count from the takes still kept.
        let t0 = Instant::now();
        for ms in [0, 10, 20] {
            s.takes.push(t0 + Duration::from_millis(ms));
        }
        assert_eq!(s.peak_per_second(), 3);
        s.takes.push(t0 + Duration::from_millis(1015));
        assert_eq!(s.peak_per_second(), 3, "10, 20 and 1 015 ms");
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

    /// A connection lent to a tunnel counts as the pool's until it comes back, is dropped, or
    /// its grace is over (then the refill replaces it).
    #[tokio::test(start_paused = true)]
    async fn a_loan_counts_until_dropped_or_for_the_grace() {
        let pool = WarmPool::new(WarmConfig::default()).unwrap();
        let key: Key = ("relay.example".into(), 443);
        let lent = |p: &WarmPool| p.lock().get_mut(&key).map_or(0, Slot::lent_now);
        let (none, _) = pool.take(&key);
        assert!(none.is_none());
        let loan = pool.lend(&key);
        let second = pool.lend(&key);
        assert_eq!(lent(&pool), 2);
        drop(loan);
        assert_eq!(lent(&pool), 1, "a dropped loan stops counting at once");
        tokio::time::advance(RETURN_GRACE).await;
        assert_eq!(lent(&pool), 0, "past the grace it is replaced");
        drop(second);
        assert_eq!(lent(&pool), 0);
        // A target nobody took from has no slot: a loan of it counts nowhere.
        let other: Key = ("other.example".into(), 443);
        let _l = pool.lend(&other);
        assert!(pool.lock().get(&other).is_none());
    }
}
