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

impl UsageRecord {
    /// The ledger line: byte for byte what `serde_json::to_writer(&self.stored())` writes,
    /// without the owned copy of every string or serde's per-key work (the ledger writes
    /// one per request; a test holds the two equal).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let (a, u) = (&self.attribution, &self.usage);
        let mut o = crate::fastfmt::JsonObject::new(out);
        o.str("request_id", &self.request_id);
        o.u64("time_ms", self.time_ms);
        o.str("provider", &self.provider);
        o.str("endpoint", self.endpoint);
        o.str("model", &self.model_requested);
        o.opt_str("model_served", self.model_served.as_deref());
        o.opt_str("customer", a.customer.as_deref());
        o.opt_str("feature", a.feature.as_deref());
        o.opt_str("team", a.team.as_deref());
        o.opt_str("key_id", a.key_id.as_deref());
        o.opt_str("prompt_key", a.prompt_key.as_deref());
        o.opt_str("prompt_version", a.prompt_version.as_deref());
        o.strs("tags", &a.tags);
        o.u64("tokens_in", u.total_input());
        o.u64("tokens_out", u.output_tokens);
        o.u64("input_tokens", u.input_tokens);
        o.u64("cache_read_tokens", u.cache_read_tokens);
        o.u64("cache_write_tokens", u.cache_write_tokens);
        o.u64("cache_write_1h_tokens", u.cache_write_1h_tokens);
        o.u64("reasoning_tokens", u.reasoning_tokens);
        o.u64("cost_nano_usd", self.cost_nano_usd);
        o.str("price_version", &self.price_version);
        o.u64("status", u64::from(self.status));
        o.bool("streamed", self.streamed);
        o.bool("sandbox", self.sandbox);
        o.bool("estimated", self.estimated);
        o.bool("unpriced", self.unpriced);
        o.bool("client_gone", self.client_gone);
        o.opt_str("error", self.error.as_deref());
        o.f64("latency_ms", ms(self.latency));
        o.opt_f64("ttfb_ms", self.ttfb.map(ms));
        o.f64("overhead_ms", ms(self.overhead));
        o.end();
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `write_json` must stay what serde writes for `stored()`: the ledger is read back
    /// with serde.
    #[test]
    fn write_json_is_byte_for_byte_serde_json_of_stored() {
        let plain = UsageRecord {
            request_id: "tg-abc-1f".into(),
            time_ms: 1_796_083_200_123,
            provider: "openai".into(),
            endpoint: "chat_completions",
            model_requested: "gpt-4o-mini".into(),
            attribution: Attribution {
                customer: Some("acme".into()),
                team: Some("bench".into()),
                key_id: Some("bench".into()),
                ..Attribution::default()
            },
            usage: Usage {
                input_tokens: 12,
                output_tokens: 7,
                ..Usage::default()
            },
            cost_nano_usd: 6_000,
            price_version: "2026-11-01".into(),
            status: 200,
            latency: Duration::from_micros(1_250),
            ttfb: Some(Duration::from_micros(500)),
            overhead: Duration::from_micros(42),
            ..UsageRecord::default()
        };
        let odd = UsageRecord {
            request_id: "id \"quoted\"\\".into(),
            model_served: Some("m\u{1}\n".into()),
            attribution: Attribution {
                feature: Some("ünï ✓".into()),
                prompt_key: Some(String::new()),
                prompt_version: Some("v2".into()),
                tags: vec!["a".into(), "b\"c".into(), String::new()],
                ..Attribution::default()
            },
            usage: Usage {
                input_tokens: 5,
                cache_read_tokens: 6,
                cache_write_tokens: 7,
                cache_write_1h_tokens: 3,
                output_tokens: 9,
                reasoning_tokens: u64::MAX,
            },
            streamed: true,
            sandbox: true,
            estimated: true,
            unpriced: true,
            client_gone: true,
            error: Some("upstream said \"no\"\t".into()),
            latency: Duration::from_micros(123_456_789),
            ttfb: None,
            overhead: Duration::ZERO,
            ..plain.clone()
        };
        for r in [UsageRecord::default(), plain, odd] {
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            let theirs = serde_json::to_vec(&r.stored()).expect("serde");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
            let back: StoredRecord = serde_json::from_slice(&ours).expect("reads back");
            assert_eq!(back, r.stored());
        }
    }
}
