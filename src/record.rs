//! The usage record: one per request, metadata only — never prompt or completion text,
//! never a key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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

/// A record as stored in the ledger and printed in the access log: flat, owned, and
/// read back by the usage API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub request_id: String,
    pub time_ms: u64,
    pub provider: String,
    pub endpoint: String,
    pub model: String,
    pub model_served: Option<String>,
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub prompt_key: Option<String>,
    pub prompt_version: Option<String>,
    pub tags: Vec<String>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub input_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_nano_usd: u64,
    pub price_version: String,
    pub status: u16,
    pub streamed: bool,
    pub sandbox: bool,
    pub estimated: bool,
    pub unpriced: bool,
    pub client_gone: bool,
    pub error: Option<String>,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub overhead_ms: f64,
}

impl UsageRecord {
    pub fn stored(&self) -> StoredRecord {
        let a = &self.attribution;
        StoredRecord {
            request_id: self.request_id.clone(),
            time_ms: self.time_ms,
            provider: self.provider.clone(),
            endpoint: self.endpoint.to_string(),
            model: self.model_requested.clone(),
            model_served: self.model_served.clone(),
            customer: a.customer.clone(),
            feature: a.feature.clone(),
            team: a.team.clone(),
            key_id: a.key_id.clone(),
            prompt_key: a.prompt_key.clone(),
            prompt_version: a.prompt_version.clone(),
            tags: a.tags.clone(),
            tokens_in: self.usage.total_input(),
            tokens_out: self.usage.output_tokens,
            input_tokens: self.usage.input_tokens,
            cache_read_tokens: self.usage.cache_read_tokens,
            cache_write_tokens: self.usage.cache_write_tokens,
            cache_write_1h_tokens: self.usage.cache_write_1h_tokens,
            reasoning_tokens: self.usage.reasoning_tokens,
            cost_nano_usd: self.cost_nano_usd,
            price_version: self.price_version.clone(),
            status: self.status,
            streamed: self.streamed,
            sandbox: self.sandbox,
            estimated: self.estimated,
            unpriced: self.unpriced,
            client_gone: self.client_gone,
            error: self.error.clone(),
            latency_ms: ms(self.latency),
            ttfb_ms: self.ttfb.map(ms),
            overhead_ms: ms(self.overhead),
        }
    }

    /// One JSON line for the access log.
    pub fn log_line(&self) -> String {
        serde_json::to_string(&self.stored()).unwrap_or_default()
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}
