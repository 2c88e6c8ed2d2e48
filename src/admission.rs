//! Admission: before the provider is called, one atomic store step checks every budget
//! and rate limit that applies and reserves the request's worst-case cost; after the
//! response, settlement releases the reservation and adds the actual cost.
//!
//! Worst case: input tokens are bounded by the body's byte length (no tokenizer emits
//! more tokens than bytes), priced at the model's dearest input rate; output by the
//! request's max-output field, else the model's `max_output_tokens`, else
//! `limits.default_max_output_tokens` (4096 when unset). When the request named no
//! maximum, the bound used is written into the forwarded request so the provider cannot
//! exceed it. This over-reserves (four bytes per token is typical), which can refuse a
//! request near the cap that would in fact have fitted; it can never let one overspend.

use std::sync::Arc;

use bytes::Bytes;

use crate::api::Endpoint;
use crate::body::{Edits, RequestBody};
use crate::budgets::{Action, Applied, OnStoreError};
use crate::errors::GatewayError;
use crate::pricing::{cost_nano_usd, format_usd, parse_usd};
use crate::proxy::{Admitted, RequestCtx, State};
use crate::record::UsageRecord;
use crate::store::{
    rpm_only_mask, BudgetStatus, Decision, LimitKind, Refusal, ReserveRequest, ScopeCheck,
    Settlement, StoreError,
};

const FALLBACK_MAX_OUTPUT: u64 = 4096;

/// A reservation to settle once the response is done.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub request_id: String,
    pub scopes: Vec<String>,
    /// Which scopes limit requests per minute only (`Settlement::rpm_only`).
    pub rpm_only: u32,
    /// The budgets it counted in, for alerts after settlement.
    pub budgets: Vec<Applied>,
}

/// The max-output member a request would carry on this endpoint, if any.
fn max_output_field(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => Some("max_completion_tokens"),
        Endpoint::Completions | Endpoint::Messages => Some("max_tokens"),
        Endpoint::Responses => Some("max_output_tokens"),
        Endpoint::Embeddings | Endpoint::CountTokens => None,
    }
}

