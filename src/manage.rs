//! The management half of the admin API (admin token only): budgets, LiteLLM-compatible
//! customers and named budgets, teams, gateway keys and prompts. Every change is written
//! to the store's catalog (see `catalog`), then this gateway reloads it at once; the
//! others pick it up within `store.catalog_refresh_ms`.
//!
//! Malformed input gets a 400 naming the field and the reason, and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Map, Value};

use crate::budgets::{check_rule, Action, OnStoreError, ScopeKind};
use crate::catalog::{
    self, BudgetDoc, CustomerDoc, KeyDoc, Kind, NamedBudgetDoc, PromptDoc, PromptVersionDoc,
    TeamDoc,
};
use crate::pricing::{format_usd, parse_usd};
use crate::proxy::State;
use crate::record::unix_ms;
use crate::store::{Period, StoreError};
use crate::usage_api::{self, percent_decode, query_pairs, Filters, Query};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{field}: {reason}")]
    BadField { field: String, reason: String },
    #[error("request body: {0}")]
    BadBody(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("use {0}")]
    Method(&'static str),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl ManageError {
    pub fn status(&self) -> u16 {
        match self {
            ManageError::BadField { .. } | ManageError::BadBody(_) => 400,
            ManageError::NotFound(_) => 404,
            ManageError::Method(_) => 405,
            ManageError::Conflict(_) => 409,
            ManageError::Store(_) => 503,
        }
    }
}

type Answer = Result<(u16, Value), ManageError>;

fn bad(field: &str, reason: impl Into<String>) -> ManageError {
    ManageError::BadField {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// A JSON request body, as an object.
struct Body(Map<String, Value>);

impl Body {
    fn parse(raw: &[u8]) -> Result<Body, ManageError> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ManageError::BadBody("expected a JSON object".into())),
            Err(e) => Err(ManageError::BadBody(format!("not valid JSON: {e}"))),
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, field: &str) -> Result<Option<String>, ManageError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::String(s)) if valid_id(s) => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(bad(
                field,
                "must be 1 to 256 characters without control characters",
            )),
            Some(_) => Err(bad(field, "must be a string")),
        }
    }

    fn required(&self, field: &str) -> Result<String, ManageError> {
        self.string(field)?.ok_or_else(|| bad(field, "required"))
    }

    fn text(&self, field: &str) -> Result<Option<String>, ManageError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() <= 4096 => Ok(Some(s.clone())),
            Some(_) => Err(bad(field, "must be a string of at most 4096 bytes")),
        }
    }

    fn bool(&self, field: &str) -> Result<Option<bool>, ManageError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(field, "must be true or false")),
        }
    }

    fn count(&self, field: &str) -> Result<Option<u64>, ManageError> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(bad(field, "must be a whole number of at least 1")),
            },
        }
    }

    /// A USD amount, as a JSON number or a decimal string, exactly in nano-USD.
    fn usd(&self, field: &str) -> Result<Option<u64>, ManageError> {
        let text = match self.present(field) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad(field, "must be a USD amount like 100 or \"2.50\"")),
        };
        parse_usd(&text)
            .map(Some)
            .map_err(|e| bad(field, e.to_string()))
    }

    fn share(&self, field: &str) -> Result<Option<f64>, ManageError> {
        match self.present(field).map(Value::as_f64) {
            None => Ok(None),
            Some(Some(x)) if (0.0..=1.0).contains(&x) => Ok(Some(x)),
            Some(_) => Err(bad(field, "must be a share of the cap between 0 and 1")),
        }
    }

    fn thresholds(&self, field: &str) -> Result<Option<Vec<f64>>, ManageError> {
        let Some(v) = self.present(field) else {
            return Ok(None);
        };
        let shares: Option<Vec<f64>> = v.as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_f64().filter(|x| *x > 0.0 && *x <= 10.0))
                .collect()
        });
        match shares {
            Some(s) if !s.is_empty() && s.len() <= 16 => Ok(Some(s)),
            _ => Err(bad(
                field,
                "must be a list of 1 to 16 shares of the cap, like [0.5, 0.8, 1.0]",
            )),
        }
    }

    fn user_ids(&self) -> Result<Vec<String>, ManageError> {
        let list = self
            .present("user_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("user_ids", "required: a list of customer ids"))?;
        if list.is_empty() || list.len() > 1000 {
            return Err(bad("user_ids", "must hold 1 to 1000 ids"));
        }
        list.iter()
            .map(|v| match v.as_str() {
                Some(s) if valid_id(s) => Ok(s.to_string()),
                _ => Err(bad("user_ids", "every id must be a non-empty string")),
            })
            .collect()
    }
}

