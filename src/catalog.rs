//! Objects managed through the admin API and persisted in the store: budgets, customers
//! and named budgets (LiteLLM's `/customer/*` and `/budget/new`), teams, gateway keys,
//! prompts and prompt versions. Config still works for static setups; the catalog is
//! merged over it (an API budget for the same scope, id and period replaces the config's).
//!
//! The store keeps each object as a JSON document under (kind, id) with a version that
//! changes on every write. Every gateway holds a snapshot and reloads it when the version
//! changes (polled every `store.catalog_refresh_ms`), so a change made through one
//! instance reaches the others within that interval, and the instance that took the API
//! call applies it at once.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::auth::KeyHash;
use crate::budgets::{Action, BudgetRule, LimitsConfig, OnStoreError, RateLimitRule, ScopeKind};
use crate::store::Period;

/// The kinds of catalog documents, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Budget,
    Customer,
    NamedBudget,
    Team,
    Key,
    Prompt,
    PromptVersion,
    /// A scope blocked by the runaway breaker until a time.
    Block,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Budget,
        Kind::Customer,
        Kind::NamedBudget,
        Kind::Team,
        Kind::Key,
        Kind::Prompt,
        Kind::PromptVersion,
        Kind::Block,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Budget => "budget",
            Kind::Customer => "customer",
            Kind::NamedBudget => "named_budget",
            Kind::Team => "team",
            Kind::Key => "key",
            Kind::Prompt => "prompt",
            Kind::PromptVersion => "prompt_version",
            Kind::Block => "block",
        }
    }

    pub fn from_label(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.label() == s)
    }
}

/// A budget created through `POST /v1/budgets`: `BudgetRule`'s fields, but with the cap
/// stored as nano-USD (`BudgetRule` reads USD from YAML). Its id is `<scope>:<period>`
/// (e.g. `customer:acme:monthly`), so posting the same scope and period again replaces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetDoc {
    pub scope: ScopeKind,
    #[serde(default)]
    pub id: Option<String>,
    pub period: Period,
    pub cap_nano: u64,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub downgrade_to: Option<String>,
    #[serde(default = "default_downgrade_at")]
    pub downgrade_at: f64,
    #[serde(default)]
    pub on_store_error: OnStoreError,
    #[serde(default)]
    pub alert_thresholds: Option<Vec<f64>>,
    #[serde(default)]
    pub created_ms: u64,
}

fn default_downgrade_at() -> f64 {
    0.9
}

impl BudgetDoc {
    pub fn doc_id(&self) -> String {
        let scope = match (&self.scope, &self.id) {
            (ScopeKind::Global, _) => "global".to_string(),
            (kind, Some(id)) => format!("{}:{id}", kind.label()),
            (kind, None) => kind.label().to_string(),
        };
        format!("{scope}:{}", self.period.label())
    }

    pub fn rule(&self) -> BudgetRule {
        BudgetRule {
            scope: Some(self.scope),
            id: self.id.clone(),
            period: self.period,
            cap_usd: self.cap_nano,
            action: self.action,
            downgrade_to: self.downgrade_to.clone(),
            downgrade_at: self.downgrade_at,
            on_store_error: self.on_store_error,
            alert_thresholds: self.alert_thresholds.clone(),
        }
    }
}

/// A named budget (LiteLLM's `/budget/new`): a cap and rate limits customers can be assigned to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedBudgetDoc {
    pub budget_id: String,
    #[serde(default)]
    pub max_budget_nano: Option<u64>,
    pub period: Period,
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub concurrency: Option<u64>,
    #[serde(default)]
    pub created_ms: u64,
}

/// A customer (end user) managed through the LiteLLM-compatible endpoints.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CustomerDoc {
    pub user_id: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default)]
    pub blocked: bool,
    /// A named budget (or a config tier) the customer follows.
    #[serde(default)]
    pub budget_id: Option<String>,
    /// The customer's own cap, which wins over its named budget.
    #[serde(default)]
    pub max_budget_nano: Option<u64>,
    #[serde(default = "default_period")]
    pub period: Period,
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub created_ms: u64,
}

