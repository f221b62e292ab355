//! Per-address throttle of failed authorizations (attacks.md A-rows, issue 7: token brute
//! force). Each source IP has a bucket of `burst` failures refilled at `per_sec`; an address
//! whose bucket is empty is answered 429 before any token is looked at, so guessing costs the
//! attacker time and the relay nothing. Successes cost nothing; other addresses are untouched.
//!
//! The table is bounded: when it is full, buckets that have refilled completely (addresses
//! that stopped failing) are dropped first; if none has, the new address is not tracked
//! (failing open for it rather than growing without bound).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most addresses tracked at once.
const MAX_TRACKED: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The throttle. Cheap to consult: one lock, one map lookup.
pub struct AuthThrottle {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AuthThrottle {
    /// `burst` failures at once, then `per_sec` per second. `burst == 0` turns it off.
    pub fn new(burst: u32, per_sec: f64) -> Self {
        AuthThrottle {
            burst: f64::from(burst),
            per_sec: per_sec.max(0.001),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * self.per_sec).min(self.burst);
        b.at = now;
    }

    /// `Err(retry_after)` when `ip` has used up its failures.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.burst == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut g = self.lock();
        match g.get_mut(&ip) {
            Some(b) => {
                self.refill(b, now);
                if b.tokens < 1.0 {
                    Err(Duration::from_secs_f64(
                        ((1.0 - b.tokens) / self.per_sec).ceil().max(1.0),
                    ))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    /// Records one failed authorization from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        if self.burst == 0.0 {
            return;
        }
        let now = Instant::now();
        let mut g = self.lock();
        if !g.contains_key(&ip) && g.len() >= MAX_TRACKED {
            let (burst, per_sec) = (self.burst, self.per_sec);
            g.retain(|_, b| {
                let dt = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + dt * per_sec < burst
            });
            if g.len() >= MAX_TRACKED {
                return;
            }
        }
        let b = g.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_refill_rate_and_other_addresses_untouched() {
        let t = AuthThrottle::new(3, 1.0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.check(a).is_ok());
            t.failed(a);
        }
        assert_eq!(t.check(a), Err(Duration::from_secs(1)));
        assert!(t.check(b).is_ok(), "another address is not affected");
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(
            t.check(a).is_ok(),
            "one failure allowed again after a second"
        );
        t.failed(a);
        assert!(t.check(a).is_err());
        let off = AuthThrottle::new(0, 1.0);
        for _ in 0..100 {
            off.failed(a);
        }
        assert!(off.check(a).is_ok());
        assert_eq!(off.tracked(), 0);
    }
}
