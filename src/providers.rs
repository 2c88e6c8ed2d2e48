//! Configured providers: where they live, how they authenticate, how to reach them.
//! Everything that differs between OpenAI-kind and Anthropic-kind upstreams is here.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use http::HeaderValue;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::api::ProviderKind;
use crate::config::{ProviderConfig, TimeoutConfig};
use crate::errors::GatewayError;
use crate::routing::BaseUrl;

/// How long a DNS answer is reused before asking again.
const DNS_TTL: Duration = Duration::from_secs(30);
/// The Anthropic API version sent when the client names none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Whose provider credential a request carries upstream. Deliberately not `Debug`: it
/// may hold the caller's own key.
pub enum Credential {
    /// The provider's configured one.
    Configured,
    /// The caller's own (`x-provider-key`).
    Own(String),
    /// None at all: a sandbox call to a provider with no credential configured.
    Empty,
}

/// A credential as the value of the provider's auth header, marked sensitive.
fn credential_value(
    kind: ProviderKind,
    key: &str,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut value = match kind {
        ProviderKind::OpenAi => HeaderValue::try_from(format!("Bearer {key}"))?,
        ProviderKind::Anthropic => HeaderValue::from_str(key)?,
    };
    value.set_sensitive(true);
    Ok(value)
}

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base: BaseUrl,
    /// The configured credential as the header value it is sent in, built once at load
    /// (not per request) and marked sensitive, so `Debug` does not show it. (Configured
    /// `extra_headers` are still printed by `Debug`; nothing logs a `Provider`.)
    pub credential: Option<HeaderValue>,
    /// The `Host` header for upstream requests (port included unless it is the scheme's).
    pub authority: HeaderValue,
    pub timeouts: TimeoutConfig,
    /// Parsed at load, so a bad name or value fails at start, not on each request.
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub breaker: crate::breaker::Breaker,
    resolved: Mutex<Option<(Instant, SocketAddr)>>,
}

impl Provider {
    pub fn new(
        name: &str,
        cfg: &ProviderConfig,
        credential: Option<String>,
    ) -> Result<Self, String> {
        let base = BaseUrl::provider(&cfg.base_url)?;
        let authority = base.authority();
        Ok(Provider {
            name: name.to_string(),
            kind: cfg.kind.into(),
            authority: HeaderValue::try_from(authority)
                .map_err(|_| format!("provider {name:?}: the host is not a valid header value"))?,
            base,
            credential: credential
                .map(|c| credential_value(cfg.kind.into(), &c))
                .transpose()
                .map_err(|_| {
                    format!("provider {name:?}: the credential is not a valid header value")
                })?,
            timeouts: cfg.timeouts,
            extra_headers: extra_headers(name, &cfg.headers)?,
            breaker: crate::breaker::Breaker::new(cfg.breaker),
            resolved: Mutex::new(None),
        })
    }

    /// The upstream path for an endpoint path, under the base URL's prefix.
    pub fn upstream_path(&self, endpoint_path: &str, query: Option<&str>) -> String {
        let mut p = format!("{}{}", self.base.path_prefix, endpoint_path);
        if let Some(q) = query {
            p.push('?');
            p.push_str(q);
        }
        p
    }

    /// Puts the provider credential in the provider's own header.
    pub fn apply_credential(
        &self,
        headers: &mut HeaderMap,
        credential: &Credential,
    ) -> Result<(), GatewayError> {
        fn bad<E>(_: E) -> GatewayError {
            GatewayError::BadRequest("the provider key is not a valid header value".into())
        }
        let value = match credential {
            Credential::Configured => self.credential.clone().ok_or_else(|| {
                GatewayError::Unreachable(format!(
                    "provider {:?} has no credential configured",
                    self.name
                ))
            })?,
            Credential::Own(key) => credential_value(self.kind, key).map_err(bad)?,
            Credential::Empty => credential_value(self.kind, "").map_err(bad)?,
        };
        let full = |_| GatewayError::BadRequest("too many request headers".into());
        match self.kind {
            ProviderKind::OpenAi => {
                headers.try_insert(AUTHORIZATION, value).map_err(full)?;
            }
            ProviderKind::Anthropic => {
                const ANTHROPIC_VERSION_HEADER: HeaderName =
                    HeaderName::from_static("anthropic-version");
                headers
                    .try_insert(HeaderName::from_static("x-api-key"), value)
                    .map_err(full)?;
                if !headers.contains_key(ANTHROPIC_VERSION_HEADER) {
                    headers
                        .try_insert(
                            ANTHROPIC_VERSION_HEADER,
                            HeaderValue::from_static(ANTHROPIC_VERSION),
                        )
                        .map_err(full)?;
                }
            }
        }
        Ok(())
    }

    /// A peer for the connector: resolved address, TLS settings and timeouts. Peers for
    /// the same provider hash alike, so Pingora's pool reuses their connections.
    pub async fn peer(&self) -> Result<HttpPeer, GatewayError> {
        let addr = self.resolve().await?;
        let mut peer = HttpPeer::new(addr, self.base.tls, self.base.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.timeouts.connect());
        o.total_connection_timeout = Some(self.timeouts.connect());
        o.idle_timeout = Some(Duration::from_secs(60));
        // HTTP/2 where the provider offers it. Each connection carries one request at a
        // time (Pingora's default `max_h2_streams` of 1, kept): a connection that breaks
        // takes one request with it, not every stream on it, and a stream cut part way is
        // never retried (it may have been billed). Idle connections are pooled and reused.
        if self.base.tls {
            o.alpn = ALPN::H2H1;
        }
        Ok(peer)
    }

