//! The tunnel limit: running out of descriptors is a status, not a hang (issue 15 §5).
//!
//! Every tunnel holds two sockets in the relay (sender and listener), in the manager (relay
//! and endpoint) and in the forwarder (application and relay). A process that opens them until
//! `accept` or `connect` fail with "Too many open files" can no longer even refuse: a refusal
//! needs a descriptor too (the relay's 503 rides on the accepted connection, the manager's
//! reject is a connection to the relay), and the senders wait for their deadline.
//!
//! So each process counts its tunnels against `--max-tunnels`, by default
//! `(RLIMIT_NOFILE - reserve) / 2` with `reserve = min(RLIMIT_NOFILE / 4, 200)` ([`default_max`]),
//! and refuses the next one at once while at the limit: the reserve keeps descriptors for the
//! control channels, handshakes, refusals and files. Reaching the limit is logged once (not per
//! refused tunnel), and once more when the count has fallen a tenth below it; both show in
//! metrics.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use tracing::{info, warn};

/// Seconds open tunnels may run on after SIGTERM before they are cut (`--drain-grace`): the
/// relay, the manager and the forwarder share this default.
pub const DRAIN_GRACE_SECS: u64 = 30;

/// The range `--drain-grace` (and the manager's `drain_grace_secs`) accepts: up to a day.
pub const DRAIN_GRACE_RANGE: std::ops::RangeInclusive<u64> = 0..=86_400;

/// Descriptors kept out of the tunnels' share for `nofile` (see the module doc).
pub fn reserve(nofile: u64) -> u64 {
    (nofile / 4).min(200)
}

