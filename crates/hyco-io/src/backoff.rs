//! Jittered exponential backoff for reconnect loops.
//!
//! The first retry after losing an established link is immediate (like Microsoft's listeners);
//! later ones wait `base · 2^n`, capped at `max`, scaled by a random factor in [0.5, 1.0) so a
//! fleet of managers does not reconnect in lockstep after a relay restart. Call
//! [`Backoff::reset`] once a link has stayed up.
//!
//! With [`Backoff::with_fast_retries`], the delays of the first seconds after a loss stop
//! growing at a small ceiling: a restart (of the relay, or of this process while the relay
//! restarts) is over in a few seconds, and a backoff that has grown to 4–8 s by then is what
//! made recovery take up to 6 s (issue 15 §8). The jitter still spreads a fleet's reconnects
//! (each delay is scaled by a random factor in [0.5, 1.0), as always); after the window the
//! exponential growth resumes from the base, so a relay that stays down is not hammered.

use std::time::Duration;

use tokio::time::Instant;

/// The fast-retry window and ceiling the listener and the manager use: a retry at most every
/// second for the first 20 s after a loss.
pub const FAST_RETRIES: (Duration, Duration) = (Duration::from_secs(20), Duration::from_secs(1));

/// Backoff state for one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
    /// (window, ceiling) of the fast retries.
    fast: Option<(Duration, Duration)>,
    /// When the first retry since the last reset was asked for.
    lost_at: Option<Instant>,
    /// Retries spent in the fast window.
    fast_attempts: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            attempt: 0,
            base,
            max,
            fast: None,
            lost_at: None,
            fast_attempts: 0,
        }
    }

    /// For `window` after the first retry, delays grow only up to `ceiling` (jittered as
    /// always); after the window the growth resumes from the base.
    pub fn with_fast_retries(mut self, (window, ceiling): (Duration, Duration)) -> Self {
        self.fast = Some((window, ceiling));
        self
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let n = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        if n == 0 {
            self.lost_at = Some(Instant::now());
            return Duration::ZERO;
        }
        let mut cap = self.max;
        let mut k = n;
        if let (Some((window, ceiling)), Some(lost)) = (self.fast, self.lost_at) {
            if lost.elapsed() < window {
                self.fast_attempts = self.fast_attempts.saturating_add(1);
                cap = cap.min(ceiling);
            } else {
                k = n.saturating_sub(self.fast_attempts).max(1);
            }
        }
        let exp = self.base.saturating_mul(1u32 << (k - 1).min(16));
        exp.min(cap).mul_f64(rand::random::<f64>() * 0.5 + 0.5)
    }

    /// An established link was lost without having stayed up long enough for a
    /// [`Backoff::reset`]: a new fast window starts now (the growth beyond it goes on where it
    /// was). Without this, a relay restarted every few seconds would see its listeners' delays
    /// grow to the cap, since no link lasts long enough to reset them.
    pub fn link_lost(&mut self) {
        if self.attempt > 0 {
            self.lost_at = Some(Instant::now());
        }
    }

    /// Back to the first (immediate) retry.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.lost_at = None;
        self.fast_attempts = 0;
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

    /// The retries of the first 20 s after a loss stay under a second, whatever their number
    /// (before, the fifth already waited 4–8 s, the eighth 32 s at most 30); they still differ
    /// (jitter); after the window the growth starts from the base again.
    #[tokio::test(start_paused = true)]
    async fn fast_retries_for_a_window_then_growth() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
            .with_fast_retries(FAST_RETRIES);
        assert_eq!(b.next_delay(), Duration::ZERO);
        let mut seen = std::collections::HashSet::new();
        let mut spent = Duration::ZERO;
        while spent < Duration::from_secs(19) {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(250) && d < Duration::from_secs(1),
                "{d:?} at {spent:?}"
            );
            seen.insert(d);
            tokio::time::advance(d).await;
            spent += d;
        }
        assert!(seen.len() > 10, "jittered");
        tokio::time::advance(Duration::from_secs(2)).await;
        let d = b.next_delay();
        assert!(
            d >= Duration::from_millis(250) && d < Duration::from_millis(500),
            "{d:?}"
        );
        let d = b.next_delay();
        assert!(
            d >= Duration::from_millis(500) && d < Duration::from_secs(1),
            "{d:?}"
        );
        // A link that came up and was lost again soon starts a new window…
        for _ in 0..5 {
            b.next_delay();
        }
        b.link_lost();
        for _ in 0..10 {
            assert!(b.next_delay() < Duration::from_secs(1));
        }
        // …and a reset starts over with an immediate retry.
        b.reset();
        assert_eq!(b.next_delay(), Duration::ZERO);
        assert!(b.next_delay() < Duration::from_secs(1));
    }
}
