//! Prometheus metrics. Every label has a bounded set of values: customers and features
//! become labels only when configured (or within an explicit cap); the rest are `other`.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::config::MetricsConfig;
use crate::record::UsageRecord;

pub const OTHER: &str = "other";

/// Decides which values of an open-ended dimension get their own label.
struct LabelPolicy {
    configured: HashSet<String>,
    dynamic_cap: usize,
    dynamic: Mutex<HashSet<String>>,
}

impl LabelPolicy {
    fn new(configured: &[String], dynamic_cap: usize) -> Self {
        LabelPolicy {
            configured: configured.iter().cloned().collect(),
            dynamic_cap,
            dynamic: Mutex::new(HashSet::new()),
        }
    }

    fn label<'a>(&self, value: Option<&'a str>) -> &'a str {
        let Some(v) = value else { return "none" };
        if self.configured.contains(v) {
            return v;
        }
        if self.dynamic_cap == 0 {
            return OTHER;
        }
        let Ok(mut seen) = self.dynamic.lock() else {
            return OTHER;
        };
        if seen.contains(v) || (seen.len() < self.dynamic_cap && seen.insert(v.to_string())) {
            v
        } else {
            OTHER
        }
    }
}

pub struct Metrics {
    registry: Registry,
    customers: LabelPolicy,
    features: LabelPolicy,
    requests: IntCounterVec,
    tokens: IntCounterVec,
    reasoning_tokens: IntCounterVec,
    cost: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    overhead: HistogramVec,
    upstream_errors: IntCounterVec,
    upstream_retries: IntCounterVec,
    estimated: IntCounterVec,
    shadow_refusals: IntCounterVec,
    store_degraded: IntCounterVec,
    rejected: IntCounterVec,
    alerts: IntCounterVec,
    /// Failed ledger writes (records kept in memory and retried).
    pub ledger_errors: prometheus::IntCounter,
    pub in_flight: IntGauge,
    /// Settlements waiting for the store: as a flush starts, and to be retried after it.
    pub settlements_waiting: IntGauge,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let buckets = exponential_buckets(0.0001, 2.5, 16)?;
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new(cfg: &MetricsConfig) -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let in_flight = IntGauge::new("tollgate_in_flight_requests", "Requests being served now.")?;
        r.register(Box::new(in_flight.clone()))?;
        let settlements_waiting = IntGauge::new(
            "tollgate_settlements_waiting",
            "Settlements waiting for the budget store: as a flush starts, and to be retried after it.",
        )?;
        r.register(Box::new(settlements_waiting.clone()))?;
        let ledger_errors = prometheus::IntCounter::new(
            "tollgate_ledger_errors_total",
            "Failed usage-ledger writes; the records are kept and retried.",
        )?;
        r.register(Box::new(ledger_errors.clone()))?;
        Ok(Metrics {
            customers: LabelPolicy::new(&cfg.customer_labels, cfg.dynamic_label_cap),
            features: LabelPolicy::new(&cfg.feature_labels, cfg.dynamic_label_cap),
            requests: counter(
                &r,
                "tollgate_requests_total",
                "Requests served, by outcome.",
                &[
                    "provider",
                    "model",
                    "status_class",
                    "streamed",
                    "customer",
                    "feature",
                ],
            )?,
            tokens: counter(
                &r,
                "tollgate_tokens_total",
                "Tokens metered, by direction and kind.",
                &["provider", "model", "direction", "kind"],
            )?,
            reasoning_tokens: counter(
                &r,
                "tollgate_reasoning_tokens_total",
                "Output tokens spent on hidden reasoning (already inside output tokens).",
                &["provider", "model"],
            )?,
            cost: counter(
                &r,
                "tollgate_cost_nano_usd_total",
                "Cost of served requests in nano-USD.",
                &["provider", "model", "customer", "feature"],
            )?,
            duration: histogram(
                &r,
                "tollgate_request_duration_seconds",
                "Time from request received to response finished.",
                &["provider", "streamed"],
            )?,
            ttfb: histogram(
                &r,
                "tollgate_time_to_first_byte_seconds",
                "Time from request received to the first response byte sent.",
                &["provider", "streamed"],
            )?,
            overhead: histogram(
                &r,
                "tollgate_gateway_overhead_seconds",
                "Time spent in Tollgate itself: total minus time waiting on the provider.",
                &["provider"],
            )?,
            upstream_errors: counter(
                &r,
                "tollgate_upstream_errors_total",
                "Failed exchanges with providers, by kind.",
                &["provider", "kind"],
            )?,
            upstream_retries: counter(
                &r,
                "tollgate_upstream_retries_total",
                "Requests sent to a provider a second time, by reason: stale_connection (a pooled connection it had closed), refused (it said it had not processed the request) or unsent (the request could not be written whole).",
                &["provider", "reason"],
            )?,
            estimated: counter(
                &r,
                "tollgate_estimated_usage_total",
                "Requests whose usage was estimated because the provider reported none.",
                &["provider"],
            )?,
            shadow_refusals: counter(
                &r,
                "tollgate_shadow_budget_refusals_total",
                "Requests a shadow budget would have refused (admitted anyway).",
                &["scope_kind"],
            )?,
            store_degraded: counter(
                &r,
                "tollgate_store_degraded_total",
                "Decisions made without the budget store, by outcome.",
                &["outcome"],
            )?,
            rejected: counter(
                &r,
                "tollgate_rejected_requests_total",
                "Requests refused before they could be attributed (auth, routing, bad input).",
                &["status"],
            )?,
            alerts: counter(
                &r,
                "tollgate_budget_alerts_total",
                "Budget threshold alerts, by outcome.",
                &["outcome"],
            )?,
            ledger_errors,
            in_flight,
            settlements_waiting,
            registry: r,
        })
    }

    pub fn model_label<'a>(&self, model: &'a str, known: bool) -> &'a str {
        if known {
            model
        } else {
            OTHER
        }
    }

    pub fn shadow_refusal(&self, scope: &str) {
        let kind = scope.split(':').next().unwrap_or("global");
        self.shadow_refusals.with_label_values(&[kind]).inc();
    }

    pub fn alert_fired(&self) {
        self.alerts.with_label_values(&["fired"]).inc();
    }

    pub fn runaway_trip(&self) {
        self.alerts.with_label_values(&["runaway_trip"]).inc();
    }

    pub fn alert_undelivered(&self) {
        self.alerts.with_label_values(&["undelivered"]).inc();
    }

    pub fn rejected(&self, status: u16) {
        self.rejected
            .with_label_values(&[&status.to_string()])
            .inc();
    }

    pub fn store_degraded(&self, outcome: &str) {
        self.store_degraded.with_label_values(&[outcome]).inc();
    }

    pub fn upstream_error(&self, provider: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[provider, kind])
            .inc();
    }

    pub fn upstream_retry(&self, provider: &str, reason: &str) {
        self.upstream_retries
            .with_label_values(&[provider, reason])
            .inc();
    }

    /// Counts one finished request. `model_label` is already bounded by the caller.
    pub fn observe(&self, rec: &UsageRecord, model_label: &str) {
        let provider = rec.provider.as_str();
        let customer = self.customers.label(rec.attribution.customer.as_deref());
        let feature = self.features.label(rec.attribution.feature.as_deref());
        let streamed = if rec.streamed { "true" } else { "false" };
        let class = status_class(rec.status);
        self.requests
            .with_label_values(&[provider, model_label, class, streamed, customer, feature])
            .inc();
        let u = &rec.usage;
        for (direction, kind, n) in [
            ("in", "input", u.input_tokens),
            ("in", "cache_read", u.cache_read_tokens),
            ("in", "cache_write", u.cache_write_tokens),
            ("in", "cache_write_1h", u.cache_write_1h_tokens),
            ("out", "output", u.output_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .with_label_values(&[provider, model_label, direction, kind])
                    .inc_by(n);
            }
        }
        if u.reasoning_tokens > 0 {
            self.reasoning_tokens
                .with_label_values(&[provider, model_label])
                .inc_by(u.reasoning_tokens);
        }
        self.cost
            .with_label_values(&[provider, model_label, customer, feature])
            .inc_by(rec.cost_nano_usd);
        self.duration
            .with_label_values(&[provider, streamed])
            .observe(rec.latency.as_secs_f64());
        if let Some(t) = rec.ttfb {
            self.ttfb
                .with_label_values(&[provider, streamed])
                .observe(t.as_secs_f64());
        }
        self.overhead
            .with_label_values(&[provider])
            .observe(rec.overhead.as_secs_f64());
        if rec.estimated {
            self.estimated.with_label_values(&[provider]).inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        0..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_policy_bounds_values() {
        let p = LabelPolicy::new(&["acme".to_string()], 1);
        assert_eq!(p.label(Some("acme")), "acme");
        assert_eq!(p.label(Some("first")), "first");
        assert_eq!(p.label(Some("second")), OTHER);
        assert_eq!(p.label(Some("first")), "first");
        assert_eq!(p.label(None), "none");
        let closed = LabelPolicy::new(&[], 0);
        assert_eq!(closed.label(Some("x")), OTHER);
    }
}