/// The default `--max-tunnels` for a descriptor limit of `nofile` (at least 1).
pub fn default_max(nofile: u64) -> usize {
    let n = nofile.saturating_sub(reserve(nofile)) / 2;
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// This process's soft `RLIMIT_NOFILE`, from `/proc/self/limits`; `None` when unlimited or
/// unknown.
pub fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `flag` when given, else the default for this process's descriptor limit (no limit when it
/// is unlimited or unknown).
pub fn max_tunnels(flag: Option<usize>) -> usize {
    match flag {
        Some(n) => n.max(1),
        None => nofile_limit().map_or(usize::MAX, default_max),
    }
}

/// Counts a process's open tunnels against its limit.
pub struct TunnelGate {
    role: &'static str,
    max: usize,
    open: AtomicUsize,
    /// True from the first refusal until the count falls a tenth below the limit.
    refusing: AtomicBool,
    refused: Counter,
    /// 1 while `refusing`, for metrics.
    at_limit: Gauge,
    limit: Gauge,
}

impl std::fmt::Debug for TunnelGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelGate")
            .field("role", &self.role)
            .field("max", &self.max)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

/// One open tunnel's place under the limit; released on drop, however the tunnel ends.
pub struct TunnelPermit {
    gate: Arc<TunnelGate>,
}

impl TunnelGate {
    /// A gate of `max` tunnels for `role` ("relay", "manager", "forwarder": for the log).
    pub fn new(role: &'static str, max: usize) -> Arc<TunnelGate> {
        Arc::new(TunnelGate {
            role,
            max: max.max(1),
            open: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
            refused: Counter::default(),
            at_limit: Gauge::default(),
            limit: {
                let g = Gauge::default();
                g.set(i64::try_from(max).unwrap_or(i64::MAX));
                g
            },
        })
    }

    /// Registers `tunnels_refused` (counter), `tunnel_limit` and `tunnel_limit_reached` (1
    /// while refusing) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tunnels_refused",
            "New tunnels refused at the tunnel limit (--max-tunnels), which keeps a descriptor reserve",
            self.refused.clone(),
        );
        registry.register(
            "tunnel_limit",
            "The tunnel limit (--max-tunnels, by default derived from the descriptor limit)",
            self.limit.clone(),
        );
        registry.register(
            "tunnel_limit_reached",
            "1 from the first tunnel refused at the limit until the open tunnels fall a tenth below it",
            self.at_limit.clone(),
        );
    }

    /// A place for one more tunnel, or `None` at the limit (the first refusal of an episode
    /// is logged).
    pub fn try_acquire(self: &Arc<Self>) -> Option<TunnelPermit> {
        self.try_acquire_or(|| None)
    }

    /// [`TunnelGate::try_acquire`], but at the limit `reclaim` may first give back a place
    /// something held ahead of need (a parked standby socket, which yields to a real tunnel);
    /// only when it has none is the tunnel refused (counted and logged).
    pub fn try_acquire_or(
        self: &Arc<Self>,
        reclaim: impl FnOnce() -> Option<TunnelPermit>,
    ) -> Option<TunnelPermit> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if taken.is_ok() {
            return Some(TunnelPermit {
                gate: Arc::clone(self),
            });
        }
        if let Some(p) = reclaim() {
            return Some(p);
        }
        self.refused.inc();
        if !self.refusing.swap(true, Ordering::AcqRel) {
            self.at_limit.set(1);
            warn!(
                role = self.role,
                max_tunnels = self.max,
                "at the tunnel limit (--max-tunnels, derived from the descriptor limit): new tunnels are refused until some close"
            );
        }
        None
    }

    /// A place for something held ahead of need (a parked standby socket), only while a tenth
    /// of the limit stays free for real tunnels: such a place must never be why a tunnel is
    /// refused, and its own refusal is none (not counted, not logged).
    pub fn try_acquire_spare(self: &Arc<Self>) -> Option<TunnelPermit> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                self.spare_after(n).then_some(n + 1)
            });
        taken.is_ok().then(|| TunnelPermit {
            gate: Arc::clone(self),
        })
    }

    /// Whether [`TunnelGate::try_acquire_spare`] would give a place now.
    pub fn has_spare(&self) -> bool {
        self.spare_after(self.open())
    }

    /// Whether one more place leaves a tenth of the limit free, with `open` taken.
    fn spare_after(&self, open: usize) -> bool {
        open.saturating_add(self.max.div_ceil(10)) < self.max
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Tunnels refused at the limit so far.
    pub fn refused(&self) -> u64 {
        self.refused.get()
    }

    /// Whether new tunnels were refused and the count has not yet fallen a tenth below the
    /// limit.
    pub fn is_refusing(&self) -> bool {
        self.refusing.load(Ordering::Acquire)
    }
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        let g = &self.gate;
        let now = g.open.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        if now <= g.max - g.max.div_ceil(10) && g.refusing.swap(false, Ordering::AcqRel) {
            g.at_limit.set(0);
            info!(
                role = g.role,
                open = now,
                max_tunnels = g.max,
                "below the tunnel limit again: new tunnels are accepted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_keeps_a_reserve_and_two_descriptors_per_tunnel() {
        assert_eq!(default_max(300), (300 - 75) / 2);
        assert_eq!(default_max(1024), (1024 - 200) / 2);
        assert_eq!(default_max(20_000), 9_900);
        assert_eq!(default_max(0), 1);
        assert_eq!(max_tunnels(Some(0)), 1);
        assert_eq!(max_tunnels(Some(7)), 7);
        if let Some(n) = nofile_limit() {
            assert!(max_tunnels(None) == default_max(n) && n > 0);
        }
    }

    #[test]
    fn refuses_at_the_limit_and_recovers_when_tunnels_close() {
        let g = TunnelGate::new("test", 20);
        let mut held: Vec<_> = (0..20).map(|_| g.try_acquire().unwrap()).collect();
        assert!(g.try_acquire().is_none());
        assert!(g.try_acquire().is_none());
        assert_eq!((g.open(), g.refused()), (20, 2));
        assert!(g.is_refusing());
        held.pop();
        assert!(g.is_refusing(), "one below the limit is not yet a recovery");
        held.push(g.try_acquire().unwrap());
        held.truncate(18);
        assert!(!g.is_refusing(), "a tenth below: recovered");
        drop(held);
        assert_eq!(g.open(), 0);
    }
}