    async fn resolve(&self) -> Result<SocketAddr, GatewayError> {
        if let Ok(guard) = self.resolved.lock() {
            if let Some((at, addr)) = *guard {
                if at.elapsed() < DNS_TTL {
                    return Ok(addr);
                }
            }
        }
        let target = (self.base.host.as_str(), self.base.port);
        let addr = tokio::net::lookup_host(target)
            .await
            .map_err(|e| GatewayError::Unreachable(format!("{}: DNS: {e}", self.name)))?
            .next()
            .ok_or_else(|| GatewayError::Unreachable(format!("{}: no address", self.name)))?;
        if let Ok(mut guard) = self.resolved.lock() {
            *guard = Some((Instant::now(), addr));
        }
        Ok(addr)
    }
}

/// A provider's configured `headers`, parsed once.
fn extra_headers(
    provider: &str,
    configured: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    configured
        .iter()
        .map(|(k, v)| {
            let name = HeaderName::try_from(k.as_str())
                .map_err(|_| format!("provider {provider:?}: {k:?} is not a valid header name"))?;
            let value = HeaderValue::try_from(v.as_str()).map_err(|_| {
                format!(
                    "provider {provider:?}: the value of header {k:?} is not a valid header value"
                )
            })?;
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(kind: &str, base_url: &str, credential: Option<&str>) -> Result<Provider, String> {
        let cfg: ProviderConfig =
            serde_yaml::from_str(&format!("{{ kind: {kind}, base_url: \"{base_url}\" }}"))
                .map_err(|e| e.to_string())?;
        Provider::new("p", &cfg, credential.map(str::to_string))
    }

    fn sent(p: &Provider, c: &Credential) -> Vec<(String, String)> {
        let mut headers = HeaderMap::new();
        p.apply_credential(&mut headers, c).expect("applied");
        headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn credentials_go_in_each_kinds_header_and_never_show_in_debug() {
        let openai =
            provider("openai", "https://api.example.com/v1", Some("sk-secret")).expect("ok");
        assert_eq!(
            sent(&openai, &Credential::Configured),
            [("authorization".to_string(), "Bearer sk-secret".to_string())]
        );
        assert_eq!(
            sent(&openai, &Credential::Own("sk-own".into())),
            [("authorization".to_string(), "Bearer sk-own".to_string())]
        );
        assert!(!format!("{openai:?}").contains("sk-secret"));
        assert_eq!(openai.authority, "api.example.com");
        let anthropic =
            provider("anthropic", "http://127.0.0.1:8080", Some("ak-secret")).expect("ok");
        let headers = sent(&anthropic, &Credential::Configured);
        assert!(headers.contains(&("x-api-key".to_string(), "ak-secret".to_string())));
        assert!(headers.contains(&(
            "anthropic-version".to_string(),
            ANTHROPIC_VERSION.to_string()
        )));
        assert_eq!(anthropic.authority, "127.0.0.1:8080");
        let v6 = provider("openai", "http://[::1]:8080/v1", None).expect("ok");
        assert_eq!(v6.authority, "[::1]:8080");
        let v6 = provider("openai", "https://[2001:db8::1]/v1", None).expect("ok");
        assert_eq!(v6.authority, "[2001:db8::1]");
    }

    #[test]
    fn a_credential_that_cannot_be_a_header_fails_at_load_and_a_callers_gets_a_400() {
        let e = provider("openai", "https://api.example.com", Some("bad\nkey")).unwrap_err();
        assert!(e.contains("\"p\"") && e.contains("credential"), "{e}");
        let p = provider("openai", "https://api.example.com", None).expect("ok");
        let mut headers = HeaderMap::new();
        let e = p
            .apply_credential(&mut headers, &Credential::Own("bad\nkey".into()))
            .unwrap_err();
        assert_eq!(e.status(), 400);
        let e = p
            .apply_credential(&mut headers, &Credential::Configured)
            .unwrap_err();
        assert_eq!(e.status(), 502);
    }

    #[test]
    fn configured_extra_headers_are_checked_at_load() {
        let cfg = |headers: &str| -> ProviderConfig {
            serde_yaml::from_str(&format!(
                "{{ kind: openai, base_url: \"https://api.example.com\", headers: {headers} }}"
            ))
            .expect("yaml")
        };
        let p = Provider::new("p", &cfg("{ OpenAI-Organization: org-1 }"), None).expect("ok");
        assert_eq!(p.extra_headers.len(), 1);
        assert_eq!(p.extra_headers[0].0, "openai-organization");
        assert_eq!(p.extra_headers[0].1, "org-1");
        let e = Provider::new("p", &cfg("{ \"bad name\": x }"), None).unwrap_err();
        assert!(e.contains("\"p\"") && e.contains("bad name"), "{e}");
        let e = Provider::new("p", &cfg("{ x-ok: \"line\\nbreak\" }"), None).unwrap_err();
        assert!(e.contains("x-ok") && e.contains("value"), "{e}");
    }
}