fn valid_id(s: &str) -> bool {
    !s.trim().is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn period_from(field: &str, text: &str) -> Result<Period, ManageError> {
    match text {
        "daily" => Ok(Period::Daily),
        "monthly" => Ok(Period::Monthly),
        "total" => Ok(Period::Total),
        _ => Err(bad(field, "must be daily, monthly or total")),
    }
}

/// LiteLLM's `budget_duration` in calendar terms: `1d`/`24h` is the UTC day,
/// `30d`/`1mo` the UTC calendar month, absent never resets. Other durations are refused
/// rather than approximated.
fn duration_period(body: &Body) -> Result<Period, ManageError> {
    match body.string("budget_duration")?.as_deref() {
        None => Ok(Period::Total),
        Some("1d" | "24h" | "daily") => Ok(Period::Daily),
        Some("30d" | "1mo" | "monthly") => Ok(Period::Monthly),
        Some(_) => Err(bad(
            "budget_duration",
            "Tollgate budgets follow UTC calendar periods: use 1d (daily), 30d or 1mo (calendar month), or leave it out (never resets)",
        )),
    }
}

fn duration_label(p: Period) -> Value {
    match p {
        Period::Daily => json!("1d"),
        Period::Monthly => json!("1mo"),
        Period::Total => Value::Null,
    }
}

fn action_from(field: &str, text: &str) -> Result<Action, ManageError> {
    match text {
        "block" => Ok(Action::Block),
        "clamp" => Ok(Action::Clamp),
        "downgrade" => Ok(Action::Downgrade),
        // Daylite's alert-only budgets never block: Tollgate's shadow budgets.
        "shadow" | "alert" | "alert_only" => Ok(Action::Shadow),
        _ => Err(bad(
            field,
            "must be block, clamp, downgrade or shadow (alert_only)",
        )),
    }
}

fn scope_from(text: &str) -> Result<ScopeKind, ManageError> {
    match text {
        "customer" => Ok(ScopeKind::Customer),
        "team" => Ok(ScopeKind::Team),
        "key" => Ok(ScopeKind::Key),
        "feature" => Ok(ScopeKind::Feature),
        "global" => Ok(ScopeKind::Global),
        _ => Err(bad(
            "scope",
            "must be customer, team, key, feature or global",
        )),
    }
}

pub struct Manage<'a> {
    pub state: &'a Arc<State>,
}

