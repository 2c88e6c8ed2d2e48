//! The usage record: one per request, metadata only — never prompt or completion text,
//! never a key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::attribution::Attribution;
use crate::usage::Usage;

#[derive(Debug, Clone, Default)]
pub struct UsageRecord {
    pub request_id: String,
    /// Unix milliseconds when the request arrived.
    pub time_ms: u64,
    pub provider: String,
    pub endpoint: &'static str,
    pub model_requested: String,
    pub model_served: Option<String>,
    pub attribution: Attribution,
    pub usage: Usage,
    pub cost_nano_usd: u64,
    pub price_version: String,
    pub status: u16,
    pub streamed: bool,
    pub sandbox: bool,
    /// Usage (all or part) was estimated because the provider reported none.
    pub estimated: bool,
    /// Served at zero cost because no price was configured and `allow_unpriced` is on.
    pub unpriced: bool,
    /// The client left before the response was complete.
    pub client_gone: bool,
    pub error: Option<String>,
    pub latency: Duration,
    pub ttfb: Option<Duration>,
    /// Time spent in Tollgate itself (latency minus time waiting on the provider).
    pub overhead: Duration,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Serialize)]
struct LogLine<'a> {
    request_id: &'a str,
    time_ms: u64,
    provider: &'a str,
    endpoint: &'a str,
    model: &'a str,
    model_served: Option<&'a str>,
    customer: Option<&'a str>,
    feature: Option<&'a str>,
    team: Option<&'a str>,
    key_id: Option<&'a str>,
    prompt_key: Option<&'a str>,
    prompt_version: Option<&'a str>,
    tags: &'a [String],
    tokens_in: u64,
    tokens_out: u64,
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    cache_write_1h_tokens: u64,
    reasoning_tokens: u64,
    cost_nano_usd: u64,
    price_version: &'a str,
    status: u16,
    streamed: bool,
    sandbox: bool,
    estimated: bool,
    unpriced: bool,
    client_gone: bool,
    error: Option<&'a str>,
    latency_ms: f64,
    ttfb_ms: Option<f64>,
    overhead_ms: f64,
}

impl UsageRecord {
    /// One JSON line for the access log.
    pub fn log_line(&self) -> String {
        let a = &self.attribution;
        let line = LogLine {
            request_id: &self.request_id,
            time_ms: self.time_ms,
            provider: &self.provider,
            endpoint: self.endpoint,
            model: &self.model_requested,
            model_served: self.model_served.as_deref(),
            customer: a.customer.as_deref(),
            feature: a.feature.as_deref(),
            team: a.team.as_deref(),
            key_id: a.key_id.as_deref(),
            prompt_key: a.prompt_key.as_deref(),
            prompt_version: a.prompt_version.as_deref(),
            tags: &a.tags,
            tokens_in: self.usage.total_input(),
            tokens_out: self.usage.output_tokens,
            input_tokens: self.usage.input_tokens,
            cache_read_tokens: self.usage.cache_read_tokens,
            cache_write_tokens: self.usage.cache_write_tokens,
            cache_write_1h_tokens: self.usage.cache_write_1h_tokens,
            reasoning_tokens: self.usage.reasoning_tokens,
            cost_nano_usd: self.cost_nano_usd,
            price_version: &self.price_version,
            status: self.status,
            streamed: self.streamed,
            sandbox: self.sandbox,
            estimated: self.estimated,
            unpriced: self.unpriced,
            client_gone: self.client_gone,
            error: self.error.as_deref(),
            latency_ms: ms(self.latency),
            ttfb_ms: self.ttfb.map(ms),
            overhead_ms: ms(self.overhead),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}
