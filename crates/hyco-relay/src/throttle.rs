//! Per-address throttle of failed authorizations (attacks.md A-rows, issue 7: token brute
//! force). Each source (an IPv4 address, or an IPv6 prefix: [`source_key`]) has a bucket of `burst` failures refilled at `per_sec`; an address
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

/// The key per-address limits count `ip` under: an IPv4 address (IPv4-mapped IPv6 included)
/// as itself, an IPv6 address by its first `v6_prefix` bits (the rest zeroed). Whoever holds
/// a /64 has 2^64 addresses; keyed by the whole address, each would have its own budget.
pub(crate) fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The throttle. Cheap to consult: one lock, one map lookup.
pub(crate) struct AuthThrottle {
    burst: f64,
    per_sec: f64,
    v6_prefix: u8,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AuthThrottle {
    /// `burst` failures at once, then `per_sec` per second. `burst == 0` turns it off.
    pub(crate) fn new(burst: u32, per_sec: f64) -> Self {
        AuthThrottle {
            burst: f64::from(burst),
            per_sec: per_sec.max(0.001),
            v6_prefix: 64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Counts IPv6 sources by their first `bits` bits (default 64; [`source_key`]).
    pub(crate) fn with_ipv6_prefix(mut self, bits: u8) -> Self {
        self.v6_prefix = bits.min(128);
        self
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
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.burst == 0.0 {
            return Ok(());
        }
        let ip = source_key(ip, self.v6_prefix);
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
    pub(crate) fn failed(&self, ip: IpAddr) {
        if self.burst == 0.0 {
            return;
        }
        let ip = source_key(ip, self.v6_prefix);
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
    #[cfg(test)]
    fn tracked(&self) -> usize {
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

    #[test]
    fn ipv6_sources_are_keyed_by_their_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        assert_eq!(source_key(a, 64), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("2001:db8:1:2::9"), 64), source_key(a, 64));
        assert_ne!(source_key(ip("2001:db8:1:3::9"), 64), source_key(a, 64));
        assert_eq!(source_key(a, 48), ip("2001:db8:1::"));
        assert_eq!(source_key(a, 128), a);
        assert_eq!(source_key(a, 200), a, "clamped to 128");
        assert_eq!(source_key(a, 0), ip("::"));
        // IPv4, and IPv4 written as IPv6, stay whole addresses.
        assert_eq!(source_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(source_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    }

    #[tokio::test(start_paused = true)]
    async fn one_ipv6_64_shares_one_budget() {
        let t = AuthThrottle::new(2, 1.0);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        t.failed(ip("fd00:15::10"));
        t.failed(ip("fd00:15::11"));
        assert!(t.check(ip("fd00:15::12")).is_err(), "same /64");
        assert!(t.check(ip("fd00:16::10")).is_ok(), "another /64");
        let whole = AuthThrottle::new(2, 1.0).with_ipv6_prefix(128);
        whole.failed(ip("fd00:15::10"));
        whole.failed(ip("fd00:15::11"));
        assert!(whole.check(ip("fd00:15::12")).is_ok());
    }
}
