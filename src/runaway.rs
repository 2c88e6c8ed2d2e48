//! The runaway breaker: when a scope's settled spend over a sliding window exceeds a
//! configured amount (an agent stuck in a loop: $5 in 60 s), the scope is blocked for a
//! cool-down and an alert is sent.
//!
//! Each gateway measures the spend it settles itself (sixty buckets per window, so the
//! window slides in steps of 1/60 of its length); the block it decides is written to the
//! admin catalog, so every gateway sharing the store enforces it. With N gateways behind
//! a balancer, each sees about 1/N of a scope's spend: set the amount per instance.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Deserialize;

use crate::budgets::ScopeKind;
use crate::pricing::usd_nano;

const BUCKETS: u64 = 60;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunawayRule {
    pub scope: ScopeKind,
    /// The scope's value; absent: every value of the scope, each measured on its own.
    #[serde(default)]
    pub id: Option<String>,
    /// Spend within the window that trips the breaker.
    #[serde(deserialize_with = "usd_nano")]
    pub max_usd: u64,
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    #[serde(default = "default_cooldown")]
    pub cooldown_seconds: u64,
}

fn default_window() -> u64 {
    60
}

fn default_cooldown() -> u64 {
    300
}

/// A scope that just tripped the breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    pub scope: String,
    pub spent_nano: u64,
    pub window_seconds: u64,
    pub until_ms: u64,
}

#[derive(Debug, Default)]
struct Window {
    /// (bucket number, nano-USD) ring.
    buckets: Vec<(u64, u64)>,
    blocked_until_ms: u64,
}

pub struct RunawayGuard {
    rules: Vec<RunawayRule>,
    windows: Mutex<HashMap<String, Window>>,
}

impl RunawayGuard {
    pub fn new(rules: &[RunawayRule]) -> RunawayGuard {
        RunawayGuard {
            rules: rules.to_vec(),
            windows: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn rule_for(&self, scope: &str) -> Option<&RunawayRule> {
        let (kind, id) = match scope.split_once(':') {
            Some((k, id)) => (k, Some(id)),
            None => (scope, None),
        };
        let of_kind = || self.rules.iter().filter(move |r| r.scope.label() == kind);
        of_kind()
            .find(|r| r.id.is_some() && r.id.as_deref() == id)
            .or_else(|| of_kind().find(|r| r.id.is_none()))
    }

    /// Until when this gateway has blocked a scope, if it has at `now_ms`.
    pub fn blocked_until(&self, scope: &str, now_ms: u64) -> Option<u64> {
        let windows = self.windows.lock().ok()?;
        windows
            .get(scope)
            .map(|w| w.blocked_until_ms)
            .filter(|until| *until > now_ms)
    }

    /// Adds a settled cost; returns a trip when the scope's window now exceeds its limit.
    pub fn record(&self, scope: &str, cost_nano: u64, now_ms: u64) -> Option<Trip> {
        let rule = self.rule_for(scope)?;
        let window_ms = rule.window_seconds.max(1) * 1000;
        let bucket_ms = (window_ms / BUCKETS).max(1);
        let bucket = now_ms / bucket_ms;
        let oldest = bucket.saturating_sub(BUCKETS - 1);
        let mut windows = self.windows.lock().ok()?;
        let w = windows.entry(scope.to_string()).or_default();
        if w.buckets.is_empty() {
            w.buckets = vec![(0, 0); BUCKETS as usize];
        }
        let slot = &mut w.buckets[(bucket % BUCKETS) as usize];
        if slot.0 != bucket {
            *slot = (bucket, 0);
        }
        slot.1 = slot.1.saturating_add(cost_nano);
        let spent = w
            .buckets
            .iter()
            .filter(|(b, _)| *b >= oldest)
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
        if spent <= rule.max_usd || w.blocked_until_ms > now_ms {
            return None;
        }
        w.blocked_until_ms = now_ms + rule.cooldown_seconds * 1000;
        // The cool-down starts from an empty window.
        w.buckets.iter_mut().for_each(|b| *b = (0, 0));
        Some(Trip {
            scope: scope.to_string(),
            spent_nano: spent,
            window_seconds: rule.window_seconds,
            until_ms: w.blocked_until_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(yaml: &str) -> RunawayGuard {
        let rules: Vec<RunawayRule> = crate::config::parse_yaml(yaml, "t").expect("yaml");
        RunawayGuard::new(&rules)
    }

    const USD: u64 = 1_000_000_000;

    #[test]
    fn trips_when_the_window_exceeds_the_limit_and_not_before() {
        let g = guard("[{scope: customer, max_usd: 5, window_seconds: 60, cooldown_seconds: 30}]");
        let t0 = 1_000_000_000;
        for i in 0..5 {
            assert_eq!(
                g.record("customer:a", USD, t0 + i * 1000),
                None,
                "${}",
                i + 1
            );
        }
        assert_eq!(g.record("team:x", 100 * USD, t0), None, "no rule for teams");
        let trip = g
            .record("customer:a", 1, t0 + 5000)
            .expect("trips above $5");
        assert_eq!(trip.until_ms, t0 + 5000 + 30_000);
        assert_eq!(trip.spent_nano, 5 * USD + 1);
        assert_eq!(
            g.record("customer:b", USD, t0),
            None,
            "each customer on its own"
        );
    }

    #[test]
    fn spend_older_than_the_window_slides_out() {
        let g = guard("[{scope: customer, max_usd: 5, window_seconds: 60}]");
        let t0 = 1_000_000_000;
        g.record("customer:a", 4 * USD, t0);
        assert_eq!(g.record("customer:a", 2 * USD, t0 + 61_000), None);
        assert!(g.record("customer:a", 4 * USD, t0 + 62_000).is_some());
    }

    #[test]
    fn a_named_rule_wins_over_the_generic_one() {
        let g = guard("[{scope: key, max_usd: 100}, {scope: key, id: k1, max_usd: 1}]");
        assert!(g.record("key:k1", 2 * USD, 1).is_some());
        assert!(g.record("key:k2", 2 * USD, 1).is_none());
    }
}