impl Manage<'_> {
    /// Answers a management call, or `None` when the path is not one of these.
    pub async fn handle(
        &self,
        method: &str,
        path: &str,
        query: &str,
        raw: &[u8],
    ) -> Option<Answer> {
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let body = || Body::parse(raw);
        let answer = match (method, segs.as_slice()) {
            ("GET", ["v1", "budgets"]) => self.list_budgets().await,
            ("POST", ["v1", "budgets"]) => self.create_budget(body()).await,
            ("GET", ["v1", "budgets", id]) => self.get_budget(id).await,
            ("DELETE", ["v1", "budgets", id]) => self.delete_budget(id).await,
            (_, ["v1", "budgets", ..]) => Err(ManageError::Method("GET, POST or DELETE")),
            ("POST", ["budget", "new"]) => self.new_named_budget(body()).await,
            ("GET", ["budget", "info"]) | ("GET", ["budget", "list"]) => {
                Ok((200, self.named_budgets()))
            }
            ("POST", ["customer", "new"]) => self.customer_new(body()).await,
            ("POST", ["customer", "update"]) => self.customer_update(body()).await,
            ("GET", ["customer", "info"]) => self.customer_info(query).await,
            ("POST", ["customer", "block"]) => self.customer_block(body(), true).await,
            ("POST", ["customer", "unblock"]) => self.customer_block(body(), false).await,
            ("POST", ["customer", "delete"]) => self.customer_delete(body()).await,
            (_, ["customer", ..]) | (_, ["budget", ..]) => Err(ManageError::Method(
                "the method LiteLLM documents for this endpoint",
            )),
            ("GET", ["v1", "teams"]) => self.list_teams().await,
            ("POST", ["v1", "teams"]) => self.create_team(body()).await,
            ("DELETE", ["v1", "teams", id]) => self.delete_team(id).await,
            (_, ["v1", "teams", ..]) => Err(ManageError::Method("GET, POST or DELETE")),
            ("GET", ["v1", "keys"]) => Ok((200, self.list_keys(query))),
            ("POST", ["v1", "keys"]) => self.create_key(body()).await,
            ("DELETE", ["v1", "keys", id]) => self.revoke_key(id).await,
            (_, ["v1", "keys", ..]) => Err(ManageError::Method("GET, POST or DELETE")),
            ("GET", ["v1", "prompts"]) => Ok((200, self.list_prompts())),
            ("POST", ["v1", "prompts"]) => self.create_prompt(body()).await,
            ("GET", ["v1", "prompts", key]) => self.get_prompt(key),
            ("POST", ["v1", "prompts", key, "versions"]) => self.add_version(key, body()).await,
            ("POST", ["v1", "prompts", key, "activate"]) => self.activate(key, body()).await,
            (_, ["v1", "prompts", ..]) => Err(ManageError::Method("GET or POST")),
            _ => return None,
        };
        Some(answer)
    }

    async fn write(
        &self,
        kind: Kind,
        id: &str,
        doc: &impl serde::Serialize,
    ) -> Result<bool, ManageError> {
        let json = serde_json::to_string(doc).map_err(|e| StoreError::Internal(e.to_string()))?;
        let changed = self
            .state
            .store
            .catalog_write(kind.label(), id, Some(&json), false)
            .await?;
        self.state.refresh_catalog(true).await?;
        Ok(changed)
    }

    async fn delete(&self, kind: Kind, id: &str) -> Result<bool, ManageError> {
        let changed = self
            .state
            .store
            .catalog_write(kind.label(), id, None, false)
            .await?;
        self.state.refresh_catalog(true).await?;
        Ok(changed)
    }

    // ---- budgets ----

    /// `POST /v1/budgets`: Daylite's customer form (`customer_id`, `monthly_cap_usd`,
    /// `action_on_cap`, `alert_thresholds`) or the general form (`scope`, `id`, `period`,
    /// `cap_usd`, `action`, `downgrade_to`, `downgrade_at`, `on_store_error`,
    /// `alert_thresholds`).
    async fn create_budget(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let doc = if b.present("customer_id").is_some() {
            BudgetDoc {
                scope: ScopeKind::Customer,
                id: Some(b.required("customer_id")?),
                period: Period::Monthly,
                cap_nano: b
                    .usd("monthly_cap_usd")?
                    .ok_or_else(|| bad("monthly_cap_usd", "required"))?,
                action: match b.string("action_on_cap")? {
                    Some(a) => action_from("action_on_cap", &a)?,
                    None => Action::Block,
                },
                downgrade_to: b.string("downgrade_to")?,
                downgrade_at: b.share("downgrade_at")?.unwrap_or(0.9),
                on_store_error: OnStoreError::Closed,
                alert_thresholds: b.thresholds("alert_thresholds")?,
                created_ms: now_ms(),
            }
        } else {
            let scope = scope_from(&b.required("scope")?)?;
            let id = b.string("id")?;
            match (scope, &id) {
                (ScopeKind::Global, Some(_)) => {
                    return Err(bad("id", "the global scope has no id"))
                }
                (ScopeKind::Global, None) => {}
                (_, None) => return Err(bad("id", "required for this scope")),
                _ => {}
            }
            BudgetDoc {
                scope,
                id,
                period: period_from("period", &b.required("period")?)?,
                cap_nano: b
                    .usd("cap_usd")?
                    .ok_or_else(|| bad("cap_usd", "required"))?,
                action: match b.string("action")? {
                    Some(a) => action_from("action", &a)?,
                    None => Action::Block,
                },
                downgrade_to: b.string("downgrade_to")?,
                downgrade_at: b.share("downgrade_at")?.unwrap_or(0.9),
                on_store_error: match b.string("on_store_error")?.as_deref() {
                    None | Some("closed") => OnStoreError::Closed,
                    Some("open") => OnStoreError::Open,
                    Some(_) => return Err(bad("on_store_error", "must be closed or open")),
                },
                alert_thresholds: b.thresholds("alert_thresholds")?,
                created_ms: now_ms(),
            }
        };
        check_rule(&doc.rule(), "budget").map_err(|(field, reason)| ManageError::BadField {
            field: field.trim_start_matches("budget.").to_string(),
            reason,
        })?;
        if let Some(m) = &doc.downgrade_to {
            if self.state.price_for(m, m).is_none() {
                return Err(bad("downgrade_to", format!("no price for model {m:?}")));
            }
        }
        let id = doc.doc_id();
        let existed = self.state.live().catalog.budgets.contains_key(&id);
        self.write(Kind::Budget, &id, &doc).await?;
        let status = if existed { 200 } else { 201 };
        Ok((status, self.budget_view(&id, &doc.rule(), "api").await))
    }

    async fn budget_view(
        &self,
        id: &str,
        rule: &crate::budgets::BudgetRule,
        source: &str,
    ) -> Value {
        let scope = match (rule.scope, &rule.id) {
            (Some(ScopeKind::Global) | None, _) => "global".to_string(),
            (Some(kind), Some(v)) => crate::budgets::scope_key(kind, v),
            (Some(kind), None) => kind.label().to_string(),
        };
        let spent = if rule.id.is_some() || rule.scope == Some(ScopeKind::Global) {
            self.state.store.spent(&scope, rule.period).await.ok()
        } else {
            None
        };
        let (_, reset) = rule.period.window(now_ms());
        json!({
            "id": id,
            "source": source,
            "scope": scope,
            "period": rule.period.label(),
            "action": format!("{:?}", rule.action).to_lowercase(),
            "downgrade_to": rule.downgrade_to,
            "cap": format_usd(rule.cap_usd),
            "cap_nano": rule.cap_usd,
            "alert_thresholds": rule.alert_thresholds.clone().unwrap_or_else(|| crate::alerts::DEFAULT_THRESHOLDS.to_vec()),
            "spent": spent.map(format_usd),
            "spent_nano": spent,
            "remaining": spent.map(|s| format_usd(rule.cap_usd.saturating_sub(s))),
            "used_ratio": spent.map(|s| if rule.cap_usd == 0 { 1.0 } else { s as f64 / rule.cap_usd as f64 }),
            "reset_ms": reset,
        })
    }

    /// Every budget in force: the config file's (with a concrete scope) and the API's.
    async fn list_budgets(&self) -> Answer {
        let live = self.state.live();
        let mut out = Vec::new();
        for rule in &live.policy.config().budgets {
            // A rule for every value of a scope has no one spend to show.
            let Some(scope) = rule
                .scope
                .filter(|k| rule.id.is_some() || *k == ScopeKind::Global)
            else {
                continue;
            };
            let doc_id = BudgetDoc {
                scope,
                id: rule.id.clone(),
                period: rule.period,
                cap_nano: rule.cap_usd,
                action: rule.action,
                downgrade_to: None,
                downgrade_at: 0.9,
                on_store_error: OnStoreError::Closed,
                alert_thresholds: None,
                created_ms: 0,
            }
            .doc_id();
            let in_config = self
                .state
                .config
                .limits
                .budgets
                .iter()
                .any(|b| b.scope == rule.scope && b.id == rule.id && b.period == rule.period);
            // What is neither an API budget nor in the file is a LiteLLM customer's own cap.
            let source = match (live.catalog.budgets.contains_key(&doc_id), in_config) {
                (true, _) => "api",
                (false, true) => "config",
                (false, false) => "customer",
            };
            out.push(self.budget_view(&doc_id, rule, source).await);
        }
        Ok((200, json!({ "budgets": out })))
    }

    async fn get_budget(&self, id: &str) -> Answer {
        let Ok((_, list)) = self.list_budgets().await else {
            return Err(ManageError::NotFound(format!("no budget {id:?}")));
        };
        list["budgets"]
            .as_array()
            .and_then(|a| a.iter().find(|b| b["id"] == id).cloned())
            .map(|b| (200, b))
            .ok_or_else(|| ManageError::NotFound(format!("no budget {id:?}")))
    }

    async fn delete_budget(&self, id: &str) -> Answer {
        if !self.state.live().catalog.budgets.contains_key(id) {
            let in_config = self.get_budget(id).await.is_ok();
            return Err(if in_config {
                ManageError::Conflict(format!(
                    "budget {id:?} is defined in the config file; change it there"
                ))
            } else {
                ManageError::NotFound(format!("no budget {id:?}"))
            });
        }
        self.delete(Kind::Budget, id).await?;
        Ok((200, json!({"deleted": id})))
    }

    // ---- LiteLLM-compatible named budgets and customers ----

    fn named_budget_view(nb: &NamedBudgetDoc) -> Value {
        json!({
            "budget_id": nb.budget_id,
            "max_budget": nb.max_budget_nano.map(usd_number),
            "rpm_limit": nb.rpm,
            "tpm_limit": nb.tpm,
            "max_parallel_requests": nb.concurrency,
            "budget_duration": duration_label(nb.period),
        })
    }

    fn named_budgets(&self) -> Value {
        let live = self.state.live();
        Value::Array(
            live.catalog
                .named_budgets
                .values()
                .map(Self::named_budget_view)
                .collect(),
        )
    }

    /// `POST /budget/new`: `budget_id`, `max_budget`, `rpm_limit`, `tpm_limit`,
    /// `max_parallel_requests`, `budget_duration`.
    async fn new_named_budget(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let budget_id = match b.string("budget_id")? {
            Some(id) => id,
            None => {
                let random =
                    crate::auth::mint_key().map_err(|e| StoreError::Internal(e.to_string()))?;
                format!("budget-{}", &random[3..15])
            }
        };
        let nb = NamedBudgetDoc {
            budget_id: budget_id.clone(),
            max_budget_nano: b.usd("max_budget")?,
            period: duration_period(&b)?,
            rpm: b.count("rpm_limit")?,
            tpm: b.count("tpm_limit")?,
            concurrency: b.count("max_parallel_requests")?,
            created_ms: now_ms(),
        };
        if self.state.config.limits.tiers.contains_key(&budget_id) {
            return Err(ManageError::Conflict(format!(
                "{budget_id:?} is a tier in the config file"
            )));
        }
        self.write(Kind::NamedBudget, &budget_id, &nb).await?;
        Ok((200, Self::named_budget_view(&nb)))
    }

    fn customer_fields(&self, b: &Body, c: &mut CustomerDoc) -> Result<(), ManageError> {
        if let Some(alias) = b.text("alias")? {
            c.alias = Some(alias);
        }
        if let Some(blocked) = b.bool("blocked")? {
            c.blocked = blocked;
        }
        if let Some(budget_id) = b.string("budget_id")? {
            let live = self.state.live();
            if !live.catalog.named_budgets.contains_key(&budget_id)
                && !self.state.config.limits.tiers.contains_key(&budget_id)
            {
                return Err(bad(
                    "budget_id",
                    format!("no budget {budget_id:?}: create it with /budget/new"),
                ));
            }
            c.budget_id = Some(budget_id);
        }
        if let Some(cap) = b.usd("max_budget")? {
            c.max_budget_nano = Some(cap);
        }
        if b.present("budget_duration").is_some() {
            c.period = duration_period(b)?;
        }
        if let Some(n) = b.count("rpm_limit")? {
            c.rpm = Some(n);
        }
        if let Some(n) = b.count("tpm_limit")? {
            c.tpm = Some(n);
        }
        Ok(())
    }

    async fn customer_view(&self, c: &CustomerDoc) -> Value {
        let live = self.state.live();
        let named = c
            .budget_id
            .as_ref()
            .and_then(|b| live.catalog.named_budgets.get(b));
        let source = self.spend_source().await.unwrap_or(None);
        let spend = self.all_time(
            &source,
            Filters {
                customer: Some(c.user_id.clone()),
                ..Default::default()
            },
        );
        let table = match (c.max_budget_nano, named) {
            (Some(cap), _) => json!({
                "budget_id": c.budget_id,
                "max_budget": usd_number(cap),
                "rpm_limit": c.rpm.or(named.and_then(|n| n.rpm)),
                "tpm_limit": c.tpm.or(named.and_then(|n| n.tpm)),
                "budget_duration": duration_label(c.period),
            }),
            (None, Some(nb)) => Self::named_budget_view(nb),
            (None, None) => Value::Null,
        };
        json!({
            "user_id": c.user_id,
            "alias": c.alias,
            "blocked": c.blocked,
            "spend": usd_number(spend.cost_nano),
            "spend_nano": spend.cost_nano,
            "requests": spend.requests,
            "budget_id": c.budget_id,
            "litellm_budget_table": table,
        })
    }

    async fn customer_new(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let user_id = b.required("user_id")?;
        if self.state.live().catalog.customers.contains_key(&user_id) {
            return Err(ManageError::Conflict(format!(
                "customer {user_id:?} exists: use /customer/update"
            )));
        }
        let mut c = CustomerDoc {
            user_id: user_id.clone(),
            period: Period::Total,
            created_ms: now_ms(),
            ..CustomerDoc::default()
        };
        self.customer_fields(&b, &mut c)?;
        self.write(Kind::Customer, &user_id, &c).await?;
        Ok((200, self.customer_view(&c).await))
    }

    async fn customer_update(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let user_id = b.required("user_id")?;
        let mut c = self
            .state
            .live()
            .catalog
            .customers
            .get(&user_id)
            .cloned()
            .ok_or_else(|| ManageError::NotFound(format!("no customer {user_id:?}")))?;
        self.customer_fields(&b, &mut c)?;
        self.write(Kind::Customer, &user_id, &c).await?;
        Ok((200, self.customer_view(&c).await))
    }

    async fn customer_info(&self, query: &str) -> Answer {
        let id = query_pairs(query)
            .into_iter()
            .find(|(k, _)| k == "end_user_id")
            .map(|(_, v)| v)
            .filter(|v| valid_id(v))
            .ok_or_else(|| bad("end_user_id", "required"))?;
        let c = self.state.live().catalog.customers.get(&id).cloned();
        match c {
            Some(c) => Ok((200, self.customer_view(&c).await)),
            None => Err(ManageError::NotFound(format!("no customer {id:?}"))),
        }
    }

    /// Blocks or unblocks customers; a customer not yet known is created blocked, so a
    /// block can land before the customer's first call.
    async fn customer_block(&self, body: Result<Body, ManageError>, blocked: bool) -> Answer {
        let ids = body?.user_ids()?;
        let mut done = Vec::new();
        for id in ids {
            let mut c = self
                .state
                .live()
                .catalog
                .customers
                .get(&id)
                .cloned()
                .unwrap_or_else(|| CustomerDoc {
                    user_id: id.clone(),
                    period: Period::Total,
                    created_ms: now_ms(),
                    ..CustomerDoc::default()
                });
            c.blocked = blocked;
            self.write(Kind::Customer, &id, &c).await?;
            done.push(id);
        }
        Ok((
            200,
            json!({ if blocked { "blocked_users" } else { "unblocked_users" }: done }),
        ))
    }

    async fn customer_delete(&self, body: Result<Body, ManageError>) -> Answer {
        let ids = body?.user_ids()?;
        let mut deleted = Vec::new();
        for id in ids {
            if self.delete(Kind::Customer, &id).await? {
                deleted.push(id);
            }
        }
        Ok((200, json!({ "deleted_customers": deleted })))
    }

    // ---- teams ----

    /// Teams: the API's, and those the config file's keys name.
    fn teams(&self) -> BTreeMap<String, Option<TeamDoc>> {
        let live = self.state.live();
        let mut teams: BTreeMap<String, Option<TeamDoc>> = self
            .state
            .config
            .keys
            .iter()
            .map(|k| (k.team.clone(), None))
            .collect();
        for (id, t) in &live.catalog.teams {
            teams.insert(id.clone(), Some(t.clone()));
        }
        teams
    }

    /// All-time spend by filter, from the shared rollups (Redis) or this gateway's ledger.
    async fn spend_source(&self) -> Result<Option<crate::ledger::Rollups>, ManageError> {
        Ok(self.state.shared_rollups(0, now_ms() / 86_400_000).await?)
    }

    fn all_time(
        &self,
        source: &Option<crate::ledger::Rollups>,
        filters: Filters,
    ) -> crate::ledger::Totals {
        let q = Query {
            filters,
            start_day: 0,
            end_day: now_ms() / 86_400_000,
            group_by: None,
            csv: false,
        };
        match source {
            Some(rollups) => usage_api::answer(rollups, &q).total,
            None => usage_api::answer(&*self.state.ledger, &q).total,
        }
    }

    async fn list_teams(&self) -> Answer {
        let source = self.spend_source().await?;
        let keys = self.keys();
        let teams: Vec<Value> = self
            .teams()
            .into_iter()
            .map(|(id, doc)| {
                let spend = self.all_time(
                    &source,
                    Filters {
                        team: Some(id.clone()),
                        ..Default::default()
                    },
                );
                let key_count = keys
                    .iter()
                    .filter(|k| k.team == id && k.revoked_ms.is_none())
                    .count();
                json!({
                    "team_id": id,
                    "description": doc.as_ref().and_then(|d| d.description.clone()),
                    "source": if doc.is_some() { "api" } else { "config" },
                    "total_cost": format_usd(spend.cost_nano),
                    "total_cost_nano": spend.cost_nano,
                    "requests": spend.requests,
                    "key_count": key_count,
                })
            })
            .collect();
        Ok((200, json!({ "teams": teams })))
    }

    async fn create_team(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let team_id = b.required("team_id")?;
        if self.teams().contains_key(&team_id) {
            return Err(ManageError::Conflict(format!("team {team_id:?} exists")));
        }
        let doc = TeamDoc {
            team_id: team_id.clone(),
            description: b.text("description")?,
            created_ms: now_ms(),
        };
        self.write(Kind::Team, &team_id, &doc).await?;
        Ok((
            201,
            json!({"team_id": team_id, "description": doc.description}),
        ))
    }

    /// Deletes a team and revokes every key it has, so nothing can spend on its behalf.
    async fn delete_team(&self, id: &str) -> Answer {
        if !self.teams().contains_key(id) {
            return Err(ManageError::NotFound(format!("no team {id:?}")));
        }
        let mut revoked = 0;
        for k in self.keys() {
            if k.team == id && k.revoked_ms.is_none() {
                self.revoke(k).await?;
                revoked += 1;
            }
        }
        self.delete(Kind::Team, id).await?;
        Ok((200, json!({"deleted": id, "keys_revoked": revoked})))
    }

    // ---- keys ----

    /// Every key: the config file's (no preview: only their hash is known) and the API's.
    fn keys(&self) -> Vec<KeyDoc> {
        let live = self.state.live();
        let mut keys: BTreeMap<String, KeyDoc> = self
            .state
            .config
            .keys
            .iter()
            .filter(|k| !k.revoked)
            .map(|k| {
                let doc = KeyDoc {
                    id: k.id.clone(),
                    team: k.team.clone(),
                    sha256: String::new(),
                    preview: String::new(),
                    allow_byok: k.allow_byok,
                    created_ms: 0,
                    revoked_ms: None,
                };
                (k.id.clone(), doc)
            })
            .collect();
        for (id, k) in &live.catalog.keys {
            let team = keys.get(id).map(|c| c.team.clone());
            let mut k = k.clone();
            if let Some(team) = team.filter(|_| k.team.is_empty()) {
                k.team = team;
            }
            keys.insert(id.clone(), k);
        }
        keys.into_values().collect()
    }

    fn list_keys(&self, query: &str) -> Value {
        let team = query_pairs(query)
            .into_iter()
            .find(|(k, _)| k == "team")
            .map(|(_, v)| v);
        let config_ids: BTreeSet<String> = self
            .state
            .config
            .keys
            .iter()
            .map(|k| k.id.clone())
            .collect();
        let keys: Vec<Value> = self
            .keys()
            .into_iter()
            .filter(|k| team.as_ref().is_none_or(|t| *t == k.team))
            .map(|k| {
                json!({
                    "id": k.id,
                    "team": k.team,
                    "preview": (!k.preview.is_empty()).then_some(k.preview),
                    "source": if config_ids.contains(&k.id) { "config" } else { "api" },
                    "created_ms": (k.created_ms > 0).then_some(k.created_ms),
                    "revoked": k.revoked_ms.is_some(),
                    "revoked_ms": k.revoked_ms,
                })
            })
            .collect();
        json!({ "keys": keys })
    }

    /// Creates a key for a team. The key is in this response only; the store keeps its
    /// SHA-256 and a four-character preview.
    async fn create_key(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let team = b.required("team")?;
        if !self.teams().contains_key(&team) {
            return Err(bad("team", format!("no team {team:?}: create it first")));
        }
        let key = crate::auth::mint_key().map_err(|e| StoreError::Internal(e.to_string()))?;
        let id = match b.string("id")? {
            Some(id) => id,
            None => format!("{team}-{}", &key[key.len() - 6..]),
        };
        if self.keys().iter().any(|k| k.id == id) {
            return Err(ManageError::Conflict(format!("a key {id:?} exists")));
        }
        let doc = KeyDoc {
            id: id.clone(),
            team: team.clone(),
            sha256: crate::auth::to_hex(&crate::auth::hash_key(&key)),
            preview: catalog::preview(&key),
            allow_byok: b.bool("allow_byok")?.unwrap_or(false),
            created_ms: now_ms(),
            revoked_ms: None,
        };
        self.write(Kind::Key, &id, &doc).await?;
        Ok((
            201,
            json!({"id": id, "team": team, "key": key, "preview": doc.preview,
                   "note": "the key is shown once; only its SHA-256 is kept"}),
        ))
    }

    async fn revoke(&self, mut k: KeyDoc) -> Result<(), ManageError> {
        k.revoked_ms = Some(now_ms());
        let id = k.id.clone();
        self.write(Kind::Key, &id, &k).await?;
        Ok(())
    }

    async fn revoke_key(&self, id: &str) -> Answer {
        let key = self
            .keys()
            .into_iter()
            .find(|k| k.id == id && k.revoked_ms.is_none())
            .ok_or_else(|| ManageError::NotFound(format!("no active key {id:?}")))?;
        self.revoke(key).await?;
        Ok((200, json!({"revoked": id})))
    }

    // ---- prompts ----

    fn prompt_view(&self, p: &PromptDoc) -> Value {
        let live = self.state.live();
        let versions: Vec<Value> = live
            .catalog
            .prompt_versions
            .get(&p.prompt_key)
            .map(|v| {
                v.values()
                    .map(|v| {
                        json!({
                            "version": v.version, "model": v.model, "temperature": v.temperature,
                            "max_tokens": v.max_tokens, "note": v.note, "created_ms": v.created_ms,
                            "active": p.active_version.as_deref() == Some(v.version.as_str()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "prompt_key": p.prompt_key,
            "description": p.description,
            "active_version": p.active_version,
            "created_ms": p.created_ms,
            "versions": versions,
        })
    }

    fn list_prompts(&self) -> Value {
        let live = self.state.live();
        let prompts: Vec<Value> = live
            .catalog
            .prompts
            .values()
            .map(|p| self.prompt_view(p))
            .collect();
        json!({ "prompts": prompts })
    }

    fn get_prompt(&self, key: &str) -> Answer {
        let live = self.state.live();
        let p = live
            .catalog
            .prompts
            .get(key)
            .ok_or_else(|| ManageError::NotFound(format!("no prompt {key:?}")))?;
        Ok((200, self.prompt_view(p)))
    }

    /// Creates a prompt ahead of its first use, or sets the description of one.
    async fn create_prompt(&self, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let key = b.required("prompt_key")?;
        let existing = self.state.live().catalog.prompts.get(&key).cloned();
        let status = if existing.is_some() { 200 } else { 201 };
        let mut p = existing.unwrap_or(PromptDoc {
            prompt_key: key.clone(),
            description: None,
            active_version: None,
            created_ms: now_ms(),
        });
        if let Some(d) = b.text("description")? {
            p.description = Some(d);
        }
        self.write(Kind::Prompt, &key, &p).await?;
        Ok((status, self.prompt_view(&p)))
    }

    /// Adds a version (`version`, `model`, `temperature`, `max_tokens`, `note`,
    /// `activate`). The first version of a prompt becomes its active one.
    async fn add_version(&self, key: &str, body: Result<Body, ManageError>) -> Answer {
        let b = body?;
        let live = self.state.live();
        let mut prompt = live.catalog.prompts.get(key).cloned().unwrap_or(PromptDoc {
            prompt_key: key.to_string(),
            description: None,
            active_version: None,
            created_ms: now_ms(),
        });
        let existing = live.catalog.prompt_versions.get(key);
        let version = match b.string("version")? {
            Some(v) => v,
            None => (existing.map_or(0, |v| v.len()) + 1).to_string(),
        };
        if existing.is_some_and(|v| v.contains_key(&version)) {
            return Err(ManageError::Conflict(format!(
                "prompt {key:?} has a version {version:?}"
            )));
        }
        let temperature = match b.present("temperature").map(Value::as_f64) {
            None => None,
            Some(Some(t)) if (0.0..=2.0).contains(&t) => Some(t),
            Some(_) => return Err(bad("temperature", "must be a number from 0 to 2")),
        };
        let v = PromptVersionDoc {
            prompt_key: key.to_string(),
            version: version.clone(),
            model: b.string("model")?,
            temperature,
            max_tokens: b.count("max_tokens")?,
            note: b.text("note")?,
            created_ms: now_ms(),
        };
        let activate = b.bool("activate")?.unwrap_or(false) || prompt.active_version.is_none();
        let vid = PromptVersionDoc::doc_id(key, &version);
        self.write(Kind::PromptVersion, &vid, &v).await?;
        if activate {
            prompt.active_version = Some(version);
        }
        self.write(Kind::Prompt, key, &prompt).await?;
        Ok((201, self.prompt_view(&prompt)))
    }

    async fn activate(&self, key: &str, body: Result<Body, ManageError>) -> Answer {
        let version = body?.required("version")?;
        let live = self.state.live();
        let mut prompt = live
            .catalog
            .prompts
            .get(key)
            .cloned()
            .ok_or_else(|| ManageError::NotFound(format!("no prompt {key:?}")))?;
        if !live
            .catalog
            .prompt_versions
            .get(key)
            .is_some_and(|v| v.contains_key(&version))
        {
            return Err(bad(
                "version",
                format!("prompt {key:?} has no version {version:?}"),
            ));
        }
        prompt.active_version = Some(version);
        self.write(Kind::Prompt, key, &prompt).await?;
        Ok((200, self.prompt_view(&prompt)))
    }
}

/// A USD amount as a JSON number, for LiteLLM clients that expect floats on the wire.
/// Tollgate's own fields carry exact strings and nano-USD integers beside it.
fn usd_number(nano: u64) -> Value {
    format_usd(nano)
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}
