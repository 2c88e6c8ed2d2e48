//! Budget and rate-limit policy: which limits apply to a request, and what it may cost at
//! worst. The store (see `store`) decides atomically; this module only prepares.
//!
//! Scopes: `customer:<id>`, `team:<id>`, `key:<id>`, `feature:<id>` and `global`. For each
//! scope a rule naming the value wins over a rule for every value of that scope (no `id`).
//! Customers follow: explicit budget, else their tier's, else `default_customer_budgets`.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::attribution::Attribution;
use crate::pricing::{usd_nano, ModelPrice};
use crate::store::{BudgetCheck, Enforcement, Period, ScopeCheck};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Customer,
    Team,
    Key,
    Feature,
    Global,
}

impl ScopeKind {
    pub fn label(self) -> &'static str {
        match self {
            ScopeKind::Customer => "customer",
            ScopeKind::Team => "team",
            ScopeKind::Key => "key",
            ScopeKind::Feature => "feature",
            ScopeKind::Global => "global",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Block,
    Clamp,
    Downgrade,
    Shadow,
}

/// What to do when the store cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Refuse with 503; nothing is forwarded.
    #[default]
    Closed,
    /// Admit without a reservation and count the failure.
    Open,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRule {
    /// Required in `budgets`; absent in tiers and default customer budgets.
    #[serde(default)]
    pub scope: Option<ScopeKind>,
    /// The scope's value (`acme`); absent: every value of the scope.
    #[serde(default)]
    pub id: Option<String>,
    pub period: Period,
    #[serde(deserialize_with = "usd_nano")]
    pub cap_usd: u64,
    #[serde(default)]
    pub action: Action,
    /// With `action: downgrade`: the cheaper model to switch to.
    #[serde(default)]
    pub downgrade_to: Option<String>,
    /// With `action: downgrade`: the share of the cap from which to switch (0.9 = 90%).
    #[serde(default = "default_downgrade_at")]
    pub downgrade_at: f64,
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Shares of the cap at which an alert is sent (default 0.5, 0.8, 0.9, 1.0).
    #[serde(default)]
    pub alert_thresholds: Option<Vec<f64>>,
}

fn default_downgrade_at() -> f64 {
    0.9
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    pub scope: ScopeKind,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub concurrency: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerConfig {
    #[serde(default)]
    pub tier: Option<String>,
}

/// The budget and limit part of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub budgets: Vec<BudgetRule>,
    pub default_customer_budgets: Vec<BudgetRule>,
    pub tiers: HashMap<String, Vec<BudgetRule>>,
    pub customers: HashMap<String, CustomerConfig>,
    pub rate_limits: Vec<RateLimitRule>,
    /// Output bound for requests that name none and whose model has no `max_output_tokens`.
    pub default_max_output_tokens: Option<u64>,
    /// Where budget alerts go.
    pub alerts: crate::alerts::AlertsConfig,
    /// Runaway breakers: spend over a sliding window that blocks a scope for a while.
    pub runaway: Vec<crate::runaway::RunawayRule>,
}

impl LimitsConfig {
    /// Config errors as (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.alerts.validate()?;
        for (i, b) in self.budgets.iter().enumerate() {
            let key = format!("budgets[{i}]");
            match (b.scope, &b.id) {
                (None, _) => return Err((format!("{key}.scope"), "required".into())),
                (Some(ScopeKind::Global), Some(_)) => {
                    return Err((format!("{key}.id"), "the global scope has no id".into()))
                }
                _ => {}
            }
            check_rule(b, &key)?;
        }
        let tiers = self.tiers.iter().flat_map(|(t, v)| {
            v.iter()
                .enumerate()
                .map(move |(i, b)| (format!("tiers.{t}[{i}]"), b))
        });
        let defaults = self
            .default_customer_budgets
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("default_customer_budgets[{i}]"), b));
        for (key, b) in tiers.chain(defaults) {
            if b.scope.is_some() || b.id.is_some() {
                return Err((key, "scope and id are implied here; remove them".into()));
            }
            check_rule(b, &key)?;
        }
        for (name, c) in &self.customers {
            if let Some(t) = &c.tier {
                if !self.tiers.contains_key(t) {
                    return Err((
                        format!("customers.{name}.tier"),
                        format!("no tier named {t:?}"),
                    ));
                }
            }
        }
        for (i, r) in self.rate_limits.iter().enumerate() {
            if [r.rpm, r.tpm, r.concurrency].contains(&Some(0)) {
                return Err((
                    format!("rate_limits[{i}]"),
                    "limits must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

pub fn check_rule(b: &BudgetRule, key: &str) -> Result<(), (String, String)> {
    if b.action == Action::Downgrade && b.downgrade_to.is_none() {
        return Err((
            format!("{key}.downgrade_to"),
            "required with action: downgrade".into(),
        ));
    }
    if !(0.0..=1.0).contains(&b.downgrade_at) {
        return Err((
            format!("{key}.downgrade_at"),
            "a share of the cap between 0 and 1".into(),
        ));
    }
    Ok(())
}

/// A budget that applies to one request, with what the gateway must remember about it.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Which of the request's scopes (an index into its checks, and later into its
    /// reservation's scopes): the scope key itself is not copied per rule.
    pub scope: usize,
    pub rule: Arc<BudgetRule>,
}

type Rules = Vec<Arc<BudgetRule>>;

/// Limits indexed for lookup on the request path: rules are shared, not copied, per
/// request, and found by scope kind and value without a scan of every rule.
#[derive(Debug, Default)]
pub struct Policy {
    config: LimitsConfig,
    /// Customers blocked through the admin API: refused before any store call.
    blocked_customers: foldhash::HashSet<String>,
    named: foldhash::HashMap<ScopeKind, foldhash::HashMap<String, Rules>>,
    generic: foldhash::HashMap<ScopeKind, Rules>,
    tiers: foldhash::HashMap<String, Rules>,
    defaults: Rules,
    rates_named: foldhash::HashMap<ScopeKind, foldhash::HashMap<String, RateLimitRule>>,
    rates_generic: foldhash::HashMap<ScopeKind, RateLimitRule>,
}

pub fn scope_key(kind: ScopeKind, value: &str) -> String {
    match kind {
        ScopeKind::Global => "global".to_string(),
        kind => {
            let label = kind.label();
            let mut key = String::with_capacity(label.len() + 1 + value.len());
            key.push_str(label);
            key.push(':');
            key.push_str(value);
            key
        }
    }
}

fn enforcement(action: Action) -> Enforcement {
    match action {
        Action::Block | Action::Downgrade => Enforcement::Block,
        Action::Clamp => Enforcement::Clamp,
        Action::Shadow => Enforcement::Shadow,
    }
}

impl Policy {
    pub fn new(config: LimitsConfig) -> Policy {
        let mut p = Policy {
            blocked_customers: Default::default(),
            ..Policy::default()
        };
        for b in &config.budgets {
            let Some(kind) = b.scope else { continue };
            let rule = Arc::new(b.clone());
            match (&b.id, kind) {
                (_, ScopeKind::Global) | (None, _) => {
                    p.generic.entry(kind).or_default().push(rule);
                }
                (Some(id), _) => p
                    .named
                    .entry(kind)
                    .or_default()
                    .entry(id.clone())
                    .or_default()
                    .push(rule),
            }
        }
        for (name, rules) in &config.tiers {
            p.tiers
                .insert(name.clone(), rules.iter().cloned().map(Arc::new).collect());
        }
        p.defaults = config
            .default_customer_budgets
            .iter()
            .cloned()
            .map(Arc::new)
            .collect();
        // The first rule for a scope (and value) wins, as in the file's order.
        for r in &config.rate_limits {
            match &r.id {
                Some(id) => {
                    p.rates_named
                        .entry(r.scope)
                        .or_default()
                        .entry(id.clone())
                        .or_insert_with(|| r.clone());
                }
                None => {
                    p.rates_generic.entry(r.scope).or_insert_with(|| r.clone());
                }
            }
        }
        p.config = config;
        p
    }

    /// The config's limits with the admin catalog's merged over them.
    pub fn with_catalog(base: &LimitsConfig, catalog: &crate::catalog::Catalog) -> Policy {
        let mut p = Policy::new(catalog.merge_limits(base));
        p.blocked_customers = catalog.blocked_customers().into_iter().collect();
        p
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    pub fn is_blocked(&self, customer: Option<&str>) -> bool {
        customer.is_some_and(|c| self.blocked_customers.contains(c))
    }

    pub fn is_empty(&self) -> bool {
        self.config.budgets.is_empty()
            && self.config.default_customer_budgets.is_empty()
            && self.config.tiers.is_empty()
            && self.config.rate_limits.is_empty()
    }

    pub fn default_max_output_tokens(&self) -> Option<u64> {
        self.config.default_max_output_tokens
    }

    /// A rule naming the value wins over a rule for every value; customers fall back to
    /// their tier, then to the default customer budgets.
    fn rules_for(&self, kind: ScopeKind, value: &str) -> &[Arc<BudgetRule>] {
        let generic = || self.generic.get(&kind).map_or(&[][..], Vec::as_slice);
        if kind == ScopeKind::Global {
            return generic();
        }
        if let Some(named) = self.named.get(&kind).and_then(|m| m.get(value)) {
            return named;
        }
        if kind != ScopeKind::Customer {
            return generic();
        }
        let tier = self
            .config
            .customers
            .get(value)
            .and_then(|c| c.tier.as_ref())
            .and_then(|t| self.tiers.get(t));
        match tier {
            Some(rules) => rules,
            None if generic().is_empty() => &self.defaults,
            None => generic(),
        }
    }

    fn rate_for(&self, kind: ScopeKind, value: &str) -> Option<&RateLimitRule> {
        self.rates_named
            .get(&kind)
            .and_then(|m| m.get(value))
            .or_else(|| self.rates_generic.get(&kind))
    }

    /// The checks for a request, and the budgets behind them. Scopes with nothing to
    /// enforce are left out, so a request without limits needs no store call at all.
    pub fn checks(&self, a: &Attribution) -> (Vec<ScopeCheck>, Vec<Applied>) {
        let scopes = [
            (ScopeKind::Global, Some("")),
            (ScopeKind::Team, a.team.as_deref()),
            (ScopeKind::Key, a.key_id.as_deref()),
            (ScopeKind::Customer, a.customer.as_deref()),
            (ScopeKind::Feature, a.feature.as_deref()),
        ];
        let mut checks = Vec::new();
        let mut applied = Vec::new();
        for (kind, value) in scopes {
            let Some(value) = value else { continue };
            let rules = self.rules_for(kind, value);
            let rate = self.rate_for(kind, value);
            if rules.is_empty() && rate.is_none() {
                continue;
            }
            let scope = checks.len();
            checks.push(ScopeCheck {
                scope: scope_key(kind, value),
                budgets: rules
                    .iter()
                    .map(|r| BudgetCheck {
                        period: r.period,
                        cap_nano: r.cap_usd,
                        enforcement: enforcement(r.action),
                    })
                    .collect(),
                rpm: rate.and_then(|r| r.rpm),
                tpm: rate.and_then(|r| r.tpm),
                concurrency: rate.and_then(|r| r.concurrency),
            });
            applied.extend(rules.iter().map(|rule| Applied {
                scope,
                rule: rule.clone(),
            }));
        }
        (checks, applied)
    }
}

/// nano-USD for `tokens` at `price_per_mtok` (nano-USD per million), rounded up: a
/// reservation may exceed the real cost, never fall short of it.
fn ceil_cost(tokens: u64, price_per_mtok: u64) -> u64 {
    let n = u128::from(tokens) * u128::from(price_per_mtok);
    u64::try_from(n.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Worst-case cost parts: the input side for `input_bound` tokens at the dearest input
/// rate (cache writes cost more than plain input), and one output token.
pub fn worst_case(price: &ModelPrice, input_bound: u64) -> (u64, u64) {
    let dearest_input = [
        Some(price.input),
        price.cache_write,
        price.cache_write_1h,
        price.cached_input,
        price.cache_read,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(price.input);
    (
        ceil_cost(input_bound, dearest_input),
        ceil_cost(1, price.output),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        let c: LimitsConfig = crate::config::parse_yaml(yaml, "t").expect("yaml");
        c.validate().expect("valid");
        Policy::new(c)
    }

    fn attribution(customer: Option<&str>) -> Attribution {
        Attribution {
            customer: customer.map(str::to_string),
            team: Some("t1".into()),
            key_id: Some("k1".into()),
            ..Attribution::default()
        }
    }

    #[test]
    fn explicit_beats_tier_beats_default() {
        let p = policy(
            "budgets:\n  - {scope: customer, id: acme, period: monthly, cap_usd: 100}\n\
             default_customer_budgets:\n  - {period: daily, cap_usd: 1}\n\
             tiers:\n  pro: [{period: monthly, cap_usd: 50, action: clamp}]\n\
             customers:\n  acme: {tier: pro}\n  beta: {tier: pro}\n",
        );
        let cap_of = |c: &str| {
            let (checks, _) = p.checks(&attribution(Some(c)));
            let b = &checks[0].budgets[0];
            (checks[0].scope.clone(), b.period, b.cap_nano, b.enforcement)
        };
        assert_eq!(
            cap_of("acme"),
            (
                "customer:acme".into(),
                Period::Monthly,
                100_000_000_000,
                Enforcement::Block
            )
        );
        assert_eq!(
            cap_of("beta"),
            (
                "customer:beta".into(),
                Period::Monthly,
                50_000_000_000,
                Enforcement::Clamp
            )
        );
        assert_eq!(
            cap_of("gamma"),
            (
                "customer:gamma".into(),
                Period::Daily,
                1_000_000_000,
                Enforcement::Block
            )
        );
        assert!(
            p.checks(&attribution(None)).0.is_empty(),
            "no customer, no customer budget"
        );
    }

    #[test]
    fn global_team_key_and_rate_limits() {
        let p = policy(
            "budgets:\n  - {scope: global, period: daily, cap_usd: \"1000.5\"}\n  - {scope: team, period: total, cap_usd: 7}\n\
             rate_limits:\n  - {scope: key, rpm: 60}\n  - {scope: key, id: k1, rpm: 5, concurrency: 2}\n",
        );
        let (checks, applied) = p.checks(&attribution(None));
        let scopes: Vec<&str> = checks.iter().map(|c| c.scope.as_str()).collect();
        assert_eq!(scopes, ["global", "team:t1", "key:k1"]);
        assert_eq!(checks[0].budgets[0].cap_nano, 1_000_500_000_000);
        assert_eq!(
            (checks[2].rpm, checks[2].concurrency),
            (Some(5), Some(2)),
            "specific beats generic"
        );
        let applied_to: Vec<(&str, Period)> = applied
            .iter()
            .map(|b| (checks[b.scope].scope.as_str(), b.rule.period))
            .collect();
        assert_eq!(
            applied_to,
            [("global", Period::Daily), ("team:t1", Period::Total)],
            "each applied budget points at its own scope"
        );
    }

    #[test]
    fn bad_rules_name_their_key() {
        let c: LimitsConfig = crate::config::parse_yaml(
            "budgets:\n  - {scope: customer, period: daily, cap_usd: 1, action: downgrade}\n",
            "t",
        )
        .expect("yaml");
        assert_eq!(
            c.validate().map_err(|e| e.0),
            Err("budgets[0].downgrade_to".to_string())
        );
        let c: LimitsConfig =
            crate::config::parse_yaml("customers:\n  x: {tier: gold}\n", "t").expect("yaml");
        assert_eq!(
            c.validate().map_err(|e| e.0),
            Err("customers.x.tier".to_string())
        );
        assert!(crate::config::parse_yaml::<LimitsConfig>(
            "budgets:\n  - {scope: customer, period: daily, cap_usd: -1}\n",
            "t"
        )
        .is_err());
    }

    #[test]
    fn worst_case_rounds_up_and_uses_the_dearest_input_rate() {
        let price: ModelPrice = crate::config::parse_yaml(
            "{input: 3, output: 15, cache_write: 3.75, cache_read: 0.3}",
            "t",
        )
        .expect("price");
        // 1000 tokens × $3.75/Mtok = $0.00375 = 3,750,000 nano; one output token at $15/Mtok = 15,000 nano.
        assert_eq!(worst_case(&price, 1000), (3_750_000, 15_000));
        let cheap: ModelPrice =
            crate::config::parse_yaml("{input: 0.0000001, output: 0.0000001}", "t").expect("price");
        assert_eq!(
            worst_case(&cheap, 1),
            (1, 1),
            "fractions of a nano round up"
        );
    }
}
