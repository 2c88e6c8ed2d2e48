//! Budget alerts: when a budget's spend crosses one of its thresholds (default 50%, 80%,
//! 90%, 100% of the cap), one JSON event is POSTed to the configured webhook — exactly
//! once per scope, period and threshold, even with many gateway instances (the store's
//! `claim_once` decides who sends). Delivery is retried with backoff on connection errors
//! and 5xx answers; a 4xx answer is final. With a secret, the body is signed:
//! `x-tollgate-signature: sha256=<hex HMAC-SHA256 of the body>`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::budgets::BudgetRule;
use crate::pricing::format_usd;
use crate::proxy::State;
use crate::record::unix_ms;
use crate::routing::BaseUrl;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where events are POSTed (`http://` or `https://`). No URL, no alerts.
    pub webhook_url: Option<String>,
    /// Name of the environment variable holding the signing secret (preferred).
    pub secret_env: Option<String>,
    pub secret: Option<String>,
}

impl AlertsConfig {
    /// The webhook URL must parse; the reason never repeats it, since a webhook URL often
    /// carries its token in the path (Slack's do), and errors reach stderr.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match &self.webhook_url {
            Some(url) if BaseUrl::parse(url).is_err() => Err((
                "alerts.webhook_url".into(),
                "must be http://host[:port]/path or https://… (not shown: it may hold a token)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    fn secret(&self) -> Option<String> {
        self.secret
            .clone()
            .or_else(|| self.secret_env.as_ref().and_then(|v| std::env::var(v).ok()))
            .filter(|s| !s.is_empty())
    }
}

pub const DEFAULT_THRESHOLDS: [f64; 4] = [0.5, 0.8, 0.9, 1.0];

pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Checks one settled budget against its thresholds and sends what was crossed.
pub async fn check(state: &Arc<State>, scope: &str, rule: &BudgetRule) {
    let Some(url) = state.config.limits.alerts.webhook_url.clone() else {
        return;
    };
    if rule.cap_usd == 0 {
        return;
    }
    let Ok(spent) = state.store.spent(scope, rule.period).await else {
        return;
    };
    let now = unix_ms(std::time::SystemTime::now());
    let (period_id, reset) = rule.period.window(now);
    let thresholds = rule
        .alert_thresholds
        .clone()
        .unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec());
    for t in thresholds {
        if (spent as f64) < t * rule.cap_usd as f64 {
            continue;
        }
        let name = format!("alert:{period_id}:{}", (t * 1000.0).round() as u64);
        // The claim outlives the period by a day so a late settlement cannot re-fire it.
        let ttl = reset.map_or(10 * 365 * 86_400_000, |r| {
            r.saturating_sub(now) + 86_400_000
        });
        if !matches!(state.store.claim_once(scope, &name, ttl).await, Ok(true)) {
            continue;
        }
        let event = serde_json::json!({
            "type": "budget_threshold",
            "scope": scope,
            "period": rule.period.label(),
            "period_id": period_id,
            "threshold": t,
            "cap_usd": format_usd(rule.cap_usd),
            "spent_usd": format_usd(spent),
            "time_ms": now,
        });
        state.metrics.alert_fired();
        deliver(state, &url, event.to_string().into_bytes()).await;
    }
}

/// Sends a runaway-breaker trip, once per scope and block across gateways.
pub async fn runaway(state: &Arc<State>, trip: &crate::runaway::Trip) {
    let Some(url) = state.config.limits.alerts.webhook_url.clone() else {
        return;
    };
    let name = format!("runaway:{}", trip.until_ms / 1000);
    let ttl = trip.window_seconds.max(1) * 1000;
    if !matches!(
        state.store.claim_once(&trip.scope, &name, ttl).await,
        Ok(true)
    ) {
        return;
    }
    let event = serde_json::json!({
        "type": "runaway",
        "scope": trip.scope,
        "spent_usd": format_usd(trip.spent_nano),
        "window_seconds": trip.window_seconds,
        "blocked_until_ms": trip.until_ms,
        "time_ms": unix_ms(std::time::SystemTime::now()),
    });
    state.metrics.alert_fired();
    deliver(state, &url, event.to_string().into_bytes()).await;
}

async fn deliver(state: &Arc<State>, url: &str, body: Vec<u8>) {
    let secret = state.config.limits.alerts.secret();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=6 {
        match post(state, url, &body, secret.as_deref()).await {
            Ok(status) if status < 500 => {
                if status >= 400 {
                    log::warn!("alert webhook answered {status}; not retried");
                }
                return;
            }
            Ok(status) => log::warn!("alert webhook answered {status} (attempt {attempt})"),
            Err(e) => log::warn!("alert webhook: {e} (attempt {attempt})"),
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    state.metrics.alert_undelivered();
}

async fn post(state: &State, url: &str, body: &[u8], secret: Option<&str>) -> Result<u16, String> {
    // Not `?` on the parse error: it would quote the URL, token and all, into the log.
    let base = BaseUrl::parse(url).map_err(|_| "the webhook URL does not parse".to_string())?;
    let addr = tokio::net::lookup_host((base.host.as_str(), base.port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut peer = HttpPeer::new(addr, base.tls, base.host.clone());
    peer.options.connection_timeout = Some(Duration::from_secs(5));
    let path = if base.path_prefix.is_empty() {
        "/".to_string()
    } else {
        base.path_prefix.clone()
    };
    let mut req = RequestHeader::build("POST", path.as_bytes(), None).map_err(|e| e.to_string())?;
    let e = |e: pingora::BError| e.to_string();
    req.insert_header("host", base.authority()).map_err(e)?;
    req.insert_header("content-type", "application/json")
        .map_err(e)?;
    req.insert_header("content-length", body.len().to_string())
        .map_err(e)?;
    if let Some(s) = secret {
        let sig = crate::auth::to_hex(&hmac_sha256(s.as_bytes(), body));
        req.insert_header("x-tollgate-signature", format!("sha256={sig}"))
            .map_err(e)?;
    }
    let (mut session, _) = state.connector.get(&peer).await.map_err(e)?;
    session.set_read_timeout(Some(Duration::from_secs(10)));
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(e)?;
    session
        .write_request_body(Bytes::copy_from_slice(body), true)
        .await
        .map_err(e)?;
    session.finish_request_body().await.map_err(e)?;
    session.read_response_header().await.map_err(e)?;
    Ok(session.response_header().map_or(0, |h| h.status.as_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            crate::auth::to_hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
