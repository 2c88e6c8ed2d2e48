//! The upstream breaker: when a provider's recent error or timeout rate crosses a
//! threshold, its circuit opens and requests fail fast (503) or go to the model's
//! configured fallback; after a cool-down one probe request is let through, and its
//! outcome closes or re-opens the circuit. State is per gateway process.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub enabled: bool,
    /// Outcomes older than this are forgotten.
    pub window_seconds: u64,
    /// Fewest outcomes in the window before the rate is judged.
    pub min_requests: usize,
    /// Share of failures (errors, timeouts, 5xx) that opens the circuit.
    pub error_rate: f64,
    /// How long an open circuit fails fast before a probe.
    pub open_seconds: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            window_seconds: 30,
            min_requests: 20,
            error_rate: 0.5,
            open_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is in flight; everything else fails fast until it reports (or, if it
    /// never does — it was refused before reaching the provider — until another
    /// cool-down has passed).
    Probing {
        since: Instant,
    },
}

#[derive(Debug)]
struct Inner {
    state: State,
    outcomes: VecDeque<(Instant, bool)>,
    /// Failures among `outcomes`, kept as they come and go (no scan per request).
    failed: usize,
}

impl Inner {
    fn clear(&mut self) {
        self.outcomes.clear();
        self.failed = 0;
    }
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

/// May a request go to this provider?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the probe of a half-open circuit.
    Probe,
    No,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            inner: Mutex::new(Inner {
                state: State::Closed,
                outcomes: VecDeque::new(),
                failed: 0,
            }),
        }
    }

    pub fn admit(&self, now: Instant) -> Admit {
        if !self.cfg.enabled {
            return Admit::Yes;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Admit::Yes;
        };
        match inner.state {
            State::Closed => Admit::Yes,
            State::Open { until } if now >= until => {
                inner.state = State::Probing { since: now };
                Admit::Probe
            }
            State::Probing { since }
                if now >= since + Duration::from_secs(self.cfg.open_seconds) =>
            {
                inner.state = State::Probing { since: now };
                Admit::Probe
            }
            State::Open { .. } | State::Probing { .. } => Admit::No,
        }
    }

    /// Reports how a request that was let through ended.
    pub fn record(&self, now: Instant, ok: bool, probe: bool) {
        if !self.cfg.enabled {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if probe || matches!(inner.state, State::Probing { .. }) {
            inner.clear();
            inner.state = if ok { State::Closed } else { self.open(now) };
            return;
        }
        let window = Duration::from_secs(self.cfg.window_seconds);
        inner.outcomes.push_back((now, ok));
        inner.failed += usize::from(!ok);
        while let Some(&(t, was_ok)) = inner.outcomes.front() {
            if now.duration_since(t) <= window {
                break;
            }
            inner.outcomes.pop_front();
            inner.failed -= usize::from(!was_ok);
        }
        let total = inner.outcomes.len();
        if inner.state == State::Closed
            && total >= self.cfg.min_requests
            && inner.failed as f64 >= self.cfg.error_rate * total as f64
        {
            inner.state = self.open(now);
            inner.clear();
        }
    }

    fn open(&self, now: Instant) -> State {
        State::Open {
            until: now + Duration::from_secs(self.cfg.open_seconds),
        }
    }

    pub fn is_open(&self) -> bool {
        self.inner
            .lock()
            .map(|i| i.state != State::Closed)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            enabled: true,
            window_seconds: 10,
            min_requests: 4,
            error_rate: 0.5,
            open_seconds: 5,
        })
    }

    #[test]
    fn opens_on_error_rate_fails_fast_then_probes() {
        let b = breaker();
        let t = Instant::now();
        for ok in [true, false, true] {
            assert_eq!(b.admit(t), Admit::Yes);
            b.record(t, ok, false);
        }
        assert_eq!(b.admit(t), Admit::Yes, "too few outcomes to judge");
        b.record(t, false, false);
        assert_eq!(b.admit(t), Admit::No, "2 of 4 failed: open");
        let later = t + Duration::from_secs(6);
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(b.admit(later), Admit::No, "one probe at a time");
        b.record(later, false, true);
        assert_eq!(b.admit(later), Admit::No, "a failed probe re-opens");
        let again = later + Duration::from_secs(6);
        assert_eq!(b.admit(again), Admit::Probe);
        b.record(again, true, true);
        assert_eq!(b.admit(again), Admit::Yes, "a good probe closes");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(t, false, false);
        }
        let later = t + Duration::from_secs(11);
        for _ in 0..3 {
            b.record(later, true, false);
        }
        b.record(later, false, false);
        assert_eq!(b.admit(later), Admit::Yes, "1 of 4 in the window failed");
    }
}
