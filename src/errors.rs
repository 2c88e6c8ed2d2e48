//! Errors the gateway itself produces, mapped once to HTTP in the provider's own error
//! shape so SDKs raise their usual exceptions.

use crate::api::ProviderKind;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the model `{0}` does not exist or is not configured on this gateway")]
    UnknownModel(String),
    #[error("request body is larger than the gateway's limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the model `{0}` has no price configured; refusing to serve it unmetered")]
    Unpriced(String),
    #[error("the provider could not be reached: {0}")]
    Unreachable(String),
    #[error("the provider did not answer in time: {0}")]
    Timeout(String),
    #[error("the provider's response could not be read: {0}")]
    BadUpstream(String),
    #[error("{message}")]
    BudgetExceeded { message: String, retry_after_s: u64 },
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_s: u64,
        /// OpenAI's rate-limit `type`: `requests` or `tokens`.
        unit: &'static str,
        limit: u64,
        remaining: u64,
    },
    #[error("the provider {0:?} is failing; its circuit is open, try again shortly")]
    CircuitOpen(String),
    #[error("the budget store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::BadRequest(_) | GatewayError::Unpriced(_) => 400,
            GatewayError::Unauthorized(_) => 401,
            GatewayError::Forbidden(_) => 403,
            GatewayError::NotFound(_) | GatewayError::UnknownModel(_) => 404,
            GatewayError::MethodNotAllowed(_) => 405,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::Unreachable(_) | GatewayError::BadUpstream(_) => 502,
            GatewayError::Timeout(_) => 504,
            GatewayError::BudgetExceeded { .. } | GatewayError::RateLimited { .. } => 429,
            GatewayError::StoreUnavailable(_) | GatewayError::CircuitOpen(_) => 503,
            GatewayError::Internal(_) => 500,
        }
    }

    /// OpenAI's `code` field.
    fn openai_code(&self) -> Option<&'static str> {
        Some(match self {
            GatewayError::Unauthorized(_) => "invalid_api_key",
            GatewayError::UnknownModel(_) => "model_not_found",
            GatewayError::Unpriced(_) => "model_not_priced",
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::Timeout(_) => "upstream_timeout",
            GatewayError::Unreachable(_) | GatewayError::BadUpstream(_) => "upstream_unavailable",
            GatewayError::BudgetExceeded { .. } => "budget_exceeded",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::StoreUnavailable(_) => "budget_store_unavailable",
            GatewayError::CircuitOpen(_) => "upstream_circuit_open",
            _ => return None,
        })
    }

    fn openai_type(&self) -> &'static str {
        match self {
            GatewayError::BudgetExceeded { .. } => return "budget_exceeded",
            GatewayError::RateLimited { unit, .. } => return unit,
            _ => {}
        }
        match self.status() {
            400 | 404 | 405 | 413 => "invalid_request_error",
            401 => "invalid_request_error",
            403 => "permission_error",
            _ => "api_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self {
            GatewayError::BudgetExceeded { .. } => return "budget_exceeded",
            GatewayError::RateLimited { .. } => return "rate_limit_error",
            _ => {}
        }
        match self.status() {
            400 | 405 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            _ => "api_error",
        }
    }

    /// Headers that go with the error: `retry-after` and OpenAI-style rate-limit state.
    pub fn headers(&self) -> Vec<(String, String)> {
        match self {
            GatewayError::BudgetExceeded { retry_after_s, .. } => {
                vec![("retry-after".into(), retry_after_s.to_string())]
            }
            GatewayError::RateLimited {
                retry_after_s,
                unit,
                limit,
                remaining,
                ..
            } => vec![
                ("retry-after".into(), retry_after_s.to_string()),
                (format!("x-ratelimit-limit-{unit}"), limit.to_string()),
                (
                    format!("x-ratelimit-remaining-{unit}"),
                    remaining.to_string(),
                ),
                (
                    format!("x-ratelimit-reset-{unit}"),
                    format!("{retry_after_s}s"),
                ),
            ],
            GatewayError::StoreUnavailable(_) | GatewayError::CircuitOpen(_) => {
                vec![("retry-after".into(), "1".into())]
            }
            _ => Vec::new(),
        }
    }

    /// The JSON error body in the wire format of `kind`.
    pub fn body(&self, kind: ProviderKind) -> Vec<u8> {
        let message = self.to_string();
        let value = match kind {
            ProviderKind::OpenAi => serde_json::json!({
                "error": {
                    "message": message,
                    "type": self.openai_type(),
                    "param": null,
                    "code": self.openai_code(),
                }
            }),
            ProviderKind::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": self.anthropic_type(), "message": message },
            }),
        };
        value.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = GatewayError::Unauthorized("invalid gateway key".into());
        let v: serde_json::Value =
            serde_json::from_slice(&e.body(ProviderKind::OpenAi)).expect("json");
        assert_eq!(e.status(), 401);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["message"], "invalid gateway key");
    }

    #[test]
    fn anthropic_shape() {
        let e = GatewayError::BodyTooLarge { limit: 10 };
        let v: serde_json::Value =
            serde_json::from_slice(&e.body(ProviderKind::Anthropic)).expect("json");
        assert_eq!(e.status(), 413);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
    }
}
