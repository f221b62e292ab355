//! The memory budget (attacks E6): past a configured resident size, new connections (listen,
//! connect, rendezvous, HTTP-mode requests) are refused with 503 instead of letting the
//! process grow until the kernel kills it and every tunnel with it. The admin API and running
//! tunnels are not affected.
//!
//! The resident size comes from `/proc/self/statm`, read at most every 100 ms.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

/// Page size assumed for `statm` (every Linux target we build for uses 4 KiB pages).
const PAGE: u64 = 4096;
const REFRESH_MS: u64 = 100;

/// The budget and a cached reading of the resident size.
pub(crate) struct MemoryBudget {
    limit: Option<u64>,
    rss: AtomicU64,
    /// Milliseconds since `epoch` of the last reading, plus one (0: never read).
    read_at: AtomicU64,
    epoch: Instant,
}

impl MemoryBudget {
    /// A budget of `limit` bytes of resident memory (`None`: no budget).
    pub(crate) fn new(limit: Option<u64>) -> Self {
        MemoryBudget {
            limit,
            rss: AtomicU64::new(0),
            read_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The resident size now (cached for 100 ms); 0 when it cannot be read.
    pub(crate) fn resident(&self) -> u64 {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.read_at.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= REFRESH_MS {
            self.read_at.store(now, Ordering::Relaxed);
            let rss = std::fs::read_to_string("/proc/self/statm")
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map_or(0, |pages| pages * PAGE);
            self.rss.store(rss, Ordering::Relaxed);
        }
        self.rss.load(Ordering::Relaxed)
    }

    /// Whether a new connection may start.
    pub(crate) fn allows_new(&self) -> bool {
        match self.limit {
            None => true,
            Some(limit) => self.resident() < limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_this_process_and_compares_with_the_limit() {
        let none = MemoryBudget::new(None);
        assert!(none.allows_new());
        assert!(
            none.resident() > 1 << 20,
            "a test process holds more than 1 MiB"
        );
        assert!(!MemoryBudget::new(Some(1 << 20)).allows_new());
        assert!(MemoryBudget::new(Some(1 << 40)).allows_new());
    }
}
