//! Jittered exponential backoff for reconnect loops.
//!
//! The first retry after losing an established link is immediate (like Microsoft's listeners);
//! later ones wait `base · 2^n`, capped at `max`, scaled by a random factor in [0.5, 1.0) so a
//! fleet of managers does not reconnect in lockstep after a relay restart. Call
//! [`Backoff::reset`] once a link has stayed up.

use std::time::Duration;

/// Backoff state for one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            attempt: 0,
            base,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let n = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        if n == 0 {
            return Duration::ZERO;
        }
        let exp = self.base.saturating_mul(1u32 << (n - 1).min(16));
        let capped = exp.min(self.max);
        capped.mul_f64(rand::random::<f64>() * 0.5 + 0.5)
    }

    /// Back to the first (immediate) retry.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::ZERO);
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(100));
        for _ in 0..40 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        b.reset();
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