/// Runs admission for a request. On success the request may have been rewritten (clamped
/// output, downgraded model) and `ctx` holds the reservation and the budget headers.
pub async fn admit(
    state: &State,
    ctx: &mut RequestCtx,
    a: &mut Admitted,
    max_cost: Option<&str>,
) -> Result<(), GatewayError> {
    if !a.endpoint.is_priced() {
        return Ok(());
    }
    let live = state.live();
    let (checks, applied) = {
        // Borrowed from the record, not copied: nothing below changes it.
        let unattributed = crate::attribution::Attribution::default();
        let attribution = ctx
            .record
            .as_ref()
            .map_or(&unattributed, |r| &r.attribution);
        if live.policy.is_blocked(attribution.customer.as_deref()) {
            return Err(GatewayError::Forbidden(format!(
                "customer {:?} is blocked",
                attribution.customer.as_deref().unwrap_or_default()
            )));
        }
        runaway_block(state, &live.catalog, attribution)?;
        live.policy.checks(attribution)
    };
    let (fixed, per_out) = a
        .price
        .as_ref()
        .map_or((0, 0), |p| crate::budgets::worst_case(p, a.input_bound));
    let field = max_output_field(a.endpoint);
    let client_max = a.client_max_output;
    let max_output = match field {
        None => 0,
        Some(_) => client_max
            .or(a.route.max_output_tokens)
            .or(live.policy.default_max_output_tokens())
            .unwrap_or(FALLBACK_MAX_OUTPUT),
    };
    let worst = fixed.saturating_add(per_out.saturating_mul(max_output));
    if let Some(limit) = max_cost {
        let limit = parse_usd(limit)
            .map_err(|e| GatewayError::BadRequest(format!("x-tollgate-max-cost: {e}")))?;
        if worst > limit {
            return Err(GatewayError::BudgetExceeded {
                message: format!(
                    "the request's worst-case cost ${} exceeds x-tollgate-max-cost ${}",
                    format_usd(worst),
                    format_usd(limit)
                ),
                retry_after_s: 0,
            });
        }
    }
    if checks.is_empty() {
        return Ok(());
    }
    let req = ReserveRequest {
        request_id: ctx.request_id.clone(),
        scopes: checks,
        fixed_nano: fixed,
        per_output_nano: per_out,
        max_output_tokens: max_output,
        min_output_tokens: u64::from(field.is_some()),
        tokens: a.input_bound.saturating_add(max_output),
        requests: 1,
        lease_ms: state.config.store.lease_seconds.saturating_mul(1000),
    };
    let decision = match state.store.reserve(&req).await {
        Ok(d) => d,
        Err(e) => {
            store_failed(state, &applied, e)?;
            // Admitted open: no reservation was made, but the settlement is still owed.
            // It is retried (see `settle`) until the store is back, so nothing is lost.
            ctx.reservation = Some(Reservation {
                request_id: req.request_id.clone(),
                scopes: req.scopes.iter().map(|c| c.scope.clone()).collect(),
                rpm_only: rpm_only_mask(&req.scopes),
                budgets: applied,
            });
            return Ok(());
        }
    };
    match decision {
        Decision::Refused(r) => Err(refusal_error(&r)),
        Decision::Admitted {
            output_tokens,
            budgets,
            shadow_refusals,
            ..
        } => {
            let model = downgrade_target(&applied, &req.scopes, &budgets);
            ctx.reservation = Some(Reservation {
                request_id: req.request_id,
                rpm_only: rpm_only_mask(&req.scopes),
                scopes: req.scopes.into_iter().map(|c| c.scope).collect(),
                budgets: applied,
            });
            for r in &shadow_refusals {
                state.metrics.shadow_refusal(&r.scope);
                log::info!(
                    "shadow budget would refuse {}: {}",
                    ctx.request_id,
                    refusal_error(r)
                );
            }
            let write_max = field.filter(|_| output_tokens < max_output || client_max.is_none());
            rewrite(state, ctx, a, write_max.map(|f| (f, output_tokens)), model)?;
            ctx.extra_headers.extend(budget_headers(&budgets));
            Ok(())
        }
    }
}

/// What a store failure means for this request, per the budgets' `on_store_error`.
fn store_failed(state: &State, applied: &[Applied], e: StoreError) -> Result<(), GatewayError> {
    let open = !applied.is_empty()
        && applied
            .iter()
            .all(|b| b.rule.on_store_error == OnStoreError::Open);
    state.metrics.store_degraded(if open {
        "admitted_open"
    } else {
        "refused_closed"
    });
    crate::log_throttled!(log::Level::Warn, "budget store: {e}");
    if open {
        Ok(())
    } else {
        Err(GatewayError::StoreUnavailable(e.to_string()))
    }
}

fn refusal_error(r: &Refusal) -> GatewayError {
    let retry_after_s = r.retry_after_ms.div_ceil(1000);
    match r.kind {
        LimitKind::Budget(period) => GatewayError::BudgetExceeded {
            message: format!(
                "{} budget of {} exceeded: ${} cap, ${} left",
                period.label(),
                r.scope,
                format_usd(r.limit),
                format_usd(r.remaining)
            ),
            retry_after_s,
        },
        kind => GatewayError::RateLimited {
            message: format!("rate limit of {}: {} {kind} exceeded", r.scope, r.limit),
            retry_after_s,
            unit: if kind == LimitKind::TokensPerMinute {
                "tokens"
            } else {
                "requests"
            },
            limit: r.limit,
            remaining: r.remaining,
        },
    }
}

/// The cheaper model to switch to, if a downgrade budget has reached its threshold.
fn downgrade_target(
    applied: &[Applied],
    scopes: &[ScopeCheck],
    budgets: &[BudgetStatus],
) -> Option<String> {
    applied
        .iter()
        .filter(|b| b.rule.action == Action::Downgrade)
        .find_map(|b| {
            let scope = &scopes.get(b.scope)?.scope;
            let status = budgets
                .iter()
                .find(|s| &s.scope == scope && s.period == b.rule.period)?;
            let threshold = (status.cap_nano as f64 * b.rule.downgrade_at) as u64;
            (status.used_nano >= threshold)
                .then(|| b.rule.downgrade_to.clone())
                .flatten()
        })
}