fn default_period() -> Period {
    Period::Total
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeamDoc {
    pub team_id: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub created_ms: u64,
}

/// A gateway key created through the API. Only the key's SHA-256 and a four-character
/// preview are kept; the key itself is shown once, in the creating response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyDoc {
    pub id: String,
    pub team: String,
    /// Empty for a revocation of a key defined in the config file.
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub preview: String,
    #[serde(default)]
    pub allow_byok: bool,
    #[serde(default)]
    pub created_ms: u64,
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptDoc {
    pub prompt_key: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub active_version: Option<String>,
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptVersionDoc {
    pub prompt_key: String,
    pub version: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub created_ms: u64,
}

impl PromptVersionDoc {
    pub fn doc_id(prompt_key: &str, version: &str) -> String {
        format!("{prompt_key}\u{1f}{version}")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockDoc {
    pub scope: String,
    pub until_ms: u64,
    pub reason: String,
}

/// What the store holds: every document and the version they are at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogDocs {
    pub version: u64,
    /// (kind label, id, JSON document)
    pub docs: Vec<(String, String, String)>,
}

impl CatalogDocs {
    /// The one field name both stores keep a document under: `kind/id`.
    pub fn field(kind: &str, id: &str) -> String {
        format!("{kind}/{id}")
    }

    /// Documents from (field, document) pairs as a store keeps them.
    pub fn from_fields(version: u64, fields: impl IntoIterator<Item = (String, String)>) -> Self {
        let docs = fields
            .into_iter()
            .filter_map(|(field, doc)| {
                let (kind, id) = field.split_once('/')?;
                Some((kind.to_string(), id.to_string(), doc))
            })
            .collect();
        CatalogDocs { version, docs }
    }
}

/// A parsed snapshot of the catalog.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub version: u64,
    pub budgets: BTreeMap<String, BudgetDoc>,
    pub named_budgets: BTreeMap<String, NamedBudgetDoc>,
    pub customers: BTreeMap<String, CustomerDoc>,
    pub teams: BTreeMap<String, TeamDoc>,
    pub keys: BTreeMap<String, KeyDoc>,
    pub prompts: BTreeMap<String, PromptDoc>,
    /// prompt key -> version -> document
    pub prompt_versions: BTreeMap<String, BTreeMap<String, PromptVersionDoc>>,
    pub blocks: BTreeMap<String, BlockDoc>,
}

impl Catalog {
    /// Parses the store's documents. A document that does not parse (written by a newer
    /// gateway, say) is skipped with a warning rather than failing the whole catalog.
    pub fn from_docs(docs: &CatalogDocs) -> Catalog {
        let mut c = Catalog {
            version: docs.version,
            ..Catalog::default()
        };
        for (kind, id, json) in &docs.docs {
            if let Err(e) = c.insert(kind, json) {
                log::warn!("catalog: skipping {kind} {id:?}: {e}");
            }
        }
        c
    }

    fn insert(&mut self, kind: &str, json: &str) -> Result<(), String> {
        let kind = Kind::from_label(kind).ok_or("unknown kind")?;
        let err = |e: serde_json::Error| e.to_string();
        match kind {
            Kind::Budget => {
                let d: BudgetDoc = serde_json::from_str(json).map_err(err)?;
                self.budgets.insert(d.doc_id(), d);
            }
            Kind::NamedBudget => {
                let d: NamedBudgetDoc = serde_json::from_str(json).map_err(err)?;
                self.named_budgets.insert(d.budget_id.clone(), d);
            }
            Kind::Customer => {
                let d: CustomerDoc = serde_json::from_str(json).map_err(err)?;
                self.customers.insert(d.user_id.clone(), d);
            }
            Kind::Team => {
                let d: TeamDoc = serde_json::from_str(json).map_err(err)?;
                self.teams.insert(d.team_id.clone(), d);
            }
            Kind::Key => {
                let d: KeyDoc = serde_json::from_str(json).map_err(err)?;
                self.keys.insert(d.id.clone(), d);
            }
            Kind::Prompt => {
                let d: PromptDoc = serde_json::from_str(json).map_err(err)?;
                self.prompts.insert(d.prompt_key.clone(), d);
            }
            Kind::PromptVersion => {
                let d: PromptVersionDoc = serde_json::from_str(json).map_err(err)?;
                self.prompt_versions
                    .entry(d.prompt_key.clone())
                    .or_default()
                    .insert(d.version.clone(), d);
            }
            Kind::Block => {
                let d: BlockDoc = serde_json::from_str(json).map_err(err)?;
                self.blocks.insert(d.scope.clone(), d);
            }
        }
        Ok(())
    }

    /// The config's limits with the catalog's merged over them.
    pub fn merge_limits(&self, base: &LimitsConfig) -> LimitsConfig {
        let mut limits = base.clone();
        for doc in self.budgets.values() {
            limits.budgets.retain(|b| {
                !(b.scope == Some(doc.scope) && b.id == doc.id && b.period == doc.period)
            });
            limits.budgets.push(doc.rule());
        }
        for nb in self.named_budgets.values() {
            let rules = nb
                .max_budget_nano
                .map(|cap| BudgetRule {
                    scope: None,
                    id: None,
                    period: nb.period,
                    cap_usd: cap,
                    action: Action::Block,
                    downgrade_to: None,
                    downgrade_at: default_downgrade_at(),
                    on_store_error: OnStoreError::Closed,
                    alert_thresholds: None,
                })
                .into_iter()
                .collect();
            limits.tiers.insert(nb.budget_id.clone(), rules);
        }
        for c in self.customers.values() {
            self.merge_customer(c, &mut limits);
        }
        limits
    }

    fn merge_customer(&self, c: &CustomerDoc, limits: &mut LimitsConfig) {
        let named = c.budget_id.as_ref().and_then(|b| self.named_budgets.get(b));
        if let Some(b) = &c.budget_id {
            limits.customers.entry(c.user_id.clone()).or_default().tier = Some(b.clone());
        }
        if let Some(cap) = c.max_budget_nano {
            let explicit = |b: &BudgetRule| {
                b.scope == Some(ScopeKind::Customer) && b.id.as_deref() == Some(&c.user_id)
            };
            if !limits
                .budgets
                .iter()
                .any(|b| explicit(b) && b.period == c.period)
            {
                limits.budgets.push(BudgetRule {
                    scope: Some(ScopeKind::Customer),
                    id: Some(c.user_id.clone()),
                    period: c.period,
                    cap_usd: cap,
                    action: Action::Block,
                    downgrade_to: None,
                    downgrade_at: default_downgrade_at(),
                    on_store_error: OnStoreError::Closed,
                    alert_thresholds: None,
                });
            }
        }
        let rpm = c.rpm.or(named.and_then(|n| n.rpm));
        let tpm = c.tpm.or(named.and_then(|n| n.tpm));
        let concurrency = named.and_then(|n| n.concurrency);
        if rpm.is_some() || tpm.is_some() || concurrency.is_some() {
            limits.rate_limits.retain(|r| {
                !(r.scope == ScopeKind::Customer && r.id.as_deref() == Some(&c.user_id))
            });
            limits.rate_limits.push(RateLimitRule {
                scope: ScopeKind::Customer,
                id: Some(c.user_id.clone()),
                rpm,
                tpm,
                concurrency,
            });
        }
    }

    pub fn blocked_customers(&self) -> HashSet<String> {
        self.customers
            .values()
            .filter(|c| c.blocked)
            .map(|c| c.user_id.clone())
            .collect()
    }

    /// Active API keys by hash, and the ids of revoked keys (config keys included).
    pub fn key_changes(&self) -> (HashMap<KeyHash, KeyDoc>, HashSet<String>) {
        let mut active = HashMap::new();
        let mut revoked = HashSet::new();
        for k in self.keys.values() {
            if k.revoked_ms.is_some() {
                revoked.insert(k.id.clone());
            } else if let Some(hash) = crate::auth::parse_hash(&k.sha256) {
                active.insert(hash, k.clone());
            }
        }
        (active, revoked)
    }

    /// The version a request that names `prompt_key` but no version is attributed to.
    pub fn active_version(&self, prompt_key: &str) -> Option<&str> {
        self.prompts.get(prompt_key)?.active_version.as_deref()
    }

    /// Until when a scope is blocked by the runaway breaker, if it is at `now_ms`.
    pub fn blocked_until(&self, scope: &str, now_ms: u64) -> Option<&BlockDoc> {
        self.blocks.get(scope).filter(|b| b.until_ms > now_ms)
    }
}

/// A four-character preview of a key for listings: `tg_...x4f2`.
pub fn preview(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("tg_...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(entries: &[(Kind, &str, serde_json::Value)]) -> CatalogDocs {
        CatalogDocs {
            version: 3,
            docs: entries
                .iter()
                .map(|(k, id, v)| (k.label().to_string(), id.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn api_budgets_replace_config_budgets_of_the_same_scope_and_period() {
        let base: LimitsConfig = crate::config::parse_yaml(
            "budgets:\n  - {scope: customer, id: acme, period: monthly, cap_usd: 100}\n  - {scope: customer, id: acme, period: daily, cap_usd: 10}\n",
            "t",
        )
        .expect("yaml");
        let c = Catalog::from_docs(&docs(&[(
            Kind::Budget,
            "customer:acme:monthly",
            serde_json::json!({"scope": "customer", "id": "acme", "period": "monthly", "cap_nano": 5_000_000_000u64, "action": "clamp"}),
        )]));
        let merged = c.merge_limits(&base);
        let caps: Vec<(Period, u64, Action)> = merged
            .budgets
            .iter()
            .map(|b| (b.period, b.cap_usd, b.action))
            .collect();
        assert_eq!(
            caps,
            [
                (Period::Daily, 10_000_000_000, Action::Block),
                (Period::Monthly, 5_000_000_000, Action::Clamp)
            ]
        );
    }

    #[test]
    fn customers_follow_named_budgets_and_their_own_caps_and_limits() {
        let c = Catalog::from_docs(&docs(&[
            (
                Kind::NamedBudget,
                "free",
                serde_json::json!({"budget_id": "free", "max_budget_nano": 1_000_000_000u64, "period": "daily", "rpm": 10}),
            ),
            (
                Kind::Customer,
                "u1",
                serde_json::json!({"user_id": "u1", "budget_id": "free"}),
            ),
            (
                Kind::Customer,
                "u2",
                serde_json::json!({"user_id": "u2", "budget_id": "free", "max_budget_nano": 7u64, "period": "monthly", "tpm": 99, "blocked": true}),
            ),
            (Kind::Customer, "bad", serde_json::json!({"no": "user_id"})),
        ]));
        let merged = c.merge_limits(&LimitsConfig::default());
        assert_eq!(merged.customers["u1"].tier.as_deref(), Some("free"));
        assert_eq!(merged.tiers["free"][0].cap_usd, 1_000_000_000);
        let u2: Vec<_> = merged
            .budgets
            .iter()
            .filter(|b| b.id.as_deref() == Some("u2"))
            .map(|b| (b.period, b.cap_usd))
            .collect();
        assert_eq!(u2, [(Period::Monthly, 7)]);
        let rate = |id: &str| {
            merged
                .rate_limits
                .iter()
                .find(|r| r.id.as_deref() == Some(id))
                .map(|r| (r.rpm, r.tpm))
        };
        assert_eq!(rate("u1"), Some((Some(10), None)));
        assert_eq!(rate("u2"), Some((Some(10), Some(99))));
        assert_eq!(
            c.blocked_customers().into_iter().collect::<Vec<_>>(),
            ["u2"]
        );
        assert_eq!(c.customers.len(), 2, "the malformed document is skipped");
    }

    #[test]
    fn previews_show_only_the_last_four_characters() {
        assert_eq!(preview("tg_0123456789abcdefx4f2"), "tg_...x4f2");
        assert_eq!(preview("ab"), "tg_...ab");
    }
}
