//! Retry spacing for a pod whose sandbox or status could not be set up.
use std::time::Duration;

/// The first retry comes quickly, because most failures (a plugin waiting for its agent, an
/// apiserver hiccup) are short.
const INITIAL_DELAY: Duration = Duration::from_secs(1);
/// Matches the spirit of the kubelet's crash-loop cap while keeping tests snappy.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Doubling delays from 1 s up to 30 s; reset after a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: INITIAL_DELAY,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(MAX_DELAY);
        delay
    }

    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_one_second_up_to_thirty() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_reset_starts_over() {
        let mut backoff = Backoff::default();
        backoff.next_delay();
        backoff.next_delay();
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
    }
}