/// Applies a clamp and a downgrade to the forwarded body.
fn rewrite(
    state: &State,
    ctx: &mut RequestCtx,
    a: &mut Admitted,
    max_tokens: Option<(&'static str, u64)>,
    model: Option<String>,
) -> Result<(), GatewayError> {
    let model = model.filter(|m| *m != a.route.upstream_model);
    if max_tokens.is_none() && model.is_none() {
        return Ok(());
    }
    let body =
        RequestBody::parse(&a.upstream_body).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let field = max_tokens.map(|(f, n)| (body.max_output_tokens().map_or(f, |(name, _)| name), n));
    let edits = Edits {
        max_tokens: field,
        model: model.clone(),
        ..Edits::default()
    };
    a.upstream_body = Bytes::from(body.rewrite(&edits));
    if let Some((_, n)) = field {
        a.max_output_tokens = Some(n);
    }
    if let Some(m) = model {
        ctx.extra_headers.push((
            "x-tollgate-model-shifted",
            format!("{} -> {m}", a.route.upstream_model),
        ));
        // The reservation was made at the dearer model's price; the cheaper one fits in it.
        a.price = state.price_for(&m, &m).cloned().or(a.price.take());
        a.route.upstream_model = m;
    }
    Ok(())
}

fn rfc3339(ms: u64) -> String {
    let (y, mo, d) = crate::store::civil_from_days((ms / 86_400_000) as i64);
    let s = (ms / 1000) % 86_400;
    let mut out = String::with_capacity(20);
    let parts = [
        (y.max(0) as u64, 4, '-'),
        (u64::from(mo), 2, '-'),
        (u64::from(d), 2, 'T'),
        (s / 3600, 2, ':'),
        ((s / 60) % 60, 2, ':'),
        (s % 60, 2, 'Z'),
    ];
    for (n, width, then) in parts {
        crate::fastfmt::push_padded(&mut out, n, width);
        out.push(then);
    }
    out
}

/// The tightest applicable budget, as response headers.
fn budget_headers(budgets: &[BudgetStatus]) -> Vec<(&'static str, String)> {
    let Some(tight) = budgets.iter().min_by_key(|b| b.remaining_nano()) else {
        return Vec::new();
    };
    let mut h = vec![
        (
            "x-tollgate-budget-remaining",
            format_usd(tight.remaining_nano()),
        ),
        (
            "x-tollgate-budget-scope",
            [tight.scope.as_str(), tight.period.label()].join(" "),
        ),
    ];
    if let Some(reset) = tight.reset_ms {
        h.push(("x-tollgate-budget-reset", rfc3339(reset)));
    }
    h
}

/// Settles a finished request: inline with an in-process store, else through the
/// settlement queue (`crate::settler`), which sends settlements in batches off the request
/// path and retries them while the store is down.
pub async fn settle(state: &Arc<State>, reservation: Reservation, record: &UsageRecord) {
    let s = Settlement {
        unused_steps: None,
        request_id: reservation.request_id,
        scopes: reservation.scopes,
        rpm_only: reservation.rpm_only,
        cost_nano: record.cost_nano_usd,
        tokens: record
            .usage
            .total_input()
            .saturating_add(record.usage.output_tokens),
    };
    if !state.store.needs_settling(&s) {
        return;
    }
    if state.store.settles_inline() && state.store.settle(&s).await.is_ok() {
        settled(state, s.scopes, reservation.budgets);
    } else {
        state.settler.push(state, s, reservation.budgets);
    }
}

/// After a settlement is applied: alert checks, when a webhook is configured.
pub fn settled(state: &Arc<State>, scopes: Vec<String>, budgets: Vec<Applied>) {
    if state.config.limits.alerts.webhook_url.is_none() {
        return;
    }
    let task_state = state.clone();
    state.work.spawn(async move {
        Box::pin(check_alerts(&task_state, &scopes, &budgets)).await;
    });
}

async fn check_alerts(state: &Arc<State>, scopes: &[String], budgets: &[Applied]) {
    for b in budgets {
        if let Some(scope) = scopes.get(b.scope) {
            crate::alerts::check(state, scope, &b.rule).await;
        }
    }
}

/// Refuses a request while any of its scopes is blocked by the runaway breaker.
fn runaway_block(
    state: &State,
    catalog: &crate::catalog::Catalog,
    a: &crate::attribution::Attribution,
) -> Result<(), GatewayError> {
    if catalog.blocks.is_empty() && state.runaway.is_empty() {
        return Ok(());
    }
    let now = crate::record::unix_ms(std::time::SystemTime::now());
    for scope in a.scopes() {
        let until = catalog
            .blocked_until(&scope, now)
            .map(|b| b.until_ms)
            .or_else(|| state.runaway.blocked_until(&scope, now));
        if let Some(until) = until {
            return Err(GatewayError::BudgetExceeded {
                message: format!(
                    "runaway breaker: {scope} spent too fast and is blocked until {}",
                    rfc3339(until)
                ),
                retry_after_s: until.saturating_sub(now).div_ceil(1000),
            });
        }
    }
    Ok(())
}

/// Feeds a finished request's cost to the runaway breaker; a trip blocks the scope on
/// every gateway (through the catalog) and sends an alert.
pub fn watch_runaway(state: &Arc<State>, record: &UsageRecord) {
    if state.runaway.is_empty() || record.cost_nano_usd == 0 {
        return;
    }
    let now = crate::record::unix_ms(std::time::SystemTime::now());
    for scope in record.attribution.scopes() {
        let Some(trip) = state.runaway.record(&scope, record.cost_nano_usd, now) else {
            continue;
        };
        log::warn!(
            "runaway breaker: {} spent ${} in {} s; blocked until {}",
            trip.scope,
            format_usd(trip.spent_nano),
            trip.window_seconds,
            rfc3339(trip.until_ms)
        );
        state.metrics.runaway_trip();
        let task_state = state.clone();
        state.work.spawn(async move {
            let state = task_state;
            let block = crate::catalog::BlockDoc {
                scope: trip.scope.clone(),
                until_ms: trip.until_ms,
                reason: format!(
                    "spent ${} in {} s",
                    format_usd(trip.spent_nano),
                    trip.window_seconds
                ),
            };
            let doc = serde_json::to_string(&block).unwrap_or_default();
            let kind = crate::catalog::Kind::Block.label();
            match state
                .store
                .catalog_write(kind, &trip.scope, Some(&doc), false)
                .await
            {
                Ok(_) => {
                    let _ = state.refresh_catalog(false).await;
                }
                Err(e) => log::warn!("runaway block not shared with other gateways: {e}"),
            }
            crate::alerts::runaway(&state, &trip).await;
        });
    }
}

/// The cost a record would have at a price: kept here so settlement and records agree.
pub fn cost_of(a: &Admitted, usage: &crate::usage::Usage) -> u64 {
    a.price.as_ref().map_or(0, |p| cost_nano_usd(p, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_times_are_rfc3339_utc() {
        assert_eq!(rfc3339(1_796_083_200_000), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_435_261_000), "2026-11-23T12:01:01Z");
    }

    #[test]
    fn refusals_become_429s_with_retry_after() {
        let r = Refusal {
            scope: "customer:acme".into(),
            kind: LimitKind::Budget(crate::store::Period::Daily),
            limit: 1_000_000_000,
            remaining: 0,
            retry_after_ms: 1_500,
        };
        let e = refusal_error(&r);
        assert_eq!(e.status(), 429);
        assert!(
            e.to_string().contains("customer:acme") && e.to_string().contains("daily"),
            "{e}"
        );
        assert_eq!(
            e.headers(),
            vec![("retry-after".to_string(), "2".to_string())]
        );
        let e = refusal_error(&Refusal {
            kind: LimitKind::TokensPerMinute,
            ..r
        });
        assert!(e
            .headers()
            .iter()
            .any(|(k, _)| k == "x-ratelimit-limit-tokens"));
    }
}
